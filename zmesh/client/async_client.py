"""`AsyncClient`: generate, stream and status over asyncio, with failover across
endpoints within one timeout (one answer delivered, whatever the retries)."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import zmq.asyncio

from zmesh import protocol as P
from zmesh.client.endpoint import Endpoint
from zmesh.client.errors import (
    AuthenticationFailed,
    NoEndpointAvailable,
    RequestError,
    RequestTimeout,
    ZmeshError,
)
from zmesh.client.shown import Shown
from zmesh.security import KeyPair, SecurityError, load_keypair, load_public_key

# Errors worth retrying on another node; the rest would fail anywhere.
_RETRYABLE = {P.OVERLOADED, P.UNAVAILABLE, P.INTERNAL}


def _is_duplicate(err: P.Error) -> bool:
    """The node still runs a copy of this request id (our abandoned attempt, or the
    copy its dead entry node forwarded to it). The node has no code of its own for it."""
    return err.code == P.INVALID_REQUEST and "already in flight" in err.message


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
        self._eps: dict[str, Endpoint] = {}

    def _ep(self, address: str) -> Endpoint:
        if address not in self._eps:
            server_key = None
            if self._keys is not None:
                server_key = self._server_keys.get(address, self._default_server_key)
                if server_key is None:
                    raise NoEndpointAvailable(f"no server key known for {address}")
            self._eps[address] = Endpoint(self._ctx, address, self.counters, self._keys, server_key)
        return self._eps[address]

    def _reset(self, ep: Endpoint) -> None:
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
        # Params are checked once, with the whole request, by `_request` (the wire
        # boundary's `validate_generate`), before anything is sent.
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
        shown = Shown(rid)
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
