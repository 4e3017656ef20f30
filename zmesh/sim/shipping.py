"""KV shipping in the simulator: a pull decided by `routing/shipping.py`, as a node runs it.

A "shipped" decision at an entry node starts the pull and queues the request there
(`_start_pull`), as `node/pipeline.py` does. The fetch reaches the holder after the
link delay; the holder exports the longest prefix of the asked tokens its real cache
holds (at most ``ship_max_tokens``; under ``ship_min_tokens`` it refuses), between
two decode steps: if a request runs there it waits for the step and that request
pauses for the export. The state then crosses the link at ``bandwidth_mbit`` (one
transfer at a time per direction of a link) and arrives after the link delay
(`_on_kv_fetch`). The requester's worker waits for the pull when the request reaches
the head of its queue (`_wait_for_pull`, `_on_kv_ready`), then imports it into its
slot model (`SlotCache.import_prefix`, as `Engine.import_prefix`; the tree's block
events are advertised like any other) at ``ship_import_s_per_token``, and prefills
the rest. A pull that brings nothing (refused, the holder dead: given up after
``ship_timeout_s``) is a local prefill, reason "fallback".

Routing sees what a node computes (`candidates.ship_s_per_token`, `ship_fixed_s`):
bytes per token over the link's bandwidth plus the import, and the round trip plus
one decode step.
"""

from __future__ import annotations

from typing import Any

from zmesh.candidates import ship_fixed_s, ship_s_per_token
from zmesh.sim.base import SimBase
from zmesh.sim.config import KV_FETCH, KV_READY, QUEUED, RUNNING
from zmesh.sim.state import Job, SimNode

PULL_PENDING = -1  # Job.pull_got until the state (or the refusal) has arrived


class ShippingMixin(SimBase):
    def _bandwidth_bytes_per_s(self, a: int, b: int) -> float:
        """Every link's bandwidth (one value; per link so that a spread can come later)."""
        return self.cfg.bandwidth_mbit * 1e6 / 8

    def _ship_terms(self, me: int, holder: int, link_s: float) -> tuple[float, float]:
        """(ship_s_per_token, ship_fixed_s) of a pull from ``holder`` to ``me``, as a
        node computes them from its measured costs (here: the configured ones)."""
        cfg = self.cfg
        per_token = ship_s_per_token(
            cfg.ship_bytes_per_token,
            self._bandwidth_bytes_per_s(holder, me),
            cfg.ship_import_s_per_token,
        )
        return per_token, ship_fixed_s(link_s, self.cost.decode_s_per_token)

    def _start_pull(self, node: SimNode, job: Job, holder: int, tokens: int) -> None:
        """Ask ``holder`` for the first ``tokens`` of the prompt; the job queues meanwhile."""
        job.pull_from, job.pull_n, job.pull_got = holder, tokens, PULL_PENDING
        self.ship_stats["pulls"] += 1
        self._push(self.now + self._delay(node.idx, holder), KV_FETCH, job, self.nodes[holder].gen)

    def _on_kv_fetch(self, job: Job, gen: int) -> None:
        """The holder answers: the state of its longest held prefix, or a refusal."""
        cfg = self.cfg
        holder = self.nodes[job.pull_from]
        back = job.node  # the requester (the job's entry: a pull is never forwarded)
        if not holder.alive or holder.gen != gen:
            # No answer comes; the requester gives the pull up at its timeout.
            sent = self.now - self._measured_delay(back, holder.idx)
            self._push(max(sent + cfg.ship_timeout_s, self.now), KV_READY, job, 0)
            return
        n = min(holder.cache.match(job.tokens[: job.pull_n]), cfg.ship_max_tokens)
        if n < self.settings.ship_min_tokens:
            self._push(self.now + self._delay(holder.idx, back), KV_READY, job, 0)
            return
        self._push(self._export(holder, back, n), KV_READY, job, n)

    def _export(self, holder: SimNode, back: int, n: int) -> float:
        """``holder`` exports ``n`` tokens now and sends them to ``back``; when they
        arrive there (also a holder push's pull: `push.py`)."""
        cfg = self.cfg
        t = self.now
        export = n * cfg.ship_export_s_per_token
        batch = [r for r in holder.running if r.pull_got != PULL_PENDING]
        if batch:
            # Exported between two decode steps: the running requests pause for it.
            t += self.cost.decode_s_per_token
            for running in batch:
                running.paused += export
                if t < running.first_at:
                    running.first_at += export
        t += export
        nbytes = n * cfg.ship_bytes_per_token
        wire = nbytes / self._bandwidth_bytes_per_s(holder.idx, back)
        key = (holder.idx, back)
        start = max(t, self.link_free.get(key, 0.0))
        self.link_free[key] = start + wire
        self.ship_stats["bytes"] += nbytes
        return start + wire + self._delay(holder.idx, back)

    def _on_kv_ready(self, job: Job, n: int) -> None:
        """The state (``n`` tokens; 0: none) is here; a worker waiting for it goes on."""
        if job.pull_got != PULL_PENDING or job.state not in (QUEUED, RUNNING):
            return
        job.pull_got = n
        node = self.nodes[job.node]
        if job.state == RUNNING and job in node.running and node.alive:
            self._start(node, job)

    def _wait_for_pull(self, node: SimNode, job: Job) -> None:
        """The job is at the head of the queue before its pull came: the worker waits."""
        job.state = RUNNING
        job.run_node = node.idx
        node.running.append(job)
        job.started_at = self.now
        self._load_changed(node)

    def _import_pull(self, node: SimNode, job: Job) -> float:
        """Load the pulled prefix into the node's cache; the import's seconds."""
        n, job.pull_from = job.pull_got, -1
        new = 0
        if n > 0:
            bs = self.cfg.block_size
            new = node.cache.import_prefix(job.tokens[:n], job.ids[: n // bs], self.now)
        if not new:
            job.reason = "fallback"
            self.ship_stats["failed"] += 1
            return 0.0
        self.ship_stats["imported"] += 1
        self.ship_stats["tokens"] += new
        return n * self.cfg.ship_import_s_per_token

    def _ship_figures(self) -> dict[str, Any]:
        s = self.ship_stats
        n = max(len(self.workload.requests), 1)
        return {
            "ship_pulls": s["pulls"],
            "ship_imported": s["imported"],
            "ship_failed": s["failed"],
            "shipped_tokens": s["tokens"],
            "shipped_bytes_per_request": round(s["bytes"] / n, 1),
        }
