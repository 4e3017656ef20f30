"""The cluster benchmark's oracle: `zmesh.oracle` on a mirror of every real node.

It mirrors each node's slots by replaying, in order, every request it sent there
through the engine's slot policy (`zmesh.sim.cache.SlotCache`), so it knows the cache
each request will find; it knows every queue because it is the only sender (its wait:
the predictions of the requests outstanding there, the first one's elapsed part
deducted; on nodes that run ``places`` requests at once, `candidates.batch_wait_s` of
them, as such a node advertises: a place, and the prompts ahead read one at a time;
the first ``places`` counted as running since they were sent), and it
learns the real prefill and decode rates from the answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from zmesh import protocol as P
from zmesh.candidates import Work, batch_wait_s
from zmesh.oracle import OracleNode, choose, replay
from zmesh.routing import PolicyState
from zmesh.sim.cache import SlotCache
from zmesh.sim.costmodel import PRESETS
from zmesh.stats import ewma


@dataclass
class _Mirror:
    cache: SlotCache
    # (rid, predicted seconds, dispatched at, of which its prompt), in the order the
    # node serves them
    outstanding: list[tuple[str, float, float, float]] = field(default_factory=list)
    last_done: float = 0.0


class Oracle:
    """Exact mirror of every node (slots, queue), choosing with `zmesh.oracle.choose`."""

    def __init__(
        self, names: Sequence[str], n_slots: int, max_tokens: int, places: int = 1
    ) -> None:
        cm = PRESETS["cpu"]
        self.prefill = cm.prefill_s_per_token
        self.decode = cm.decode_s_per_token
        self.base = cm.base_s
        self.names = list(names)
        self.mirrors = {n: _Mirror(SlotCache(n_slots)) for n in names}
        self.state = PolicyState.seeded(0)
        self.max_tokens = max_tokens
        self.places = places  # requests a node runs at once (its engine's max_running)
        self._tail = -1

    def _wait(self, m: _Mirror, now: float) -> float:
        if not m.outstanding:
            return 0.0
        if self.places > 1:
            running, queued = m.outstanding[: self.places], m.outstanding[self.places :]
            return batch_wait_s(
                [(max(now - sent, 0.0), Work(pf, p)) for _, p, sent, pf in running],
                [Work(pf, p) for _, p, _, pf in queued],
                self.places,
            )
        _, predicted, dispatched, _ = m.outstanding[0]
        started = max(m.last_done, dispatched)  # the head of the queue is running
        first = max(predicted - max(now - started, 0.0), 0.0)
        return first + sum(o[1] for o in m.outstanding[1:])

    def choose(
        self, rid: str, tokens: list[int], now: float, max_tokens: int = 0
    ) -> tuple[str, int]:
        """The node to send to, and the tokens its slots will reuse (the mirror's word)."""
        mt = max_tokens or self.max_tokens
        seq = tuple(tokens)
        known = []
        for k, name in enumerate(self.names):
            m = self.mirrors[name]
            known.append(OracleNode(name, k, m.cache, len(m.outstanding), self._wait(m, now)))
        target, _ = choose(known, seq, self.prefill, self.state)
        m = self.mirrors[target.node_id]
        tail = tuple(range(self._tail, self._tail - (mt - 1), -1))
        self._tail -= mt
        claim = replay(m.cache, seq, tail, now)
        prefill = self.base + (len(seq) - claim.reuse) * self.prefill
        m.outstanding.append((rid, prefill + (mt - 1) * self.decode, now, prefill))
        return target.node_id, claim.reuse

    def finished(self, target: str, rid: str, done: P.Done | None, now: float) -> None:
        m = self.mirrors[target]
        m.outstanding = [o for o in m.outstanding if o[0] != rid]
        m.last_done = now
        if done is None:
            return
        # Learn the real speeds (EWMA), as a node learns its own.
        new = done.prompt_tokens - done.cached_tokens
        if new >= 32 and done.prefill_s > 0:
            self.prefill = ewma(self.prefill, done.prefill_s / new)
        if done.decode_tps > 0:
            self.decode = ewma(self.decode, 1.0 / done.decode_tps)
