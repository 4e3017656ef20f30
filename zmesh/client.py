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
from collections import Counter
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


_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

# ZMTP heartbeats on every client socket. libzmq's I/O thread answers PINGs whatever
# the node's Python is doing, so a node that is alive but busy keeps its connection,
# while one that is frozen (SIGSTOP) or whose host vanished without a FIN stops
# answering and the connection is dropped within IVL + TIMEOUT (about 2 s). A node
# that dies outright closes its sockets and is noticed at once.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
HEARTBEAT_TTL_MS = 10_000  # the node may drop us after this long without a sign of life

# Errors worth retrying on another node; the rest would fail anywhere.
_RETRYABLE = {P.OVERLOADED, P.UNAVAILABLE, P.INTERNAL}


def _is_duplicate(err: P.Error) -> bool:
    """The node still runs a copy of this request id (our abandoned attempt, or the
    copy its dead entry node forwarded to it). The node has no code of its own for it."""
    return err.code == P.INVALID_REQUEST and "already in flight" in err.message


class _Endpoint:
    """One DEALER to one node, its socket monitor and its health.

    The monitor drives failover: a dropped connection fails every request waiting on
    it at once (its replies would go to an identity the node's ROUTER no longer knows),
    and an endpoint whose connection failed stays `failed` (tried last) until libzmq's
    own reconnect attempts, which go on in the background, complete a handshake again.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        counters: Counter[str],
        keys: KeyPair | None = None,
        server_key: bytes | None = None,
    ) -> None:
        self.address = address
        self.counters = counters
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
        self.curve = keys is not None and server_key is not None
        if keys is not None and server_key is not None:
            client_socket(self.sock, keys, server_key)
        self.monitor = self.sock.get_monitor_socket(_MONITOR_EVENTS)
        self.sock.connect(address)
        # request id -> queue of replies; None in the queue: the connection dropped.
        self.waiters: dict[str, asyncio.Queue[P.Message | None]] = {}
        self.up = False  # a handshake completed and the connection has not dropped since
        self.failed = False  # a request could not use it since it was last up
        self.retrying = False  # the last connect was refused; libzmq will try again
        self._connected = False
        self.auth_error: str | None = None
        self.tasks = [
            asyncio.create_task(self.read_loop()),
            asyncio.create_task(self.monitor_loop()),
        ]

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
            else:
                self.counters["late_replies"] += 1  # an abandoned attempt's: dropped

    async def monitor_loop(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        bad_handshake = (
            f"CURVE handshake with {self.address} failed: wrong server key, "
            "or the node runs without keys"
        )
        while True:
            kind = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if kind == zmq.EVENT_CONNECTED:
                self._connected, self.retrying = True, False
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self.retrying = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.failed = True, False
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.curve and self._connected and not self.up:
                    self.auth_error = self.auth_error or bad_handshake
                self.up = self._connected = False
                for q in self.waiters.values():
                    q.put_nowait(None)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_error = self.auth_error or (
                    f"{self.address} refused this client's key: "
                    "is its public key in the node's authorized_dir / authorized_keys?"
                )
            elif self.curve:  # HANDSHAKE_FAILED_PROTOCOL / _NO_DETAIL
                self.auth_error = self.auth_error or bad_handshake

    async def send(
        self, frame: bytes, rid: str, connect_timeout: float, patient: bool = True
    ) -> asyncio.Queue[P.Message | None] | None:
        """Send once connected and return the queue its replies arrive on; None if no
        connection came up in time (or, not `patient`, the node refused the connect)."""
        give_up = time.monotonic() + connect_timeout
        while True:
            # DONTWAIT: done at once, zmq.Again inside while not connected. Through the
            # asyncio socket (not a sync shadow), so the reader waiting on the same
            # socket is woken if the send consumed the edge of its zmq FD.
            fut = cast("asyncio.Future[Any]", self.sock.send(frame, flags=zmq.DONTWAIT))
            exc = fut.exception() if fut.done() else None
            if exc is None:
                # Registered with no await since the send: no reply can slip past, and
                # a drop seen from now on is this attempt's.
                q: asyncio.Queue[P.Message | None] = asyncio.Queue()
                self.waiters[rid] = q
                return q
            if not isinstance(exc, zmq.Again):
                raise exc
            if self.auth_error is not None:
                raise AuthenticationFailed(self.auth_error)
            if time.monotonic() >= give_up or (self.retrying and not patient):
                self.failed = True
                return None
            await asyncio.sleep(0.01)

    def cancel(self, rid: str) -> None:
        """Best effort: ask the node to stop working on a request nobody waits for."""
        if self.sock.closed:
            return
        fut = cast(
            "asyncio.Future[Any]",
            self.sock.send(P.encode(P.Cancel(request_id=rid)), flags=zmq.DONTWAIT),
        )
        if fut.done():
            fut.exception()  # zmq.Again when not connected: nothing to cancel there

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class _Shown:
    """What the caller has seen of one streamed answer, so that a retry on another node
    repeats nothing (see `AsyncClient.stream`)."""

    def __init__(self, rid: str) -> None:
        self.rid = rid
        self.text = ""  # delivered in the current attempt
        self.attempt = 0  # the attempt the caller sees
        self.index = 0
        self.source: tuple[int, int] = (0, 0)  # (client attempt, the node's attempt)
        self.source_text = ""

    def chunk(self, tries: int, ch: P.Chunk) -> P.Chunk | None:
        if (tries, ch.attempt) != self.source:
            if tries == self.source[0]:
                # The node itself restarted (its forward failed): a visible restart,
                # as the node reports it.
                self.attempt, self.index, self.text = self.attempt + 1, 0, ""
            self.source, self.source_text = (tries, ch.attempt), ""
        self.source_text += ch.text
        return self._show(self.source_text, final=False)

    def done(self, done: P.Done) -> P.Chunk | None:
        """A last chunk when the final text is not what the chunks delivered."""
        return None if done.text == self.text else self._show(done.text, final=True)

    def _show(self, full: str, final: bool) -> P.Chunk | None:
        if full.startswith(self.text):
            new = full[len(self.text) :]
        elif self.text.startswith(full) and not final:
            return None  # a retry still repeating what was delivered
        else:  # the retry's text departs from what was delivered: restart visibly
            self.attempt, self.index, new = self.attempt + 1, 0, full
        if not new:
            return None
        self.text = full
        self.index += 1
        return P.Chunk(request_id=self.rid, index=self.index - 1, text=new, attempt=self.attempt)


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
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.endpoints = [endpoints] if isinstance(endpoints, str) else list(endpoints)
        if not self.endpoints:
            raise ValueError("give at least one endpoint")
        if not 1 <= len(tenant) <= P.MAX_ID_CHARS:
            raise ValueError(f"tenant must be 1..{P.MAX_ID_CHARS} chars, got {tenant!r}")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.tenant = tenant
        # retries (requests sent again after an attempt failed), connections_lost
        # (attempts whose connection dropped), duplicates_refused (a retry refused by a
        # node still running the abandoned copy), late_replies (replies nobody waited
        # for any more: dropped)
        self.counters: Counter[str] = Counter()
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
        # A shared context (inproc:// endpoints need the binder's) is not ours to end.
        self._own_ctx = context is None
        self._ctx = context or zmq.asyncio.Context()
        self._eps: dict[str, _Endpoint] = {}

    def _ep(self, address: str) -> _Endpoint:
        if address not in self._eps:
            server_key = None
            if self._keys is not None:
                server_key = self._server_keys.get(address, self._default_server_key)
                if server_key is None:
                    raise NoEndpointAvailable(f"no server key known for {address}")
            self._eps[address] = _Endpoint(
                self._ctx, address, self.counters, self._keys, server_key
            )
        return self._eps[address]

    def _reset(self, ep: _Endpoint) -> None:
        """A fresh socket for an endpoint whose connection dropped, still marked failed:
        nothing still on its way over the old one (say, the replies of a copy of a
        request the node kept running) can reach a later attempt on this endpoint."""
        if self._eps.get(ep.address) is ep:  # once, for all the requests it failed
            self._drop(ep.address)
            self._ep(ep.address).failed = True

    def _drop(self, address: str) -> None:
        ep = self._eps.pop(address, None)
        if ep is not None:
            ep.close()

    async def close(self) -> None:
        tasks = [t for ep in self._eps.values() for t in ep.tasks]
        for ep in self._eps.values():
            ep.close()
        self._eps.clear()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_ctx:
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
    ) -> tuple[P.Generate, bytes]:
        """The request and its frame; RequestError for what no node would accept."""
        text = prompt if isinstance(prompt, str) else None
        tokens = None if isinstance(prompt, str) else list(prompt)
        msg = P.Generate(
            request_id=uuid.uuid4().hex if request_id is None else request_id,
            prompt=text,
            tokens=tokens,
            tenant=tenant,
            params=params,
            deadline=deadline,
            stream=stream,
        )
        try:
            P.validate_generate(msg)
            frame = P.encode(msg)
        except P.ProtocolError as exc:
            raise RequestError(exc.code, exc.message) from None
        except (UnicodeEncodeError, OverflowError) as exc:  # a lone surrogate, a huge int
            raise RequestError(P.INVALID_REQUEST, f"cannot encode the request: {exc}") from None
        if len(frame) > P.MAX_FRAME_BYTES:
            # A node drops the whole connection on a frame over its ZMQ_MAXMSGSIZE, and
            # with it the replies of every other request on it: refuse it here.
            raise RequestError(
                P.PROMPT_TOO_LONG,
                f"the request is {len(frame)} bytes; a frame may have {P.MAX_FRAME_BYTES}",
            )
        return msg, frame

    def _order(self) -> list[str]:
        """Endpoints in the given order, except that those whose connection failed come
        last until they reconnect (libzmq retries them in the background)."""
        return sorted(self.endpoints, key=lambda a: a in self._eps and self._eps[a].failed)

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

        Failover: the request goes to the first endpoint that is up (one whose
        connection failed is tried last until it reconnects). If that node dies or
        freezes (its connection drops: at once for a dead process, within about 2 s of
        ZMTP heartbeats for a frozen one; a busy node still answers them) or answers
        `overloaded` / `unavailable` / `internal`, the request is sent once to the next
        endpoint, with the same request id, within the same `timeout`; replies of the
        abandoned attempt are dropped, so one answer is delivered.

        A retry regenerates the answer from the start, and chunks repeating text already
        delivered are skipped: with greedy decoding (the default) or a fixed `seed` the
        caller sees one seamless stream. Appending the delivered text to the prompt
        instead would tokenize it anew (the answer would differ) and cannot work for
        token-id prompts. If the new node's text departs from what was delivered, the
        next chunk has a higher `attempt` (index 0) and carries the whole text so far:
        as when a node restarts a failed forward itself, a chunk whose `attempt` is
        higher than the previous one means: drop the text received so far.
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
        msg, frame = self._request(
            prompt,
            self.tenant if tenant is None else tenant,
            params,
            time.time() + budget,
            _stream,
            request_id,
        )
        rid = msg.request_id
        pending = [endpoint] if endpoint else self._order()
        busy: list[str] = []  # refused: still running an abandoned copy of this request
        backoff = 0.05
        shown = _Shown(rid)
        tries = 0  # sends, numbering the sources of chunks
        failed_over = False  # an attempt failed and the next send is its retry
        last_error: ZmeshError = NoEndpointAvailable(f"no endpoint reachable: {pending}")
        while True:
            if not pending:
                if not busy or time.monotonic() + backoff >= give_up:
                    raise last_error
                await asyncio.sleep(backoff)  # until the cancelled copy is gone
                pending, busy, backoff = busy, [], min(2 * backoff, 1.0)
            address = pending.pop(0)
            ep = self._ep(address)
            try:
                # Quick to pass a refusing node while others are left to try.
                q = await ep.send(frame, rid, self.connect_timeout, patient=not pending)
            except AuthenticationFailed as exc:
                last_error = exc
                self._drop(address)  # stop its reconnect attempts
                continue
            if q is None:
                last_error = self._unreachable(address)
                continue
            tries += 1
            if failed_over:
                self.counters["retries"] += 1
                failed_over = False
            answered = False
            try:
                while True:
                    left = give_up - time.monotonic()
                    try:
                        if left <= 0:
                            raise TimeoutError
                        reply = await asyncio.wait_for(q.get(), left)
                    except TimeoutError:
                        raise RequestTimeout(
                            f"no answer from {address} within {budget:.1f}s"
                        ) from None
                    if reply is None:  # the connection dropped: its replies are lost
                        self.counters["connections_lost"] += 1
                        failed_over = True
                        self._reset(ep)
                        last_error = RequestTimeout(f"lost the connection to {address}")
                        break
                    if isinstance(reply, P.Chunk):
                        if (event := shown.chunk(tries, reply)) is not None:
                            yield event
                        continue
                    answered = True
                    if isinstance(reply, P.Done):
                        if _stream and (event := shown.done(reply)) is not None:
                            yield event
                        yield reply
                        return
                    if isinstance(reply, P.Error):
                        err = RequestError(reply.code, reply.message, reply.node_id)
                        last_error = err
                        if tries > 1 and _is_duplicate(reply):
                            # Not a new attempt: try the next endpoint, or this one
                            # again once the copy is cancelled.
                            self.counters["duplicates_refused"] += 1
                            ep.cancel(rid)  # the copy nobody will receive
                            busy.append(address)
                            break
                        if reply.code not in _RETRYABLE:
                            raise err
                        failed_over = True
                        break
            finally:
                ep.waiters.pop(rid, None)
                if not answered:  # timed out, abandoned by the caller, or lost
                    ep.cancel(rid)

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
        frame = P.encode(P.StatusRequest(request_id=rid))
        try:
            q = await ep.send(frame, rid, min(timeout, self.connect_timeout))
        except AuthenticationFailed:
            self._drop(ep.address)
            raise
        if q is None:
            raise self._unreachable(ep.address)
        try:
            reply = await asyncio.wait_for(q.get(), timeout)
        except TimeoutError:
            raise RequestTimeout(f"no status from {ep.address} within {timeout}s") from None
        finally:
            ep.waiters.pop(rid, None)
        if reply is None:
            raise RequestTimeout(f"lost the connection to {ep.address}")
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

    @property
    def counters(self) -> Counter[str]:
        return self._async.counters

    def stream(self, prompt: str | Sequence[int], **kwargs: Any) -> Iterator[P.Chunk | P.Done]:
        agen = self._async.stream(prompt, **kwargs)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():  # a stream dropped early: cancel it on the node
                self._call(agen.aclose())

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
