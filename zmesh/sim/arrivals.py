"""Arrivals in the simulator: streams opened by Poisson, a closed loop or bursts.

A chat session is a stream whose next turn is sent when the previous answer reached
its client (after ``think_s``, not before it is due). A request enters at its client's
node, or the next alive one; the oracle dispatches it instead of a node routing it.
"""

from __future__ import annotations

import random
from typing import Any

from zmesh.routing import (
    ORACLE,
)
from zmesh.sim.base import SimBase
from zmesh.sim.config import (
    FAIL,
    OPEN,
    STREAM,
)
from zmesh.sim.state import Job


class ArrivalsMixin(SimBase):
    def _start_arrivals(self) -> None:
        arr = self.arrivals
        if arr.mode == "bursts":
            self._open_next()
        elif arr.mode == "closed":
            for _ in range(min(arr.concurrency, len(self._streams))):
                self._launch_stream(0.0)
        else:
            self._open_rng = random.Random(self.cfg.seed ^ 0xA441)
            self._open_at = 0.0
            self._open_next()

    def _open_next(self) -> None:
        """Poisson: schedule the next stream's start, one at a time.

        Drawn from the same generator in the same order as scheduling them all up
        front, but the heap stays small (a million pending starts made every push and
        pop of the run pay for them).
        """
        if self._next_stream < len(self._streams):
            if self._due:  # bursts: streams open when their first request is due
                self._open_at = self._due[self._streams[self._next_stream][0]]
            else:
                self._open_at += self._open_rng.expovariate(self.arrivals.rate)
            self._push(self._open_at, OPEN, self._next_stream)
            self._next_stream += 1

    def _on_open(self, s: int, _: Any) -> None:
        self._open_next()
        self._on_stream(s, None)

    def _launch_stream(self, t: float) -> None:
        if self._next_stream < len(self._streams):
            s = self._next_stream
            self._next_stream += 1
            self._push(t, STREAM, s)

    def _on_stream(self, s: int, _: Any) -> None:
        pos = self._stream_pos[s]
        stream = self._streams[s]
        if pos >= len(stream):
            if self.arrivals.mode == "closed":
                self._launch_stream(self.now)
            return
        self._stream_pos[s] = pos + 1
        self._on_arrive(stream[pos], s)

    def _stream_step(self, job: Job, client_time: float) -> None:
        """The client got its answer (or gave up): the stream's next request follows."""
        self._next_turn(job.stream, client_time)

    def _next_turn(self, s: int, client_time: float) -> None:
        """Stream ``s`` sends its next request after ``think_s``, and not before it is due."""
        if s < 0:
            return
        t = client_time + self.arrivals.think_s
        pos = self._stream_pos[s]
        if self._due and pos < len(self._streams[s]):
            t = max(t, self._due[self._streams[s][pos]])
        self._push(t, STREAM, s)

    def _on_arrive(self, i: int, stream: int) -> None:
        tokens, ids = self.prompts.get(i)
        entry = self.entries[i]
        n = self.cfg.nodes
        for k in range(n):  # the client fails over to the next node it can reach
            if self.nodes[(entry + k) % n].alive:
                entry = (entry + k) % n
                break
        else:
            self._finish_failed(i, stream)
            return
        job = Job(i, tokens, ids, entry)
        job.stream = stream
        job.sent_at = self.now
        if self.cfg.diagnose:
            self._best_match(job)
        self.prompt_len[i] = len(tokens)
        self._arrived += 1
        if self._fail_plan and self._arrived >= self._fail_plan[0]:
            self._fail_plan.pop(0)
            self._push(self.now, FAIL, self.rng.randrange(n))
        if self.policy == ORACLE:
            self._oracle_dispatch(job)
            return
        node = self.nodes[entry]
        target, reason = self._route(node, job)
        job.reason = reason
        if target == entry:
            self._enqueue(node, job)
            return
        self._forward(node, job, target)

    def _finish_failed(self, i: int, stream: int) -> None:
        self.failed += 1
        self.done += 1
        self._next_turn(stream, self.now)
