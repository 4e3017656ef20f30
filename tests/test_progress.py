"""Progress keep-alives for a forward, on a real node with the real model: the first
one goes once the request is in hand (handed to the engine, or queued behind others),
not on arrival, and a queued forward hears at once, long before its answer."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import zmq
import zmq.asyncio

from tests.meshkit import RunningNode, node_config
from zmesh import protocol as P
from zmesh.engine import Engine
from zmesh.lab import free_ports


def _forward(rid: str, prompt: str, max_tokens: int) -> P.Generate:
    """A Generate as a peer's forward sends it: token-free here, hops 1, keep-alives on."""
    return P.Generate(
        request_id=rid,
        prompt=prompt,
        params=P.SamplingParams(max_tokens=max_tokens),
        stream=False,
        hops=1,
        origin="node-up",
        progress=True,
    )


@contextlib.asynccontextmanager
async def _as_peer(serve_addr: str) -> AsyncIterator[zmq.asyncio.Socket]:
    """A DEALER on the node's serve socket, as a forwarding peer holds one."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(serve_addr)
    try:
        yield sock
    finally:
        ctx.destroy(linger=0)


async def _frames(sock: zmq.asyncio.Socket, rids: set[str], budget_s: float) -> list:
    """Every frame for ``rids`` with its arrival time, until each has its Done/Error."""
    seen: list[tuple[float, P.Message]] = []
    open_ = set(rids)
    end = time.monotonic() + budget_s
    while open_:
        left = end - time.monotonic()
        assert left > 0, f"no final reply for {sorted(open_)} in {budget_s}s"
        msg = P.decode(await asyncio.wait_for(sock.recv(), left))
        seen.append((time.monotonic(), msg))
        if isinstance(msg, P.Done | P.Error):
            open_.discard(msg.request_id)
    return seen


def test_the_first_progress_says_the_request_is_in_hand(engine: Engine) -> None:
    """Alone on the node: the forward's first Progress says "running" (not "accepted":
    it was not sent on arrival), then the Done."""
    with RunningNode(node_config("solo", free_ports(2)), engine) as node:

        async def main() -> list:
            async with _as_peer(node.serve_addr) as sock:
                await sock.send(P.encode(_forward("f1", "The capital of France is", 8)))
                return await _frames(sock, {"f1"}, budget_s=120)

        frames = [m for _, m in asyncio.run(main())]
    kinds = [type(m).__name__ for m in frames]
    assert kinds[0] == "Progress" and kinds[-1] == "Done", kinds
    assert frames[0].state == "running"  # the engine had it when it was sent


def test_a_queued_forward_hears_at_once_not_after_the_one_ahead(engine: Engine) -> None:
    """One place in the engine: a forward queued behind a long answer gets its
    "queued" Progress at once, long before the first request's Done."""
    places = engine.max_running
    engine.max_running = 1
    try:
        with RunningNode(node_config("solo", free_ports(2)), engine) as node:

            async def main() -> list:
                async with _as_peer(node.serve_addr) as sock:
                    long = _forward("long", "Write a long story about a lighthouse.", 96)
                    await sock.send(P.encode(long))
                    # The first is in the engine once its own Progress came.
                    first = P.decode(await asyncio.wait_for(sock.recv(), 120))
                    assert isinstance(first, P.Progress) and first.request_id == "long"
                    await sock.send(P.encode(_forward("behind", "The capital of Italy is", 4)))
                    return await _frames(sock, {"long", "behind"}, budget_s=300)

            frames = asyncio.run(main())
    finally:
        engine.max_running = places
    behind = [(t, m) for t, m in frames if m.request_id == "behind" and isinstance(m, P.Progress)]
    long_done = next(t for t, m in frames if m.request_id == "long" and isinstance(m, P.Done))
    assert behind, "the queued forward got no Progress"
    t_first, first = behind[0]
    assert first.state == "queued"
    # Precondition for the claim: the answer ahead took a while (96 tokens).
    assert t_first < long_done, "the queued forward heard only after the one ahead ended"
