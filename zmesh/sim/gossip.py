"""Links and gossip in the simulator: delays, heartbeats, deltas, snapshots, the holder index.

Links have a base delay per pair (lognormal spread) plus jitter, and deliver in order
(one TCP connection per link); gossip messages may be lost. Deltas and heartbeats go
through the real `LocalAdvert` and `PeerTable`/`PeerEstimate`, so gap, epoch and
digest repair and failure detection are the node's own code. With shared estimates
an index (block id -> nodes whose estimate holds it) finds the longest holders.
"""

from __future__ import annotations

import math
from typing import Any

from zmesh.gossip import DEFAULT_SNAPSHOT_PART_BLOCKS
from zmesh.peers import NEED_SNAPSHOT, OK, PeerEstimate
from zmesh.sim.base import SimBase
from zmesh.sim.config import (
    DELIVER,
    FLUSH,
    HB,
    SNAPPARTS,
    SNAPREQ,
    TICK,
)
from zmesh.sim.state import SimNode, View


class GossipMixin(SimBase):
    def _base_delay(self, a: int, b: int) -> float:
        if self.cfg.delay_spread <= 0:
            return self.cfg.delay_s
        key = (a, b) if a < b else (b, a)
        d = self._link_base.get(key)
        if d is None:
            d = self._link_base[key] = self.cfg.delay_s * self.net_rng.lognormvariate(
                0.0, self.cfg.delay_spread
            )
        return d

    def _delay(self, a: int, b: int) -> float:
        base = self._base_delay(a, b)
        if self.cfg.jitter > 0 and base > 0:
            return base * (1.0 + self.cfg.jitter * self.net_rng.expovariate(1.0))
        return base

    def _measured_delay(self, a: int, b: int) -> float:
        """What a node's ping EWMA converges to: the link's mean one-way delay."""
        if self.cfg.delay_spread <= 0:
            return self._mean_delay
        return self._base_delay(a, b) * (1.0 + self.cfg.jitter)

    def _load_changed(self, node: SimNode) -> None:
        node.load_changed = True
        self._schedule_flush(node)

    def _cache_changed(self, node: SimNode) -> None:
        self._schedule_flush(node)

    def _schedule_flush(self, node: SimNode) -> None:
        if node.flush_pending or not node.alive:
            return
        node.flush_pending = True
        ds = self.cfg.delta_s
        k = math.floor((self.now - node.phase) / ds) + 1
        self._push(node.phase + k * ds, FLUSH, node.idx, node.gen)

    def _drain(self, node: SimNode) -> None:
        ev = node.cache.drain_events()
        if ev:
            node.advert.apply(ev.added, ev.removed)

    def _flush_deltas(self, node: SimNode) -> None:
        self._drain(node)
        while (batch := node.advert.flush()) is not None:
            self._send(node, (1, node.epoch, batch.seq, batch.added, batch.removed))

    def _on_flush(self, idx: int, gen: int) -> None:
        node = self.nodes[idx]
        if node.gen != gen or not node.alive:
            return
        node.flush_pending = False
        self._flush_deltas(node)
        if node.load_changed:
            node.load_changed = False
            self._send(node, self._heartbeat(node))

    def _heartbeat(self, node: SimNode) -> tuple[Any, ...]:
        a = node.advert
        return (
            0,
            node.epoch,
            a.seq,
            a.digest,
            a.n_blocks,
            self._queue_depth(node),
            self._backlog(node),
            node.service_ewma,
            sum(1 for s in getattr(node.cache, "slots", ()) if s),  # busy_slots, as a node's
            node.cache.miss_evict_tokens() if self.settings.evict_charge > 0.0 else 0,
        )

    def _on_hb(self, idx: int, gen: int) -> None:
        node = self.nodes[idx]
        if node.gen != gen or not node.alive:
            return
        self._flush_deltas(node)
        node.load_changed = False
        self._send(node, self._heartbeat(node))
        self._push(self.now + self.cfg.heartbeat_s, HB, idx, gen)

    def _send(self, node: SimNode, msg: tuple[Any, ...]) -> None:
        loss = self.cfg.loss
        src = node.idx
        for v, view in enumerate(self.views):
            if view.owner == src:
                continue
            if loss and self.net_rng.random() < loss:
                if msg[0] == 1:
                    self.deltas_lost += 1
                continue
            dst = view.owner if view.owner >= 0 else src
            key = (src, v)
            t = self.now + self._delay(src, dst)
            last = self._fifo.get(key, 0.0)
            if t < last:
                t = last  # one TCP connection per link: messages arrive in order
            self._fifo[key] = t
            self._push(t, DELIVER, v, (src, msg))

    def _on_deliver(self, v: int, payload: tuple[int, tuple[Any, ...]]) -> None:
        src, msg = payload
        view = self.views[v]
        table = view.table
        name = self.names[src]
        now = self.now
        if msg[0] == 0:
            _, epoch, seq, digest, n_blocks, queue, backlog, service, used, evict = msg
            new = table.upsert(name, "", "", now)
            est = table.get(name)
            assert est is not None
            was_alive = not new and est.state.value == "alive"
            before = est.blocks
            action = est.on_heartbeat(
                epoch=epoch,
                seq=seq,
                digest=digest,
                n_blocks=n_blocks,
                now=now,
                queue_depth=queue,
                busy_slots=used,
                n_slots=self.cfg.n_slots,
                prefill_s_per_token=self.cost.prefill_s_per_token,
                service_s=service,
                backlog_s=backlog,
                evict_tokens=evict,
            )
            if not was_alive:
                self._refresh_alive(view)
            if est.blocks is not before:
                self._reindex(view, src, est)
            self._maybe_resync(view, v, src, est, action)
            return
        _, epoch, seq, added, removed = msg
        est = table.get(name)
        if est is None:
            return
        before = est.blocks
        action = est.on_delta(epoch, seq, added, removed, now)
        if view.holders is not None:
            if est.blocks is not before:
                self._reindex(view, src, est)
            elif action.kind == OK:
                self._index_delta(view, src, est, added, removed)
        self._maybe_resync(view, v, src, est, action)

    def _maybe_resync(self, view: View, v: int, src: int, est: PeerEstimate, action: Any) -> None:
        if action.kind != NEED_SNAPSHOT or not est.should_request_snapshot(self.now):
            return
        rid = f"s{next(self._rid)}"
        est.begin_snapshot(rid, self.now)
        self.snapshots += 1
        dst = view.owner if view.owner >= 0 else src
        self._push(self.now + self._delay(dst, src), SNAPREQ, src, (v, rid))

    def _on_snapreq(self, src: int, payload: tuple[int, str]) -> None:
        v, rid = payload
        node = self.nodes[src]
        if not node.alive:
            return  # lost; the estimate asks again after snapshot_timeout_s
        self._flush_deltas(node)  # as Node._send_snapshot: describe exactly the published seq
        parts = node.advert.snapshot_parts(DEFAULT_SNAPSHOT_PART_BLOCKS)
        view = self.views[v]
        dst = view.owner if view.owner >= 0 else src
        self._push(self.now + self._delay(src, dst), SNAPPARTS, v, (src, rid, node.epoch, parts))

    def _on_snapparts(self, v: int, payload: tuple[int, str, int, list[Any]]) -> None:
        src, rid, epoch, parts = payload
        view = self.views[v]
        est = view.table.get(self.names[src])
        if est is None:
            return
        for part in parts:
            before = est.blocks
            action = est.on_snapshot_part(
                rid,
                epoch,
                part.seq,
                part.part,
                part.parts,
                part.blocks,
                part.digest,
                part.n_blocks,
                self.now,
            )
            if est.blocks is not before:
                self._reindex(view, src, est)
            self._maybe_resync(view, v, src, est, action)

    def _on_tick(self, v: int, _: Any) -> None:
        view = self.views[v]
        events = view.table.tick(self.now)
        if events:
            for ev in events:
                p = self.by_name[ev.node_id]
                if ev.kind in ("suspect", "dead"):
                    self._fail_forwards_to(view, p)
                if ev.kind == "dead":
                    self._reindex(view, p, None)
            self._refresh_alive(view)
        self._push(self.now + self.cfg.heartbeat_s, TICK, v)

    def _refresh_alive(self, view: View) -> None:
        by_name = self.by_name
        view.alive = [(by_name[p.node_id], p) for p in view.table.alive()]

    def _fail_forwards_to(self, view: View, peer: int) -> None:
        owners = [view.owner] if view.owner >= 0 else range(len(self.nodes))
        for o in owners:
            for job in list(self.nodes[o].fwd_out.get(peer, ())):
                self._fallback(job)

    def _index_delta(
        self,
        view: View,
        src: int,
        est: PeerEstimate,
        added: list[tuple[int, int]],
        removed: list[int],
    ) -> None:
        holders = view.holders
        assert holders is not None
        mine = view.indexed.setdefault(src, (est.blocks, set()))[1]
        blocks = est.blocks
        for b in removed:
            if b not in blocks and b in mine:
                mine.discard(b)
                s = holders.get(b)
                if s is not None:
                    s.discard(src)
                    if not s:
                        del holders[b]
        for b, _ in added:
            if b in blocks and b not in mine:
                mine.add(b)
                holders.setdefault(b, set()).add(src)

    def _reindex(self, view: View, src: int, est: PeerEstimate | None) -> None:
        holders = view.holders
        if holders is None:
            return
        old = view.indexed.get(src, (None, set()))[1]
        new = set(est.blocks) if est is not None else set()
        for b in old - new:
            s = holders.get(b)
            if s is not None:
                s.discard(src)
                if not s:
                    del holders[b]
        for b in new - old:
            holders.setdefault(b, set()).add(src)
        view.indexed[src] = (est.blocks if est is not None else None, new)
