"""Serving in the simulator: forwards, a node's FIFO queue, the slot cache, crashes.

A node runs up to ``max_running`` requests at once from its queue (`max_queue`): one
at a time by default, or a continuous batch as a real node's engine does (batch.py).
A request's service time comes from the cost model on what its cache
(`SlotCache`/`TokenCache`) misses. Its load (queue depth, backlog, the prediction of
each request) is `zmesh.candidates`'. A
forward whose peer fails or is suspected (or, without keep-alives, times out) is
served again by its entry. A crash loses the node's queue and cache; it restarts
empty with a new epoch.
"""

from __future__ import annotations

import contextlib
from typing import Any

from zmesh.candidates import (
    Work,
    backlog_s,
    batch_depth,
    batch_wait_s,
    local_candidate,
    predict_prefill_s,
    predict_s,
)
from zmesh.routing import (
    ORACLE,
)
from zmesh.routing.admission import admit
from zmesh.sim.base import SimBase
from zmesh.sim.config import (
    DONE,
    DROPPED,
    FINISHED,
    FWD,
    FWD_TIMEOUT,
    HB,
    QUEUED,
    RECOVER,
    REFUSED,
    RUNNING,
    WAIT,
)
from zmesh.sim.shipping import PULL_PENDING
from zmesh.sim.state import Job, SimNode
from zmesh.stats import ewma


