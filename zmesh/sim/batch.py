"""A node that runs several requests at once (``SimConfig.max_running > 1``), as the
engine's steps do (zmesh/engine/core.py).

Each engine step decodes one token for every request past its prompt and, while a
prompt is pending, prefills one chunk of the oldest one: ``prefill_chunk`` tokens
when others decode (the whole rest when none does). So prompts are read one at a
time, and each decoding request gets one token per step. In seconds, with ``k``
decoding, ``p`` and ``d`` the cost model's seconds per prefilled and per decoded
token and ``slowdown(k)`` its batch cost::

    step = (prefill_chunk * p  if a prompt is pending) + (d * slowdown(k)  if k > 0)

A request's work is held in seconds it would take alone: ``first_left`` until its
first token (base cost, import and prefill), ``work_left`` until its end. Per second
the prompt being read gains ``prefill_chunk * p / step`` of them (1 with no decoder)
and each decoder ``d / step`` (``1 / slowdown(k)`` with no prompt pending). The rates
hold until the batch changes: a request starts, reads its prompt, or ends. Then
`_advance` brings everyone up to now and `_reschedule` sets each one's next event:
the oldest prompt's first token, or a decoder's end (an earlier event then is stale).
"""

from __future__ import annotations

import math

from zmesh.sim.base import SimBase
from zmesh.sim.config import DONE
from zmesh.sim.shipping import PULL_PENDING
from zmesh.sim.state import Job, SimNode

EPS_S = 1e-9  # work left below this is done (float rounding of the advances)


class BatchMixin(SimBase):
    def _computing(self, node: SimNode) -> list[Job]:
        """The running requests that compute (not those waiting for a KV pull)."""
        return [j for j in node.running if not (j.pull_from >= 0 and j.pull_got == PULL_PENDING)]

    def _rates(self, batch: list[Job]) -> tuple[Job | None, float, float]:
        """The prompt being read (None: none), its rate and each decoder's, in seconds
        of work alone per second."""
        cost = self.cost
        head = next((j for j in batch if j.first_left > EPS_S), None)
        k = sum(1 for j in batch if j.first_left <= EPS_S)
        decode = cost.decode_s_per_token * cost.slowdown(k) if k else 0.0
        if head is None:
            return None, 0.0, 1.0 / cost.slowdown(k)
        if k == 0:
            return head, 1.0, 0.0
        chunk = self.cfg.prefill_chunk * cost.prefill_s_per_token
        step = chunk + decode
        return head, chunk / step, cost.decode_s_per_token / step

    def _advance(self, node: SimNode) -> None:
        """Bring every running request's work up to now at the rates it had; call
        before the batch changes."""
        batch = self._computing(node)
        head, r_head, r_dec = self._rates(batch)
        now = self.now
        for j in batch:
            dt = now - j.progress_at
            j.progress_at = now
            if j is head:
                j.first_left -= dt * r_head
                j.work_left -= dt * r_head
                if j.first_left <= EPS_S:
                    j.first_left = 0.0
            elif j.first_left <= EPS_S:
                j.work_left -= dt * r_dec

    def _reschedule(self, node: SimNode) -> None:
        """Each running request's next event at the batch's rates as they are now."""
        batch = self._computing(node)
        head, r_head, r_dec = self._rates(batch)
        now = self.now
        for j in batch:
            j.progress_at = now
            if j is head:
                j.first_at = j.done_due = now + j.first_left / r_head
            elif j.first_left > EPS_S:
                j.first_at = math.inf  # waits for the prompts before it
                continue
            else:
                j.done_due = now + max(j.work_left, 0.0) / r_dec
            self._push(j.done_due, DONE, j, node.gen)

    def _batch_event(self, node: SimNode, job: Job) -> bool:
        """``job``'s event came (`_on_done`): True when it has ended; False when only
        its prompt is read (its first token now; the batch goes on at new rates)."""
        self._advance(node)
        if job.work_left > EPS_S:
            job.first_left = 0.0
            job.first_at = self.now
            self._reschedule(node)
            return False
        return True
