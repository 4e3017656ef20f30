"""The oracle in the simulator: `zmesh.oracle` on an exact mirror of every node.

Each node's mirror replays every request dispatched there, in order, so it is the
cache the request will find; its wait is until the node has a place free (it runs
``max_running`` requests at once) and has read the prompts sent before (one at a
time, as the engine does). At scale the
pool is the longest holders (an index of the mirrors) plus the least busy of a
random sample.
"""

from __future__ import annotations

from zmesh.oracle import OracleNode, choose, replay
from zmesh.sim.base import SimBase
from zmesh.sim.state import Job, SimNode


class MirrorMixin(SimBase):
    def _oracle_dispatch(self, job: Job) -> None:
        """`zmesh.oracle.choose` on every node's mirror; its wait: when it will be free."""
        cost = self.cost
        mt = self.workload.requests[job.index].max_tokens
        alive = [n for n in self.nodes if n.alive]
        pool = alive
        if self.limit and len(alive) > self.limit:
            pool = self._oracle_pool(alive, job)
        now = self.now
        known = [
            OracleNode(
                n.name,
                n.idx,
                n.shadow,
                self._queue_depth(n),
                max(min(n.shadow_free) - now, n.shadow_lane - now, 0.0),
                self._joins_batch(n.shadow_free, now),
            )
            for n in pool
        ]
        chosen, _ = choose(
            known, job.tokens, cost.prefill_s_per_token, self.nodes[0].policy_state, self.settings
        )
        target = self.nodes[chosen.order]
        tail = tuple(-next(self._tail) for _ in range(max(mt - 1, 0)))
        claim = replay(target.shadow, job.tokens, tail, now)
        self._drain_shadow(target)
        # The place that frees first takes it, at the rates of the batch it joins.
        # Its prompt is read once those dispatched before it are (one at a time).
        free = target.shadow_free
        place = free.index(min(free))
        start = max(free[place], now, target.shadow_lane)
        others = sum(1 for i, f in enumerate(free) if i != place and f > start)
        ttft = cost.ttft_s(len(job.tokens) - claim.reuse) * self._prefill_factor(others)
        decode = max(mt - 1, 0) * cost.decode_s_per_token * cost.slowdown(others + 1)
        target.shadow_lane = start + ttft
        free[place] = start + ttft + decode
        job.node = target.idx
        job.reason = "oracle"
        self._enqueue(target, job)

    def _joins_batch(self, free: list[float], now: float) -> float:
        """How much slower than alone a request sent now reads its prompt on a node
        whose places free at ``free``: beside those still busy, decoding (all busy:
        a full batch less the one that frees)."""
        busy = sum(1 for f in free if f > now)
        return self._prefill_factor(min(busy, len(free) - 1))

    def _prefill_factor(self, decoding: int) -> float:
        """A prompt read while ``decoding`` others decode gets one chunk per step
        (batch.py): its prefill takes (chunk + their decode step) / chunk as long."""
        if decoding <= 0:
            return 1.0
        cost = self.cost
        chunk = self.cfg.prefill_chunk * cost.prefill_s_per_token
        return (chunk + cost.decode_s_per_token * cost.slowdown(decoding)) / chunk

    def _drain_shadow(self, node: SimNode) -> None:
        ev = node.shadow.drain_events()
        idx = self.oracle_index
        for b in ev.removed:
            s = idx.get(b)
            if s is not None:
                s.discard(node.idx)
                if not s:
                    del idx[b]
        for b, _ in ev.added:
            idx.setdefault(b, set()).add(node.idx)

    def _oracle_pool(self, alive: list[SimNode], job: Job) -> list[SimNode]:
        want = self.limit // 2
        chosen: dict[int, SimNode] = {}
        for p in self._best_holders(self.oracle_index, job.ids, want):
            if self.nodes[p].alive:
                chosen[p] = self.nodes[p]
        # and the least busy nodes of a random sample (power of d choices)
        sample = self.rng.sample(alive, min(len(alive), 2 * self.limit))
        sample.sort(key=lambda n: min(n.shadow_free))
        for n in sample:
            if len(chosen) >= self.limit:
                break
            chosen.setdefault(n.idx, n)
        return list(chosen.values())
