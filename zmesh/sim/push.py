"""Holder push in the simulator (`routing.ship_push`): the decision code a node runs.

Whenever a request queues at a node (`_maybe_push`, from `serving._enqueue`; a node
checks every gossip tick instead), the node takes the hot prefix of its queue
(`routing.shipping.hot_prefix`, on its real cache) and asks
`routing.shipping.push_decision`, on peer candidates built from its real `PeerTable`
view and priced as a pull is (`_ship_terms`), whether to offer it and to whom. The
offer reaches the peer after the link delay; the peer answers with
`routing.shipping.push_accept` on its real cache (a free slot: empty and not held by a
running request; a prefix it does not hold); its answer reaches the holder after the
link delay (the offer is in flight until then). Accepted, the peer's fetch reaches
the holder, which exports the prefix as for a pull (`ShippingMixin._export`: pausing
what it runs, one transfer per link direction), and the peer imports it into an empty
slot (`SlotCache.import_free`); its adverts then carry it like any cached prefix.
The import's seconds are not charged to the peer's worker (it is idle by then, or
the import runs between its steps): a small optimism, at most ~22 ms per push.
"""

from __future__ import annotations

from typing import Any

from zmesh.candidates import peer_candidate
from zmesh.routing.shipping import ACCEPT, PUSH_OFFER, hot_prefix, push_accept, push_decision
from zmesh.sim.base import SimBase
from zmesh.sim.config import KV_OFFER, KV_OFFER_REPLY, KV_PUSH_FETCH, KV_PUSH_READY, QUEUED
from zmesh.sim.state import SimNode


class PushMixin(SimBase):
    def _push_init(self) -> None:
        self.push_stats = {"offers": 0, "accepted": 0, "imported": 0, "tokens": 0}
        self.push_refused: dict[str, int] = {}
        self.push_why: dict[str, int] = {}  # decisions on a hot prefix, by why
        self._push_in_flight: dict[int, float] = {}  # holder -> when its offer went
        self._push_last: dict[int, float] = {}
        self._push_recent: dict[tuple[int, int, int], float] = {}  # (holder, peer, head)
        self._push_pulling: set[int] = set()  # peers with a pushed prefix on its way

    def _maybe_push(self, node: SimNode) -> None:
        s = self.settings
        if not hasattr(self, "push_stats"):
            self._push_init()
        self._on_push_expiry()
        bs = self.cfg.block_size
        jobs = [j for j in node.queue if j.state == QUEUED]
        hot = hot_prefix(((node.cache.match(j.tokens), j.ids, len(j.tokens)) for j in jobs), bs, s)
        if hot is None:
            return
        i, n, queued, held = hot
        job = jobs[i]
        head = job.ids[n - 1]
        forget = 2 * max(s.ship_push_interval_s, self.cfg.ship_timeout_s)
        exclude = {
            self.names[p]
            for (h, p, hd), t in self._push_recent.items()
            if h == node.idx and hd == head and self.now - t < forget
        }
        view = self.views[self.view_of[node.idx]]
        service = node.service_ewma or self.cost.service_s(len(job.tokens), 1)
        peers = []
        for p, est in view.alive:
            if p == node.idx:
                continue
            link = self._measured_delay(node.idx, p)
            per_token, fixed = self._ship_terms(p, node.idx, link)
            peers.append(
                peer_candidate(
                    est,
                    est.match_blocks(job.ids[:n]) * bs,
                    inflight=node.inflight.get(p, 0),
                    unreported_s=0.0,  # as a node's holder side (node/push.py) builds it
                    link_delay_s=link,
                    prefill_s_per_token=self.cost.prefill_s_per_token,
                    service_s=service,
                    ship_s_per_token=per_token,
                    ship_fixed_s=fixed,
                )
            )
        d = push_decision(
            held,
            queued,
            self._backlog(node),
            peers,
            s,
            in_flight=node.idx in self._push_in_flight,
            since_last_s=self.now - self._push_last.get(node.idx, -1e18),
            exclude=exclude,
            full={est.node_id for _, est in view.alive if 0 < est.n_slots <= est.busy_slots},
            block_size=bs,
        )
        if d.why not in ("in_flight", "rate_limited", "not_hot"):
            self.push_why[d.why] = self.push_why.get(d.why, 0) + 1
        if d.why != PUSH_OFFER or d.to is None:
            return
        to = self.by_name[d.to]
        self.push_stats["offers"] += 1
        self._push_in_flight[node.idx] = self.now
        self._push_last[node.idx] = self.now
        self._push_recent[(node.idx, to, head)] = self.now
        offer = (node.idx, node.gen, to, tuple(job.tokens[: n * bs]), job.ids[:n])
        self._push(self.now + self._delay(node.idx, to), KV_OFFER, offer, None)

    def _busy_slots(self, node: SimNode) -> set[int]:
        return {j.claim.slot for j in node.running if j.claim is not None}

    def _on_kv_offer(self, offer: tuple[Any, ...], _: Any) -> None:
        holder, gen, to, tokens, _ = offer
        peer = self.nodes[to]
        back = self.now + self._delay(to, holder)
        if not peer.alive:
            return  # no answer: the holder's offer expires (ship_timeout_s)
        free = len(peer.cache.free_slots(self._busy_slots(peer)))
        pulling = to in self._push_pulling
        why = push_accept(
            len(tokens), peer.cache.match(tokens), free, self.settings, pulling=pulling
        )
        self._push(back, KV_OFFER_REPLY, holder, gen)
        if why != ACCEPT:
            self.push_refused[why] = self.push_refused.get(why, 0) + 1
            return
        self.push_stats["accepted"] += 1
        self._push_pulling.add(to)
        self._push(back, KV_PUSH_FETCH, offer, None)

    def _on_kv_offer_reply(self, holder: int, gen: int) -> None:
        self._push_in_flight.pop(holder, None)

    def _on_kv_push_fetch(self, offer: tuple[Any, ...], _: Any) -> None:
        holder_idx, gen, to, tokens, ids = offer
        holder = self.nodes[holder_idx]
        n = min(holder.cache.match(tokens), len(tokens))
        if not holder.alive or holder.gen != gen or n < self.settings.ship_min_tokens:
            self._push_pulling.discard(to)  # the peer's fetch fails (or times out)
            return
        n -= n % self.cfg.block_size
        self._push(self._export(holder, to, n), KV_PUSH_READY, (to, tokens[:n], ids), None)

    def _on_kv_push_ready(self, got: tuple[Any, ...], _: Any) -> None:
        to, tokens, ids = got
        peer = self.nodes[to]
        self._push_pulling.discard(to)
        if not peer.alive:
            return
        bs = self.cfg.block_size
        new = peer.cache.import_free(
            tokens, ids[: len(tokens) // bs], self.now, self._busy_slots(peer)
        )
        if new:
            self.push_stats["imported"] += 1
            self.push_stats["tokens"] += new
            self._cache_changed(peer)

    def _on_push_expiry(self) -> None:
        """Offers whose answer never came (the peer died) expire, as a node's do."""
        timeout = self.cfg.ship_timeout_s
        for h, t in list(self._push_in_flight.items()):
            if self.now - t > timeout:
                del self._push_in_flight[h]

    def _push_figures(self) -> dict[str, Any]:
        if not hasattr(self, "push_stats"):
            self._push_init()
        s = self.push_stats
        return {
            "push_offers": s["offers"],
            "push_accepted": s["accepted"],
            "push_decided": dict(sorted(self.push_why.items())),
            "push_refused": dict(sorted(self.push_refused.items())),
            "push_imported": s["imported"],
            "pushed_tokens": s["tokens"],
        }
