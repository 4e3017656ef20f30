"""The lab's readiness check for a node's HTTP API (`zmesh.lab.http_answers`): a node
answers `Status` on ZeroMQ before its HTTP front listens, so `Lab.wait_converged` also
waits until HTTP answers. Any status counts (a node that has not joined says 503);
nothing listening, or a listener that never replies, does not."""

from __future__ import annotations

import asyncio

from zmesh.lab import free_ports, http_answers


async def _serve(reply: bytes | None, hang_up: asyncio.Event) -> tuple[asyncio.Server, str]:
    """A loopback server that answers each request with ``reply`` (None: never, until
    ``hang_up``)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        if reply is None:
            await hang_up.wait()  # accepted, never answered
        else:
            writer.write(reply)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


def test_http_answers_only_once_a_server_replies() -> None:
    async def main() -> None:
        (port,) = free_ports(1)
        assert not await http_answers(f"http://127.0.0.1:{port}", 1.0)  # nothing bound
        for reply, want in [
            (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", True),
            (b"HTTP/1.0 200 OK\r\n\r\n", True),
            (b"SSH-2.0-not-http\r\n", False),
            (None, False),
        ]:
            hang_up = asyncio.Event()
            server, url = await _serve(reply, hang_up)
            try:
                assert await http_answers(url, 0.5) is want, reply
            finally:
                hang_up.set()
                server.close()
                await server.wait_closed()

    asyncio.run(main())