class ServingMixin(SimBase):
    def _queue_depth(self, node: SimNode) -> int:
        return batch_depth(len(node.queue), len(node.running))

    def _backlog(self, node: SimNode) -> float:
        now, running = self.now, node.running
        if self.cfg.max_running == 1:  # exactly the one-at-a-time figures
            head = running[0] if running else None
            predicted = head.predicted if head is not None else None
            since = head.started_at if head is not None else now
            return backlog_s(node.queued_s, predicted, now - since)
        # As a batching node advertises it: a place, and the prompts ahead read.
        return batch_wait_s(
            [(now - j.started_at, Work(j.predicted_prefill, j.predicted)) for j in running],
            [Work(j.predicted_prefill, j.predicted) for j in node.queue if j.state == QUEUED],
            self.cfg.max_running,
        )

    def _predict(self, new_tokens: int, max_tokens: int, batch: int = 1) -> float:
        """The service time a node predicts, at the rate it measures while it runs a
        batch of ``batch`` (a node learns its rates from what it serves, batched)."""
        # Answers here always run to max_tokens: no completion-length estimate.
        c = self.cost
        s = c.slowdown(batch)
        return predict_s(
            new_tokens, max_tokens, c.prefill_s_per_token * s, c.decode_s_per_token * s
        )

    def _forward(self, node: SimNode, job: Job, target: int) -> None:
        job.forwarded = True
        job.fwd_sent = self.now
        job.node = target
        view = self.views[self.view_of[node.idx]]
        est = view.table.get(self.names[target])
        matched = est.match_blocks(job.ids) * self.cfg.block_size if est is not None else 0
        mt = self.workload.requests[job.index].max_tokens
        job.fwd_cost = self._predict(len(job.tokens) - matched, mt)
        node.inflight[target] = node.inflight.get(target, 0) + 1
        node.fwd_out.setdefault(target, []).append(job)
        self.nodes[target].incoming += 1
        self._push(self.now + self._delay(node.idx, target), FWD, job, self.nodes[target].gen)
        if not self.cfg.forward_keepalive:
            self._push(self.now + self.cfg.forward_timeout_s, FWD_TIMEOUT, job, None)

    def _forward_over(self, job: Job) -> None:
        """The entry's forward bookkeeping ends (answer relayed, or fell back)."""
        entry = self.nodes[job.entry]
        t = job.node
        left = entry.inflight.get(t, 0) - 1
        if left > 0:
            entry.inflight[t] = left
        else:
            entry.inflight.pop(t, None)
        lst = entry.fwd_out.get(t)
        if lst is not None:
            with contextlib.suppress(ValueError):
                lst.remove(job)
            if not lst:
                del entry.fwd_out[t]

    def _on_fwd(self, job: Job, gen: int) -> None:
        target = self.nodes[job.node]
        target.incoming = max(target.incoming - 1, 0)
        if job.state != WAIT:
            return  # fell back already, or its entry died
        if not target.alive or target.gen != gen:
            return  # lost with the node: the entry falls back on timeout or suspicion
        if job.bar is not None and self._refuses(target, job):
            return
        if self.cfg.diagnose:
            self._note_herd(target, job)
        self._enqueue(target, job)

    def _refuses(self, node: SimNode, job: Job) -> bool:
        """Holder-side admission: the peer's real estimate against the forwarder's bar;
        a refusal goes back to the entry, which decides again (the runner-up, or itself)."""
        cost = self.cost
        local = local_candidate(
            node.name,
            node.cache.match(job.tokens),
            self._queue_depth(node),
            self._backlog(node),
            cost.prefill_s_per_token,
            node.service_ewma or cost.service_s(len(job.tokens), 1),
        )
        evict = node.cache.evicted_tokens(job.tokens) if self.settings.admit_evictions else 0
        if admit(local, len(job.tokens), job.bar, self.settings, evict)[0]:
            return False
        self.refusals += 1
        self._push(self.now + self._delay(node.idx, job.entry), REFUSED, job, None)
        return True

    def _on_refused(self, job: Job, _: Any) -> None:
        if job.state != WAIT:
            return  # fell back already (the peer looked dead), or its entry died
        job.state = DROPPED
        self._forward_over(job)
        entry = self.nodes[job.entry]
        if not entry.alive:
            self._finish_failed(job.index, job.stream)
            return
        retry = job.retry_at(entry.idx)
        retry.refused_by = (*job.refused_by, job.node)
        target, retry.reason = self._route(entry, retry)  # the runner-up, or here
        if target != entry.idx:
            self._forward(entry, retry, target)
        else:
            self._enqueue(entry, retry)

    def _fallback(self, job: Job) -> None:
        """Serve a forwarded request at its entry (the peer failed or timed out)."""
        if job.state in (FINISHED, DROPPED) or not job.forwarded:
            return
        target = self.nodes[job.node]
        if job.state == QUEUED:
            try:
                target.queue.remove(job)
                target.queued_s = max(target.queued_s - job.predicted, 0.0)
            except ValueError:
                pass
        # A running one keeps running (a prefill cannot be cancelled); its answer is dropped.
        job.state = DROPPED
        self._forward_over(job)
        self.fallbacks += 1
        entry = self.nodes[job.entry]
        if not entry.alive:
            self._finish_failed(job.index, job.stream)
            return
        retry = job.retry_at(entry.idx)
        retry.reason = "fallback"
        self._enqueue(entry, retry)

    def _on_fwd_timeout(self, job: Job, _: Any) -> None:
        if job.state in (FINISHED, DROPPED):
            return
        if job.state == RUNNING and job.first_at + job.ret_delay <= self.now:
            return  # its first token reached the entry in time
        self._fallback(job)

    def _enqueue(self, node: SimNode, job: Job) -> None:
        if len(node.queue) >= self.cfg.max_queue:
            if job.forwarded:
                self._fallback(job)
            else:
                self.rejected += 1
                job.state = DROPPED
                self._finish_failed(job.index, job.stream)
            return
        mt = self.workload.requests[job.index].max_tokens
        batch = min(len(node.running) + 1, self.cfg.max_running)
        new = len(job.tokens) - node.cache.match(job.tokens)
        job.predicted = self._predict(new, mt, batch)
        job.predicted_prefill = predict_prefill_s(new, self.cost.prefill_s_per_token)
        job.state = QUEUED
        node.queue.append(job)
        node.queued_s += job.predicted
        self._load_changed(node)
        if len(node.running) < self.cfg.max_running:
            self._start_next(node)
        if self.settings.ship_push:
            self._maybe_push(node)  # holder push (push.py)

    def _start_next(self, node: SimNode) -> bool:
        """Start queued requests while places are free; whether any started."""
        started = False
        while node.queue and len(node.running) < self.cfg.max_running:
            job = node.queue.popleft()
            node.queued_s = max(node.queued_s - job.predicted, 0.0)
            if job.state != QUEUED:
                continue
            self._start(node, job)
            started = True
        return started

    def _start(self, node: SimNode, job: Job) -> None:
        import_s = 0.0
        if job.pull_from >= 0:  # KV shipping (shipping.py): wait for the pull, import it
            if job.pull_got == PULL_PENDING:
                self._wait_for_pull(node, job)
                return
            import_s = self._import_pull(node, job)
        batched = self.cfg.max_running > 1
        if batched:
            self._advance(node)  # (batch.py) before the batch changes
        job.state = RUNNING
        job.run_node = node.idx
        if job not in node.running:  # (one that waited for its pull holds its place)
            node.running.append(job)
        job.started_at = self.now
        claim = node.cache.claim(job.tokens)
        job.claim = claim
        job.cached = claim.reuse
        mt = self.workload.requests[job.index].max_tokens
        cost = self.cost
        ttft = cost.ttft_s(len(job.tokens) - claim.reuse)
        service = ttft + max(mt - 1, 0) * cost.decode_s_per_token
        if self.cfg.service_noise > 0:
            f = self.noise_rng.lognormvariate(0.0, self.cfg.service_noise)
            ttft *= f
            service *= f
        ttft += import_s
        service += import_s
        if job.forwarded:
            job.ret_delay = self._delay(node.idx, job.entry)
        self._load_changed(node)
        self._cache_changed(node)
        if batched:
            job.first_left, job.work_left = ttft, service
            self._reschedule(node)
            return
        job.first_at = self.now + ttft
        job.done_due = self.now + service
        self._push(job.done_due, DONE, job, node.gen)

    def _on_done(self, job: Job, gen: int) -> None:
        node = self.nodes[job.run_node]
        if node.gen != gen or job not in node.running or self.now != job.done_due:
            return  # the node crashed meanwhile, or the batch changed its end
        if job.paused > 0.0:  # a peer's KV export paused it (shipping.py)
            job.done_due = self.now + job.paused
            self._push(job.done_due, DONE, job, gen)
            job.paused = 0.0
            return
        if self.cfg.max_running > 1 and not self._batch_event(node, job):
            return  # its prompt is read, not its answer (batch.py)
        mt = self.workload.requests[job.index].max_tokens
        tail = tuple(-next(self._tail) for _ in range(max(mt - 1, 0)))
        seq = job.tokens + tail
        ids = job.ids
        n_full = len(seq) // self.cfg.block_size
        if n_full > len(ids):
            more = (
                self.hasher.block_ids(seq, len(ids), ids[-1]) if ids else self.hasher.block_ids(seq)
            )
            ids = ids + more
        node.cache.finish(job.claim.slot, seq, ids, self.now)
        node.service_ewma = ewma(node.service_ewma, self.now - job.started_at)
        node.served += 1
        node.running.remove(job)
        self._cache_changed(node)
        self._load_changed(node)
        if job.state == RUNNING:
            self._complete(job, node)
        if not self._start_next(node) and node.running and self.cfg.max_running > 1:
            self._reschedule(node)  # the batch shrank: the others go faster

    def _complete(self, job: Job, node: SimNode) -> None:
        job.state = FINISHED
        job.done_at = self.now
        i = job.index
        self.ttft[i] = job.first_at + job.ret_delay - job.sent_at
        self.e2e[i] = self.now + job.ret_delay - job.sent_at
        self.served_by[i] = node.idx
        self.cached[i] = job.cached
        self.forwarded[i] = job.forwarded
        if self.cfg.diagnose:
            self._note_done(job, node)
        if job.forwarded:
            self._forward_over(job)
        self.done += 1
        self._stream_step(job, self.now + job.ret_delay)

    def _on_fail(self, idx: int, _: Any) -> None:
        node = self.nodes[idx]
        if not node.alive or sum(n.alive for n in self.nodes) <= 1:
            return
        node.alive = False
        node.gen += 1
        lost = [*node.queue, *node.running]
        node.queue.clear()
        node.queued_s = 0.0
        node.running = []
        for job in lost:
            if job.forwarded:
                job.state = WAIT  # its entry falls back once it notices
            else:
                job.state = DROPPED
                self._finish_failed(job.index, job.stream)
        # Forwards this node had sent die with it (their clients were connected here).
        for lst in node.fwd_out.values():
            for job in lst:
                if job.state == QUEUED:
                    owner = self.nodes[job.node]
                    try:
                        owner.queue.remove(job)
                        owner.queued_s = max(owner.queued_s - job.predicted, 0.0)
                    except ValueError:
                        pass
                if job.state in (WAIT, QUEUED, RUNNING):
                    job.state = DROPPED
                    self._finish_failed(job.index, job.stream)
        node.fwd_out.clear()
        node.inflight.clear()
        self._push(self.now + self.cfg.downtime_s, RECOVER, idx)

    def _on_recover(self, idx: int, _: Any) -> None:
        node = self.nodes[idx]
        node.alive = True
        node.gen += 1
        node.flush_pending = False
        node.service_ewma = 0.0
        self._boot(node)  # a restart: empty cache, new epoch
        if self.policy == ORACLE:
            node.shadow = self._new_cache()
            node.shadow_free = [self.now] * self.cfg.max_running
            node.shadow_lane = self.now
        self._push(self.now + self.cfg.heartbeat_s * self.rng.random(), HB, idx, node.gen)
