"""Client library: any node is an entry point; failover to the next one when it is down.

    from zmesh import Client
    with Client(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5565"]) as c:
        done = c.generate("The capital of France is", max_tokens=8)
        print(done.text, done.served_by, done.cached_tokens, done.route_reason)

`AsyncClient` is the same API for asyncio code. One DEALER socket per endpoint with
ZMQ_IMMEDIATE, so a request is never queued for a node that is not connected.

A mesh that runs with keys (CurveZMQ) needs the client's key pair and each node's
public key: `Client(endpoints, client_key="keys/app.key_secret",
server_key={"tcp://10.0.0.1:5555": "keys/node-a.key", ...})` (one key or file for
every endpoint also works). A node that does not know the client's key refuses the
handshake: the client raises `AuthenticationFailed` at once.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, cast

import zmq
import zmq.asyncio

from zmesh import protocol as P
from zmesh.security import KeyPair, SecurityError, client_socket, load_keypair, load_public_key

Completion = P.Done  # the final answer, with its provenance


class ZmeshError(Exception):
    """Base class of every error the client raises."""


class RequestError(ZmeshError):
    """A node answered with an error (bad request, prompt too long, overloaded...)."""

    def __init__(self, code: str, message: str, node_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (node {node_id})" if node_id else ""))
        self.code, self.message, self.node_id = code, message, node_id


class RequestTimeout(ZmeshError, TimeoutError):
    """No endpoint answered within the timeout."""


class NoEndpointAvailable(ZmeshError):
    """None of the endpoints accepted a connection."""


class AuthenticationFailed(NoEndpointAvailable):
    """A node refused this client's key, or the CURVE handshake failed (wrong server key,
    or keys on one side only). Subclasses NoEndpointAvailable: the request went nowhere."""


_HANDSHAKE_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


# Errors worth retrying on another node; the rest would fail anywhere.
_RETRYABLE = {P.OVERLOADED, P.UNAVAILABLE, P.INTERNAL}


class _Endpoint:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        keys: KeyPair | None = None,
        server_key: bytes | None = None,
    ) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        self._monitor: zmq.Socket[bytes] | None = None
        self._connected = self._handshaken = False
        self.auth_error: str | None = None
        if keys is not None and server_key is not None:
            client_socket(self.sock, keys, server_key)
            # Handshake events say why a CURVE connection never came up.
            mon = self.sock.get_monitor_socket(_HANDSHAKE_EVENTS)
            self._monitor = zmq.Socket.shadow(mon.underlying)
            self._monitor_async = mon
        self.sock.connect(address)
        self.waiters: dict[str, asyncio.Queue[P.Message]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def read_loop(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                continue  # nothing to route it to; the node logs its own side
            q = self.waiters.get(getattr(msg, "request_id", None) or "")
            if q is not None:
                q.put_nowait(msg)

    def _check_handshake(self) -> None:
        """Raise AuthenticationFailed if the monitor saw the CURVE handshake fail."""
        if self._monitor is None:
            return
        from zmq.utils.monitor import parse_monitor_message

        while self.auth_error is None:
            try:
                ev = parse_monitor_message(self._monitor.recv_multipart(flags=zmq.DONTWAIT))
            except zmq.Again:
                break
            kind = ev["event"]
            if kind == zmq.EVENT_CONNECTED:
                self._connected = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_error = (
                    f"{self.address} refused this client's key (ZAP status {ev['value']}): "
                    "is its public key in the node's authorized_dir / authorized_keys?"
                )
            elif kind in (
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ) or (kind == zmq.EVENT_DISCONNECTED and self._connected and not self._handshaken):
                self.auth_error = (
                    f"CURVE handshake with {self.address} failed: wrong server key, "
                    "or the node runs without keys"
                )
        if self.auth_error is not None:
            raise AuthenticationFailed(self.auth_error)

    async def send(self, msg: P.Message, connect_timeout: float) -> bool:
        """Send once connected; False if no connection came up in time."""
        if self.reader is None:
            self.reader = asyncio.create_task(self.read_loop())
        frame = P.encode(msg)
        give_up = time.monotonic() + connect_timeout
        while True:
            # DONTWAIT: done at once, zmq.Again inside while not connected. Through the
            # asyncio socket (not a sync shadow), so the reader waiting on the same
            # socket is woken if the send consumed the edge of its zmq FD.
            fut = cast("asyncio.Future[Any]", self.sock.send(frame, flags=zmq.DONTWAIT))
            exc = fut.exception() if fut.done() else None
            if exc is None:
                return True
            if not isinstance(exc, zmq.Again):
                raise exc
            self._check_handshake()
            if time.monotonic() >= give_up:
                return False
            await asyncio.sleep(0.01)

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
        if self._monitor is not None:
            self.sock.disable_monitor()
            self._monitor_async.close(linger=0)
        self.sock.close(linger=0)


class AsyncClient:
    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = 120.0,
        connect_timeout: float = 2.0,
        tenant: str = "default",
        client_key: str | os.PathLike[str] | KeyPair | None = None,
        server_key: str | Mapping[str, str] | None = None,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one endpoint")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.tenant = tenant
        self._keys: KeyPair | None = None
        self._server_keys: dict[str, bytes] = {}
        self._default_server_key: bytes | None = None
        if (client_key is None) != (server_key is None):
            raise ValueError("CURVE needs both client_key and server_key (or neither)")
        try:
            if client_key is not None:
                self._keys = (
                    client_key if isinstance(client_key, KeyPair) else load_keypair(client_key)
                )
            if isinstance(server_key, str):
                self._default_server_key = load_public_key(server_key)
            elif server_key is not None:
                self._server_keys = {a: load_public_key(k) for a, k in server_key.items()}
                missing = [a for a in self.endpoints if a not in self._server_keys]
                if missing:
                    raise ValueError(f"no server_key for endpoint(s) {missing}")
        except SecurityError as exc:
            raise ValueError(str(exc)) from None
        self._ctx = zmq.asyncio.Context()
        self._eps: dict[str, _Endpoint] = {}

    def _ep(self, address: str) -> _Endpoint:
        if address not in self._eps:
            server_key = None
            if self._keys is not None:
                server_key = self._server_keys.get(address, self._default_server_key)
                if server_key is None:
                    raise NoEndpointAvailable(f"no server key known for {address}")
            self._eps[address] = _Endpoint(self._ctx, address, self._keys, server_key)
        return self._eps[address]

    def _drop(self, address: str) -> None:
        ep = self._eps.pop(address, None)
        if ep is not None:
            ep.close()

    async def close(self) -> None:
        for ep in self._eps.values():
            ep.close()
        self._eps.clear()
        self._ctx.term()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    def _request(
        prompt: str | Sequence[int],
        tenant: str,
        params: P.SamplingParams,
        deadline: float | None,
        stream: bool,
        request_id: str | None,
    ) -> P.Generate:
        text = prompt if isinstance(prompt, str) else None
        tokens = None if isinstance(prompt, str) else list(prompt)
        return P.Generate(
            request_id=request_id or uuid.uuid4().hex,
            prompt=text,
            tokens=tokens,
            tenant=tenant,
            params=params,
            deadline=deadline,
            stream=stream,
        )

    async def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        tenant: str | None = None,
        timeout: float | None = None,
        request_id: str | None = None,
        endpoint: str | None = None,
        _stream: bool = True,
    ) -> AsyncIterator[P.Chunk | P.Done]:
        """Yield `Chunk`s as text arrives, then the final `Done`.

        A chunk whose `attempt` is higher than the previous one means the request
        restarted on another node: drop the text received so far.
        """
        params = P.SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=list(stop),
        )
        try:
            params.validate()
        except ValueError as exc:
            raise RequestError(P.INVALID_REQUEST, str(exc)) from exc
        budget = self.timeout if timeout is None else timeout
        give_up = time.monotonic() + budget
        msg = self._request(
            prompt, tenant or self.tenant, params, time.time() + budget, _stream, request_id
        )
        order = [endpoint] if endpoint else self.endpoints
        last_error: ZmeshError = NoEndpointAvailable(f"no endpoint reachable: {order}")
        for address in order:
            ep = self._ep(address)
            q: asyncio.Queue[P.Message] = asyncio.Queue()
            ep.waiters[msg.request_id] = q
            try:
                try:
                    sent = await ep.send(msg, self.connect_timeout)
                except AuthenticationFailed as exc:
                    last_error = exc
                    self._drop(address)  # stop its reconnect attempts
                    continue
                if not sent:
                    last_error = self._unreachable(address)
                    continue
                while True:
                    left = give_up - time.monotonic()
                    if left <= 0:
                        raise RequestTimeout(f"no answer from {address} within {budget:.1f}s")
                    try:
                        reply = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        raise RequestTimeout(
                            f"no answer from {address} within {budget:.1f}s"
                        ) from None
                    if isinstance(reply, P.Chunk):
                        yield reply
                    elif isinstance(reply, P.Done):
                        yield reply
                        return
                    elif isinstance(reply, P.Error):
                        err = RequestError(reply.code, reply.message, reply.node_id)
                        if reply.code not in _RETRYABLE:
                            raise err
                        last_error = err
                        break
            finally:
                ep.waiters.pop(msg.request_id, None)
        raise last_error

    def _unreachable(self, address: str) -> NoEndpointAvailable:
        # A CURVE server silently drops a plain (keyless) handshake: say so.
        hint = "" if self._keys else " (a mesh with keys also needs client_key and server_key)"
        return NoEndpointAvailable(f"could not connect to {address}{hint}")

    async def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> P.Done:
        """The whole answer with its provenance (served_by, hops, cached_tokens...)."""
        async for event in self.stream(prompt, _stream=False, **kwargs):
            if isinstance(event, P.Done):
                return event
        raise ZmeshError("stream ended without an answer")  # pragma: no cover

    async def status(self, endpoint: str | None = None, timeout: float = 5.0) -> P.Status:
        """One node's view: its cache, its peer table and its counters."""
        ep = self._ep(endpoint or self.endpoints[0])
        rid = uuid.uuid4().hex
        q: asyncio.Queue[P.Message] = asyncio.Queue()
        ep.waiters[rid] = q
        try:
            try:
                sent = await ep.send(
                    P.StatusRequest(request_id=rid), min(timeout, self.connect_timeout)
                )
            except AuthenticationFailed:
                self._drop(ep.address)
                raise
            if not sent:
                raise self._unreachable(ep.address)
            try:
                reply = await asyncio.wait_for(q.get(), timeout)
            except TimeoutError:
                raise RequestTimeout(f"no status from {ep.address} within {timeout}s") from None
        finally:
            ep.waiters.pop(rid, None)
        if not isinstance(reply, P.Status):
            raise ZmeshError(f"unexpected reply {type(reply).__name__}")
        return reply


class Client:
    """Blocking client: an `AsyncClient` driven by a private event-loop thread."""

    def __init__(self, endpoints: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="zmesh-client"
        )
        self._thread.start()
        self._async = self._call(self._make(endpoints, kwargs))

    @staticmethod
    async def _make(endpoints: str | Sequence[str], kwargs: dict[str, Any]) -> AsyncClient:
        return AsyncClient(endpoints, **kwargs)

    def _call(self, coro: Any) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def generate(self, prompt: str | Sequence[int], **kwargs: Any) -> P.Done:
        return self._call(self._async.generate(prompt, **kwargs))

    def status(self, endpoint: str | None = None, timeout: float = 5.0) -> P.Status:
        return self._call(self._async.status(endpoint, timeout))

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[P.Chunk | P.Done]:
        agen = self._async.stream(prompt, **kwargs)
        while True:
            try:
                yield self._call(agen.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
