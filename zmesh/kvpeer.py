"""A node's side of KV shipping: answering peers' fetches, and pulling a prefix.

Holder: a `KvFetch` from a mesh node is answered with the state of the longest prefix
of its tokens that a slot of the tenant's namespace holds, exported on the engine
thread between two decode steps of whatever request runs there (the running request
pauses for about the export's 10-20 ms; it never waits for a whole request), and sent
as `KvPart`s. Anything it will not ship (no such prefix, another tenant's, over the
asker's cap) gets the same `kv_unavailable` error, so a fetch learns nothing.

Requester: `fetch` asks the holder over its DEALER and assembles the parts under the
cap and a deadline; the node imports the state on its own engine thread just before it
serves the request (`load`: engine work only), then records the import on its loop
(`record_import`: counters, log, cost). Every transfer feeds `ShipCosts` (bytes per
token, per-link bandwidth, import seconds), which routing reads through
`ship_s_per_token`; only the loop writes it.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq.asyncio

from zmesh import protocol as P
from zmesh.candidates import DEFAULT_LINK_DELAY_S
from zmesh.config import RoutingConfig
from zmesh.engine import Engine
from zmesh.kvstate import KvRefused, KvState
from zmesh.kvtransfer import Assembly, ShipCosts, split
from zmesh.peers import PeerEstimate

NO_STATE = "no KV state to ship for this request"
MAX_CONCURRENT_EXPORTS = 2


class KvFetchFailed(Exception):
    """A pull that brought nothing usable; the request is prefilled locally instead."""


class KvPeer:
    def __init__(
        self,
        engine: Engine,
        config: RoutingConfig,
        namespace_of: Callable[[str], str],
        on_engine: Callable[[Callable[[], Any]], Awaitable[Any]],
        send: Callable[[zmq.asyncio.Socket, list[bytes], P.Message], bool],
        serve: Callable[[], zmq.asyncio.Socket],
        count: Callable[..., None],
        log: Any,
    ) -> None:
        self.engine = engine
        self.config = config
        self._namespace_of = namespace_of
        self._on_engine = on_engine
        self._send = send
        self._serve = serve
        self._count = count
        self.log = log
        self.max_bytes = int(config.ship_max_mb * 1024 * 1024)
        self.costs = ShipCosts(
            start_bytes_per_token=config.ship_bytes_per_token,
            start_import_s_per_byte=config.ship_import_s_per_mb / (1024 * 1024),
            start_bandwidth_bps=config.ship_bandwidth_mbps * 1e6 / 8,
        )
        self._pulls: dict[str, tuple[str, asyncio.Queue[Any]]] = {}  # fetch id -> peer
        # Exports answered at once: each holds up to max_bytes until it is sent.
        self._exports = asyncio.Semaphore(MAX_CONCURRENT_EXPORTS)

    # ---- holder ------------------------------------------------------------

    async def serve_fetch(self, envelope: list[bytes], msg: P.KvFetch) -> None:
        """Answer one fetch: the state in parts, or one `kv_unavailable` error."""
        if not 1 <= len(msg.tenant) <= P.MAX_ID_CHARS or not msg.tokens:
            self._refuse(envelope, msg, "bad fetch")
            return
        if msg.deadline is not None and time.time() > msg.deadline:
            self._refuse(envelope, msg, "deadline passed")
            return
        ns = self._namespace_of(msg.tenant)
        tokens = msg.tokens[: self.engine.max_prompt_tokens]
        async with self._exports:
            t0 = time.perf_counter()
            try:
                state: KvState | None = await self._on_engine(
                    # Less than a pull's minimum (a shared BOS, say) is not worth a transfer.
                    lambda: self.engine.export_prefix(tokens, ns, self.config.ship_min_tokens)
                )
            except Exception as exc:  # an engine failure must not take the node down
                self.log.warning("kv.export_failed", request_id=msg.request_id, error=repr(exc))
                state = None
            cap = min(msg.max_bytes, self.max_bytes)
            if state is None or len(state.payload) > cap:
                self._refuse(envelope, msg, "nothing held" if state is None else "over the cap")
                return
            export_s = time.perf_counter() - t0
            self.costs.observe_state(state.n_tokens, len(state.payload))
            for part in split(state, msg.request_id):
                self._send(self._serve(), envelope, part)
        self._count("kv_served")
        self._count("kv_served_bytes", len(state.payload))
        self.log.info(
            "kv.served",
            request_id=msg.request_id,
            tokens=state.n_tokens,
            bytes=len(state.payload),
            export_s=round(export_s, 6),
        )

    def _refuse(self, envelope: list[bytes], msg: P.KvFetch, why: str) -> None:
        self._count("kv_refused")
        self.log.info("kv.refused", request_id=msg.request_id, why=why)
        err = P.Error(
            request_id=msg.request_id, code=P.KV_UNAVAILABLE, message=NO_STATE, node_id=None
        )
        self._send(self._serve(), envelope, err)

    # ---- requester ---------------------------------------------------------

    def start_pull(
        self,
        holder: str,
        peer: PeerEstimate | None,
        dealer: zmq.asyncio.Socket | None,
        tokens: list[int],
        msg: P.Generate,
    ) -> asyncio.Task[KvState] | None:
        """Start pulling ``tokens``' state from ``holder`` for a "shipped" decision, while
        the job queues; None when the holder cannot be asked (logged and counted as a
        failed fetch, as a pull that fails later is)."""
        if peer is None or dealer is None:
            self._count("kv_fetch_failed")
            self.log.warning(
                "request.fallback",
                request_id=msg.request_id,
                target=holder,
                why="KV pull failed: holder not connected",
            )
            return None
        link = peer.link_delay_s or DEFAULT_LINK_DELAY_S
        return asyncio.create_task(
            self.fetch(dealer, peer.node_id, link, msg.tenant, tokens, msg.deadline, msg.request_id)
        )

    def on_reply(self, msg: P.KvPart | P.Error) -> bool:
        """A holder's reply; False if it belongs to no pull of ours."""
        pull = self._pulls.get(msg.request_id or "")
        if pull is None:
            return False
        pull[1].put_nowait(msg)
        return True

    async def fetch(
        self,
        dealer: zmq.asyncio.Socket,
        peer: str,
        link_delay_s: float,
        tenant: str,
        tokens: list[int],
        deadline: float | None,
        request_id: str,
    ) -> KvState:
        """Pull the holder's state for ``tokens``; raises `KvFetchFailed`."""
        fid = os.urandom(8).hex()
        timeout = self.config.ship_timeout_s
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.time(), 0.0))
        asm = Assembly(max_bytes=self.max_bytes)
        replies: asyncio.Queue[Any] = asyncio.Queue()
        self._pulls[fid] = (peer, replies)
        t0 = time.monotonic()
        give_up = t0 + timeout
        ask = P.KvFetch(
            request_id=fid,
            tenant=tenant,
            tokens=tokens,
            max_bytes=self.max_bytes,
            deadline=time.time() + timeout,
        )
        try:
            if not self._send(dealer, [], ask):
                raise KvFetchFailed(f"{peer} not connected")
            while True:
                left = give_up - time.monotonic()
                try:
                    reply = await asyncio.wait_for(replies.get(), max(left, 0.0))
                except TimeoutError:
                    raise KvFetchFailed(f"no complete state from {peer} in {timeout:g}s") from None
                if reply is None:
                    raise KvFetchFailed(f"{peer} failed")
                if isinstance(reply, P.Error):
                    raise KvFetchFailed(f"{peer}: {reply.message}")
                try:
                    state = asm.add(reply)
                except KvRefused as exc:
                    raise KvFetchFailed(f"{peer}: {exc.message}") from exc
                if state is not None:
                    break
        finally:
            self._pulls.pop(fid, None)
        if state.header.tokens != tokens[: state.n_tokens]:
            raise KvFetchFailed(f"{peer} sent the state of other tokens")
        seconds = time.monotonic() - t0
        self.costs.observe_transfer(peer, len(state.payload), seconds, link_delay_s)
        self.costs.observe_state(state.n_tokens, len(state.payload))
        self._count("kv_fetched")
        self._count("kv_fetched_bytes", len(state.payload))
        self.log.info(
            "kv.fetched",
            request_id=request_id,
            peer=peer,
            tokens=state.n_tokens,
            bytes=len(state.payload),
            wire_s=round(seconds, 6),
        )
        return state

    def fail_pulls(self, peer: str) -> None:
        """Pulls from ``peer`` end now (it turned suspect): prefill locally instead."""
        for holder, replies in self._pulls.values():
            if holder == peer:
                replies.put_nowait(None)

    def load(self, state: KvState, tenant: str, free_only: bool = False) -> Imported:
        """On the engine thread: load a pulled state into a slot (``free_only``: a
        holder's push, into an empty one only). Engine work only: what it cost and
        counts is recorded on the loop (`record_import`), which owns the counters and
        the costs routing reads."""
        t0 = time.perf_counter()
        try:
            n = self.engine.import_prefix(state, self._namespace_of(tenant), free_only=free_only)
        except KvRefused as exc:
            return Imported(state, 0, 0.0, exc)
        return Imported(state, n, time.perf_counter() - t0)

    def record_import(self, done: Imported, request_id: str) -> int:
        """On the loop: count and log an import, feed its cost to routing; returns the
        tokens that came over usefully (0 if refused, or a slot already held them all)."""
        if done.refused is not None:
            self._count("kv_import_refused")
            self.log.warning(
                "kv.import_refused",
                request_id=request_id,
                reason=done.refused.reason,
                error=done.refused.message,
            )
            return 0
        if done.new_tokens == 0:
            return 0  # a slot here already held all of it: nothing came over usefully
        self.costs.observe_import(len(done.state.payload), done.seconds)
        self.log.info(
            "kv.imported",
            request_id=request_id,
            tokens=done.state.n_tokens,
            new_tokens=done.new_tokens,
            import_s=round(done.seconds, 6),
        )
        return done.state.n_tokens


@dataclass(frozen=True, slots=True)
class Imported:
    """What `KvPeer.load` did on the engine thread, for `KvPeer.record_import`."""

    state: KvState
    new_tokens: int  # tokens cached here that were not before
    seconds: float
    refused: KvRefused | None = None
