"""The simulator's results: the figures (`zmesh.workload.report.summarize`) and the diagnosis.

The diagnosis (``sim run``) counts, per routing reason, requests served away from the
node whose real cache matched them best when they arrived, the prefill that cost, and
decisions for a node the load picture called idle while it already had work.
"""

from __future__ import annotations

import math
from typing import Any

from zmesh.sim.base import SimBase
from zmesh.sim.config import (
    SimResult,
)
from zmesh.sim.state import Job, SimNode


class ResultsMixin(SimBase):
    def _best_match(self, job: Job) -> None:
        """The longest prefix of the prompt that any node's real cache holds, and where."""
        best, where = 0, []
        for n in self.nodes:
            if n.alive:
                m = n.cache.match(job.tokens)
                if m > best:
                    best, where = m, [n.idx]
                elif m == best and best > 0:
                    where.append(n.idx)
        job.best, job.best_nodes = min(best, len(job.tokens) - 1), tuple(where)

    def _note_pick(self, job: Job, target: int, looked_idle: bool) -> None:
        """Count a decision for a node the load picture called idle, and whether it was."""
        if not looked_idle:
            return
        self.idle_picks += 1
        t = self.nodes[target]
        if self._queue_depth(t) + t.incoming > 0:
            self.stale_idle += 1
        key = (job.sent_at, target)
        self.idle_sent[key] = self.idle_sent.get(key, 0) + 1

    def _note_herd(self, node: SimNode, job: Job) -> None:
        """A forward queued behind a request of its own instant that another entry sent:
        the herd that no entry could see, only the holder (docs/evaluation.md, "Bursts")."""
        held = [*node.queue, *node.running]
        if any(j.sent_at == job.sent_at and j.entry != job.entry for j in held):
            self.herd_queued += 1

    def _note_done(self, job: Job, node: SimNode) -> None:
        row = self.by_reason.setdefault(job.reason or "?", [0, 0, 0, 0.0])
        row[0] += 1
        if job.best > 0 and node.idx not in job.best_nodes:
            row[1] += 1
        row[2] += max(job.best - job.cached, 0)
        row[3] += self.ttft[job.index]

    def _diagnosis(self) -> dict[str, Any]:
        prefill = self.cost.prefill_s_per_token
        reasons = {}
        for reason, (n, away, lost, ttft) in sorted(self.by_reason.items()):
            reasons[reason] = {
                "requests": int(n),
                "away_from_best_match": int(away),
                "tokens_lost": int(lost),
                "prefill_lost_s": round(lost * prefill, 3),
                "ttft_mean_s": round(ttft / n, 4) if n else 0.0,
            }
        herds = [k for k in self.idle_sent.values() if k >= 2]
        return {
            "by_reason": reasons,
            "idle_picks": self.idle_picks,
            "idle_picks_already_busy": self.stale_idle,
            "herds": len(herds),
            "herded_requests": sum(herds),
            "herd_queued": self.herd_queued,
        }

    def _result(self, wall: float) -> SimResult:
        from zmesh.workload.report import summarize

        ok = [i for i in range(len(self.ttft)) if not math.isnan(self.ttft[i])]
        per_node = [0] * self.cfg.nodes
        for i in ok:
            per_node[self.served_by[i]] += 1
        end = max((self.e2e[i] + 0.0 for i in ok), default=0.0)
        figures = summarize(
            ttft=[self.ttft[i] for i in ok],
            e2e=[self.e2e[i] for i in ok],
            prompt_tokens=[self.prompt_len[i] for i in ok],
            cached_tokens=[self.cached[i] for i in ok],
            per_node=per_node,
            wall_s=self.now if self.now > 0 else end,
            forwards=sum(self.forwarded[i] for i in ok),
            fallbacks=self.fallbacks,
            errors=self.failed,
        )
        figures["rejected"] = self.rejected
        figures["refused"] = self.refusals
        figures["snapshots"] = self.snapshots
        figures["deltas_lost"] = self.deltas_lost
        figures["reasons"] = dict(sorted(self.reasons.items()))
        if self.settings.ship:
            figures.update(self._ship_figures())
        if self.settings.ship_push:
            figures.update(self._push_figures())
        if self.cfg.diagnose:
            figures["diagnosis"] = self._diagnosis()
        figures["sim_s"] = round(self.now, 3)
        figures["events"] = self.events
        figures["wall_s"] = round(wall, 3)
        cfg = {
            k: v
            for k, v in self.cfg.__dict__.items()
            if k not in ("cost",) and not k.startswith("_")
        }
        cfg["cost"] = self.cost.as_dict()
        cfg["estimates"] = "shared" if self.shared else "per_node"
        cfg["max_candidates"] = self.limit
        return SimResult(cfg, figures, self.ttft, self.e2e, self.served_by, wall, self.events)
