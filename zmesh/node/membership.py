"""Gossip and membership: what a node tells its peers, and what it learns of them.

`Advertiser` is the outgoing side: cache deltas drained from the engine's tree
(flushed every tick and before a request's Done), heartbeats (load, advert state,
known peers) and the snapshots a peer asks for. `Membership` is the incoming side and
the peer table's upkeep: heartbeats and deltas from the SUB socket, snapshot repair
(gap, epoch, digest), snapshots and pongs coming back, pings out, learning peers from
heartbeats and announcements (up to `gossip.max_peers`), and forgetting silent ones.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Callable
from typing import Any

from zmesh import protocol as P
from zmesh.config import check_address
from zmesh.gossip import LocalAdvert
from zmesh.kvpeer import KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.load import Load
from zmesh.node.transport import Transport
from zmesh.peers import NEED_SNAPSHOT, PeerEstimate


class Advertiser:
    """Our own advertised cache and load, published on the PUB socket."""

    def __init__(self, ctx: NodeContext, transport: Transport, load: Load, epoch: int) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self.epoch = epoch
        self.advert = LocalAdvert(epoch)
        self._fault_rng = random.Random(epoch)

    def _publish_cache_events(self) -> None:
        ev = self._c.engine.drain_events()
        if ev:
            self.advert.apply(ev.added, ev.removed)

    def flush_deltas(self) -> None:
        self._publish_cache_events()
        drop = self._t.faults.current.drop_deltas
        while (batch := self.advert.flush()) is not None:
            if drop and self._fault_rng.random() < drop:
                self._c.count("deltas_dropped_on_purpose")
                continue
            self._t.send(
                self._t.pub,
                [],
                P.CacheDelta(
                    node_id=self._c.node_id,
                    epoch=self.epoch,
                    seq=batch.seq,
                    added=list(batch.added),
                    removed=list(batch.removed),
                ),
            )

    def heartbeat(self) -> P.Heartbeat:
        c, t = self._c, self._t
        st = c.engine.stats
        return P.Heartbeat(
            node_id=c.node_id,
            epoch=self.epoch,
            seq=self.advert.seq,
            sent_at=time.time(),
            serve_addr=t.serve_addr,
            gossip_addr=t.gossip_addr,
            queue_depth=self._load.depth(),
            busy_slots=c.engine.busy_slots(),
            n_slots=c.engine.n_slots,
            n_blocks=self.advert.n_blocks,
            digest=self.advert.digest,
            prefill_s_per_token=st.prefill_s_per_token,
            service_s=st.service_s,
            backlog_s=round(self._load.backlog_s(), 4),
            places=self._load.places(),
            evict_tokens=self._load.miss_evict_tokens(),
            block_size=c.engine.block_size,
            model_fingerprint=c.engine.fingerprint.hex(),
            peers=[
                P.PeerInfo(
                    node_id=p.node_id,
                    serve_addr=p.serve_addr,
                    gossip_addr=p.gossip_addr,
                    public_key=t.peer_keys.get(p.node_id),
                )
                for p in c.peers.alive()
            ],
            public_key=t.keys.public.decode() if t.keys else None,
        )

    def send_snapshot(self, envelope: list[bytes], req: P.SnapshotRequest) -> None:
        self.flush_deltas()  # the snapshot must describe exactly the published seq
        parts = self.advert.snapshot_parts(P.SNAPSHOT_PART_BLOCKS)
        for part in parts:
            self._t.reply(
                envelope,
                P.Snapshot(
                    request_id=req.request_id,
                    node_id=self._c.node_id,
                    epoch=self.epoch,
                    seq=part.seq,
                    part=part.part,
                    parts=part.parts,
                    blocks=list(part.blocks),
                    digest=part.digest,
                    n_blocks=part.n_blocks,
                ),
            )
        self._c.count("snapshots_served")


class Membership:
    """The peer table's upkeep from what peers send us, and our pings to them."""

    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        advertiser: Advertiser,
        kv: KvPeer,
        on_peer_down: Callable[[str], None],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._adv = advertiser
        self._kv = kv
        self._on_peer_down = on_peer_down  # its forwards and KV pulls fall back
        self._peer_refused_logged_at = -math.inf

    # ---- the gossip tick -------------------------------------------------------

    async def gossip_loop(self) -> None:
        g = self._c.config.gossip
        next_hb = 0.0
        while True:
            self._adv.flush_deltas()
            now = time.monotonic()
            if now >= next_hb or self._load.changed:
                # Load changes go out at the next tick, not the next heartbeat period:
                # routing on a stale queue sends work to a node that is already free.
                self._load.changed = False
                self._t.send(self._t.pub, [], self._adv.heartbeat())
            if now >= next_hb:
                next_hb = now + g.heartbeat_interval_s
                self._tick_peers(now)
                self._t.faults.poll()
            await asyncio.sleep(g.delta_interval_s)

    def _tick_peers(self, now: float) -> None:
        peers = self._c.peers
        before = {p.node_id: p for p in peers.all()}
        for event in peers.tick(now):
            if event.kind == "forgotten":  # tick removed it; the sockets go here
                self.forget(before[event.node_id], f"silent over {peers.forget_after_s}s")
                continue
            self._c.log.warning(f"peer.{event.kind}", peer=event.node_id)
            if event.kind in ("suspect", "dead"):
                self._on_peer_down(event.node_id)

    def forget(self, peer: PeerEstimate, why: str) -> None:
        """Drop a peer that has been silent past forget_after_s (or a dead one, to make
        room): close its DEALER and stop subscribing to it, unless a seed or another
        peer uses the same address. Learned again like a new peer if it comes back."""
        self._c.peers.remove(peer.node_id)
        self._on_peer_down(peer.node_id)
        self._kv.costs.forget(peer.node_id)
        self._t.disconnect_peer(peer)
        self._c.count("peers_forgotten")
        self._c.log.warning("peer.forgotten", peer=peer.node_id, serve=peer.serve_addr, why=why)

    # ---- incoming gossip (SUB) ---------------------------------------------------

    async def sub_loop(self) -> None:
        c, faults = self._c, self._t.faults
        while True:
            payload = await self._t.sub.recv()
            try:
                msg = P.decode(payload)
                if faults.cut_off(getattr(msg, "node_id", None)):
                    continue
                if isinstance(msg, P.Heartbeat):
                    self._on_heartbeat(msg)
                elif isinstance(msg, P.CacheDelta):
                    self._on_delta(msg)
                else:
                    c.log.warning("frame.unexpected", socket="sub", type=type(msg).__name__)
            except P.ProtocolError as exc:
                c.count("frames_malformed")
                c.log.warning("frame.malformed", socket="sub", code=exc.code, error=exc.message)
            except Exception as exc:
                c.log.exception("gossip.handler_failed", error=repr(exc))

    def _on_heartbeat(self, hb: P.Heartbeat) -> None:
        c, peers = self._c, self._c.peers
        if hb.node_id == c.node_id:
            return
        now = time.monotonic()
        if (
            hb.model_fingerprint != c.engine.fingerprint.hex()
            or hb.block_size != c.engine.block_size
        ):
            c.count("peers_incompatible")
            return  # another model: its ids can never match ours
        if self._bad_peer_address(hb.node_id, hb.serve_addr, hb.gossip_addr):
            return
        if not self._room_for(hb.node_id):
            return
        c.metrics.heartbeat(hb.node_id, hb.sent_at, hb.seq)
        if peers.upsert(hb.node_id, hb.serve_addr, hb.gossip_addr, now):
            c.log.info("peer.joined", peer=hb.node_id, serve=hb.serve_addr)
        self._t.connect_peer(hb.serve_addr, hb.gossip_addr, hb.public_key, hb.node_id)
        for info in hb.peers:
            if (
                info.node_id != c.node_id
                and peers.get(info.node_id) is None
                and not self._bad_peer_address(info.node_id, info.serve_addr, info.gossip_addr)
                and self._room_for(info.node_id)
            ):
                peers.upsert(info.node_id, info.serve_addr, info.gossip_addr, now, heard=False)
                self._t.connect_peer(
                    info.serve_addr, info.gossip_addr, info.public_key, info.node_id
                )
        peer = peers.get(hb.node_id)
        assert peer is not None
        action = peer.on_heartbeat(
            epoch=hb.epoch,
            seq=hb.seq,
            digest=hb.digest,
            n_blocks=hb.n_blocks,
            now=now,
            queue_depth=hb.queue_depth,
            busy_slots=hb.busy_slots,
            n_slots=hb.n_slots,
            prefill_s_per_token=hb.prefill_s_per_token,
            service_s=hb.service_s,
            backlog_s=hb.backlog_s,
            places=hb.places,
            evict_tokens=hb.evict_tokens,
        )
        self._maybe_resync(peer, action, now)

    def _on_delta(self, d: P.CacheDelta) -> None:
        peer = self._c.peers.get(d.node_id)
        if peer is None or d.node_id == self._c.node_id:
            return
        now = time.monotonic()
        action = peer.on_delta(d.epoch, d.seq, d.added, d.removed, now)
        self._maybe_resync(peer, action, now)

    def _maybe_resync(self, peer: PeerEstimate, action: Any, now: float) -> None:
        if action.kind != NEED_SNAPSHOT or not peer.should_request_snapshot(now):
            return
        dealer = self._t.dealer_for(peer)
        rid = os.urandom(8).hex()
        if dealer is None or not self._t.send(
            dealer, [], P.SnapshotRequest(request_id=rid, node_id=self._c.node_id)
        ):
            return
        peer.begin_snapshot(rid, now)
        self._c.count("snapshots_requested")
        log = self._c.log
        emit = log.info if action.reason in ("new_peer", "epoch") else log.warning
        emit(
            "gossip.gap" if action.reason in ("gap", "digest") else "peer.resync",
            peer=peer.node_id,
            reason=action.reason,
            seq=peer.seq,
        )

    # ---- replies on our DEALERs --------------------------------------------------

    def on_snapshot(self, msg: P.Snapshot) -> None:
        peer = self._c.peers.get(msg.node_id)
        if peer is None:
            return
        now = time.monotonic()
        action = peer.on_snapshot_part(
            msg.request_id,
            msg.epoch,
            msg.seq,
            msg.part,
            msg.parts,
            msg.blocks,
            msg.digest,
            msg.n_blocks,
            now,
        )
        if peer.synced and msg.part == msg.parts - 1:
            self._c.log.info(
                "gossip.snapshot", peer=peer.node_id, seq=peer.seq, n_blocks=peer.n_blocks
            )
        self._maybe_resync(peer, action, now)

    def on_pong(self, msg: P.Pong) -> None:
        peer = self._c.peers.get(msg.node_id)
        if peer is not None:
            peer.observe_rtt(time.time() - msg.sent_at)

    # ---- learning peers ------------------------------------------------------------

    def _bad_peer_address(self, node_id: str, serve: str, gossip: str) -> bool:
        """Whether a peer's advertised addresses are unusable (then it is not learned:
        zmq would refuse to connect to them anyway)."""
        why = check_address(serve, bind=False) or check_address(gossip, bind=False)
        if why is None:
            return False
        self._c.count("peers_bad_address")
        self._c.log.warning("peer.bad_address", peer=node_id, error=why)
        return True

    def _room_for(self, node_id: str) -> bool:
        """Whether a peer may be kept: a known one always, a new one while the table is
        below gossip.max_peers. Refusals are counted; logged at most every 10 s, since
        every heartbeat that lists the refused peers would repeat them."""
        c, peers = self._c, self._c.peers
        if node_id in peers or len(peers) < c.config.gossip.max_peers:
            return True
        # Full: a dead peer gives way (churn of short-lived names must not lock us).
        if (victim := peers.longest_dead()) is not None:
            peer = peers.get(victim)
            assert peer is not None
            self.forget(peer, "table full")
            return True
        c.count("peers_refused_full")
        now = time.monotonic()
        if now - self._peer_refused_logged_at >= 10.0:
            self._peer_refused_logged_at = now
            c.log.warning(
                "peer.refused",
                peer=node_id,
                max_peers=c.config.gossip.max_peers,
                refused_so_far=c.counters["peers_refused_full"],
            )
        return False

    def learn_of(self, info: P.PeerInfo) -> None:
        """A node we have not heard of pinged us: subscribe to it so its heartbeat comes."""
        c = self._c
        if info.node_id == c.node_id or c.peers.get(info.node_id) is not None:
            return
        if self._bad_peer_address(info.node_id, info.serve_addr, info.gossip_addr):
            return
        if not self._room_for(info.node_id):
            return
        c.peers.upsert(
            info.node_id, info.serve_addr, info.gossip_addr, time.monotonic(), heard=False
        )
        self._t.connect_peer(info.serve_addr, info.gossip_addr, info.public_key, info.node_id)
        c.log.info("peer.announced", peer=info.node_id, serve=info.serve_addr)

    async def ping_loop(self) -> None:
        c, t = self._c, self._t
        me = P.PeerInfo(
            node_id=c.node_id,
            serve_addr=t.serve_addr,
            gossip_addr=t.gossip_addr,
            public_key=t.keys.public.decode() if t.keys else None,
        )
        while True:
            await asyncio.sleep(c.config.gossip.ping_interval_s)
            for peer in c.peers.alive():
                dealer = t.dealer_for(peer)
                if dealer is not None:
                    ping = P.Ping(request_id="ping", sent_at=time.time(), sender=me)
                    t.send(dealer, [], ping)
