"""Holder push (`routing.ship_push`, off by default): a busy holder offers a hot prefix
to an idle peer, which pulls it with the ordinary KV pull into a free slot.

Holder: every gossip tick (`tick`) it groups the requests waiting in its queue by the
prefix of theirs its own cache holds (whole blocks, at most ``ship_max_tokens``); the
group with the most requests is the hot prefix. `routing.shipping.push_decision`, on
peer candidates priced as a pull is (`candidates.ship_s_per_token`, `ship_fixed_s`),
says whether to offer it and to whom; one `KvOffer` goes out, at most one in flight
(until its reply, or ``ship_timeout_s``), at most one per ``ship_push_interval_s``.
Every decision that could have offered is one `kv.push_decided` line with its costs.

Peer: a `KvOffer` is validated (`protocol.validate_offer`; only from a known peer),
answered by `routing.shipping.push_accept` (a free slot, a prefix not held) in one
`KvOfferReply` and one `kv.offer_answered` line, and, accepted, pulled from the holder
(`KvPeer.fetch`) and imported on the engine thread into an empty slot only
(`Engine.import_prefix(..., free_only=True)`: a push evicts nothing). The import's tree
events are advertised by the next gossip tick, and routing sends the prefix's later
requests here as to any holder.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from zmesh import protocol as P
from zmesh.candidates import (
    DEFAULT_LINK_DELAY_S,
    DEFAULT_PREFILL_S_PER_TOKEN,
    DEFAULT_SERVICE_S,
    peer_candidate,
    ship_fixed_s,
)
from zmesh.kvpeer import Imported, KvFetchFailed, KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.load import Load
from zmesh.node.transport import Transport
from zmesh.routing import RoutingSettings
from zmesh.routing.shipping import (
    ACCEPT,
    PUSH_OFF,
    PUSH_OFFER,
    PushDecision,
    hot_prefix,
    push_accept,
    push_decision,
)

# Why a decision is not logged: nothing could have been offered, every tick.
_QUIET = frozenset({PUSH_OFF, "in_flight", "rate_limited", "not_hot"})


class HotPrefix:
    """The prefix most waiting requests share, as this node holds it."""

    __slots__ = ("block_ids", "held", "queued", "tenant", "tokens")

    def __init__(
        self, tenant: str, tokens: list[int], block_ids: list[int], queued: int, held: int
    ) -> None:
        self.tenant = tenant
        self.tokens = tokens  # what is offered (at most ship_max_tokens)
        self.block_ids = block_ids
        self.queued = queued
        self.held = held  # cached here by each of them, past the cap too


class KvPush:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        kv: KvPeer,
        settings: RoutingSettings,
        on_engine: Callable[[Callable[[], Any]], Awaitable[Any]],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._kv = kv
        self.settings = settings
        self._on_engine = on_engine
        # Holder: the offer in flight (id, peer, sent at), the last offer's time, and
        # (peer, prefix id) pairs offered lately, not offered again for a while.
        self._in_flight: tuple[str, str, float, PushDecision] | None = None
        self._last = -float("inf")
        self._logged = -float("inf")  # the last kv.push_decided line
        self._recent: dict[tuple[str, int], float] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- holder -----------------------------------------------------------------

    async def loop(self) -> None:
        """Check for a hot prefix every gossip tick (only with ``ship_push`` on)."""
        if not self.settings.ship_push:
            return
        while True:
            await asyncio.sleep(self._c.config.gossip.delta_interval_s)
            try:
                self.tick()
            except Exception as exc:  # a bug must cost an offer, not the node
                self._c.log.exception("kv.push_failed", error=repr(exc))

    def hot_prefix(self) -> HotPrefix | None:
        """`routing.shipping.hot_prefix` over the waiting jobs, matched again now."""
        eng = self._c.engine
        jobs = [j.req for j in list(self._load.queue)]
        waiting = [
            (eng.local_match(r.tokens, r.namespace), r.block_ids, len(r.tokens)) for r in jobs
        ]
        hot = hot_prefix(waiting, eng.block_size, self.settings)
        if hot is None:
            return None
        i, n, queued, held = hot
        r = jobs[i]
        tokens = r.tokens[: n * eng.block_size]
        return HotPrefix(r.msg.tenant, tokens, r.block_ids[:n], queued, held)

    def tick(self) -> None:
        c = self._c
        now = time.monotonic()
        if (
            self._in_flight is not None
            and now - self._in_flight[2] > self._kv.config.ship_timeout_s
        ):
            c.log.info("kv.offer_expired", offer_id=self._in_flight[0], to=self._in_flight[1])
            self._in_flight = None
        if self._in_flight is not None or now - self._last < self.settings.ship_push_interval_s:
            return  # push_decision would say so: spare the queue scan
        hot = self.hot_prefix()
        if hot is None:
            return
        self._recent = {k: t for k, t in self._recent.items() if now - t < self._forget_s()}
        head = hot.block_ids[-1]
        exclude = {peer for peer, h in self._recent if h == head}
        bs = c.engine.block_size
        # A peer's own rates once it advertises them (peer_candidate), else ours.
        st = c.engine.stats
        prefill = st.prefill_s_per_token or DEFAULT_PREFILL_S_PER_TOKEN
        service = st.service_s or DEFAULT_SERVICE_S
        peers = []
        for peer in c.peers.alive():
            link = peer.link_delay_s or DEFAULT_LINK_DELAY_S
            peers.append(
                peer_candidate(
                    peer,
                    peer.match_blocks(hot.block_ids) * bs,
                    inflight=peer.inflight,
                    unreported_s=0.0,
                    link_delay_s=link,
                    prefill_s_per_token=prefill,
                    service_s=service,
                    ship_s_per_token=self._kv.costs.ship_s_per_token(peer.node_id),
                    ship_fixed_s=ship_fixed_s(link),
                )
            )
        d = push_decision(
            hot.held,
            hot.queued,
            self._load.backlog_s(),
            peers,
            self.settings,
            in_flight=self._in_flight is not None,
            since_last_s=now - self._last,
            exclude=exclude,
            # Every slot holds something by its last heartbeat: it would refuse.
            full={p.node_id for p in c.peers.alive() if 0 < p.n_slots <= p.busy_slots},
            block_size=bs,
        )
        if d.why in _QUIET:
            return
        if d.why != PUSH_OFFER and now - self._logged < self.settings.ship_push_interval_s:
            return  # a hot prefix with no offer: said once per interval, not every tick
        self._logged = now
        offer_id = os.urandom(8).hex()
        sent = False
        if d.why == PUSH_OFFER and d.to is not None:
            sent = self._send_offer(offer_id, d.to, hot)
            if sent:
                self._in_flight = (offer_id, d.to, now, d)
                self._last = now
                self._recent[(d.to, head)] = now
                c.count("kv_offers_sent")
        c.log.info(
            "kv.push_decided",
            offer_id=offer_id if sent else None,
            tenant=hot.tenant,
            sent=sent,
            **d.log_fields(),
        )

    def _forget_s(self) -> float:
        # Long enough for an accepted push to show in the peer's gossip.
        return max(self.settings.ship_push_interval_s, self._kv.config.ship_timeout_s) * 2

    def _send_offer(self, offer_id: str, to: str, hot: HotPrefix) -> bool:
        peer = self._c.peers.get(to)
        dealer = self._t.dealer_for(peer) if peer is not None else None
        if dealer is None:
            return False
        offer = P.KvOffer(
            request_id=offer_id, node_id=self._c.node_id, tenant=hot.tenant, tokens=hot.tokens
        )
        return self._t.send(dealer, [], offer)

    def on_reply(self, msg: P.KvOfferReply | P.Error) -> bool:
        """A peer's answer to our offer; False if it answers none of ours."""
        fl = self._in_flight
        if fl is None or msg.request_id != fl[0]:
            return False
        self._in_flight = None
        if isinstance(msg, P.Error):
            accepted, why = False, f"{msg.code}: {msg.message}"
        else:
            accepted, why = msg.accepted, msg.why
        self._c.count("kv_offers_accepted" if accepted else "kv_offers_refused")
        d = fl[3]
        self._c.log.info(
            "kv.offer_reply",
            offer_id=fl[0],
            to=fl[1],
            accepted=accepted,
            why=why,
            reply_s=round(time.monotonic() - fl[2], 6),
            # The costs the offer was made on (kv.push_decided).
            tokens=d.tokens,
            wait_here_s=round(d.wait_here_s, 6),
            ship_s=round(d.ship_s, 6),
            peer_s=round(d.peer_s, 6),
        )
        return True

    # ---- offered peer --------------------------------------------------------------

    def on_offer(self, envelope: list[bytes], msg: P.KvOffer) -> None:
        c, eng = self._c, self._c.engine
        try:
            P.validate_offer(msg, eng.max_prompt_tokens)
            if c.peers.get(msg.node_id) is None:
                raise P.ProtocolError(
                    P.INVALID_REQUEST, f"KV offer from unknown node {msg.node_id!r}", msg.request_id
                )
            if any(t >= eng.n_vocab for t in msg.tokens):
                raise P.ProtocolError(
                    P.INVALID_REQUEST, "KV offer: token id outside the vocabulary", msg.request_id
                )
        except P.ProtocolError as exc:
            c.count("kv_offers_invalid")
            c.log.warning("kv.offer_invalid", offer_id=msg.request_id, error=exc.message)
            self._t.reply(envelope, P.error_for(exc, c.node_id))
            return
        ns = c.namespace(msg.tenant)
        held = eng.local_match(msg.tokens, ns)
        free = eng.free_slots()
        why = push_accept(len(msg.tokens), held, free, self.settings, pulling=bool(self._tasks))
        accepted = why == ACCEPT
        c.count("kv_offers_taken" if accepted else "kv_offers_declined")
        c.log.info(
            "kv.offer_answered",
            offer_id=msg.request_id,
            holder=msg.node_id,
            tokens=len(msg.tokens),
            held=held,
            free_slots=free,
            accepted=accepted,
            why=why,
            wait_here_s=round(self._load.backlog_s(), 6),
        )
        self._t.reply(
            envelope,
            P.KvOfferReply(
                request_id=msg.request_id, node_id=c.node_id, accepted=accepted, why=why
            ),
        )
        if accepted:
            task = asyncio.create_task(self._pull(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pull(self, msg: P.KvOffer) -> None:
        """The accepted offer: the ordinary pull, imported into an empty slot only."""
        c = self._c
        peer = c.peers.get(msg.node_id)
        dealer = self._t.dealer_for(peer) if peer is not None else None
        if peer is None or dealer is None:
            c.count("kv_push_failed")
            c.log.warning("kv.push_failed", offer_id=msg.request_id, why="holder not connected")
            return
        link = peer.link_delay_s or DEFAULT_LINK_DELAY_S
        try:
            state = await self._kv.fetch(
                dealer, peer.node_id, link, msg.tenant, msg.tokens, None, msg.request_id
            )
        except KvFetchFailed as exc:
            c.count("kv_push_failed")
            c.log.warning("kv.push_failed", offer_id=msg.request_id, why=str(exc))
            return
        try:
            done: Imported = await self._on_engine(
                lambda: self._kv.load(state, msg.tenant, free_only=True)
            )
        except Exception as exc:  # the engine closed under it: nothing imported
            c.count("kv_push_failed")
            c.log.warning("kv.push_failed", offer_id=msg.request_id, why=repr(exc))
            return
        tokens = self._kv.record_import(done, msg.request_id)
        if tokens:
            c.count("kv_pushed")
            c.count("kv_pushed_tokens", tokens)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
