"""The oracle in the simulator: `zmesh.oracle` on an exact mirror of every node.

Each node's mirror replays every request dispatched there, in order, so it is the
cache the request will find; its wait is when the node will be free. At scale the
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
                n.name, n.idx, n.shadow, self._queue_depth(n), max(n.shadow_free_at - now, 0.0)
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
        start = max(target.shadow_free_at, now)
        target.shadow_free_at = start + cost.service_s(len(job.tokens) - claim.reuse, mt)
        job.node = target.idx
        job.reason = "oracle"
        self._enqueue(target, job)

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
        sample.sort(key=lambda n: n.shadow_free_at)
        for n in sample:
            if len(chosen) >= self.limit:
                break
            chosen.setdefault(n.idx, n)
        return list(chosen.values())
