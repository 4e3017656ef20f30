"""Slot policy: which KV slot a request runs in, what it reuses, what it evicts.

Pure (no llama.cpp, no clock): the engine (zmesh/engine/) applies its answers to
llama.cpp's memory, and the simulator's `SlotCache` (zmesh/sim/cache.py) to a radix
tree, so both make the same choice for the same slots, request by request.

The rule, for a prompt of n tokens over slots of its namespace:
- best = the lowest-numbered slot sharing the longest prefix with the prompt;
  reuse = that prefix, less one token (its logits start the answer).
- In place: best is idle and most of what it holds is the prefix (or it is the only
  slot): roll it back to the prefix and continue there.
- Copy: otherwise share the prefix into another slot (``seq_cp``, no copy of cells)
  and keep best intact. A busy best (a request is decoding in it) is only ever shared
  from, never rolled back: its decoded tokens are a stable prefix, they only grow.
- The target of a copy or a fresh start: an empty idle slot, else the least recently
  used idle slot other than best. No idle slot: the request waits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zmesh.radix import common_length

__all__ = ["Choice", "SlotView", "choose", "common_prefix", "victim"]


@dataclass(frozen=True, slots=True)
class SlotView:
    """What the policy needs to know about one slot for one request."""

    held: int  # tokens the slot holds (any namespace)
    common: int  # tokens it shares with the prompt (0 for another namespace)
    last_used: float  # when its last request ended: larger is more recent
    busy: bool = False  # a request is running in it: pinned


@dataclass(frozen=True, slots=True)
class Choice:
    slot: int  # where the request runs
    reuse: int  # prompt tokens already cached there once the choice is applied
    source: int | None  # copy ``reuse`` tokens from this slot (None: none to copy)
    evicted: int  # tokens of other content the target loses (0 in place)

    @property
    def in_place(self) -> bool:
        return self.source is None and self.reuse > 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences (the radix tree's bisect)."""
    return common_length(a, b)


def victim(slots: Sequence[SlotView], exclude: int | None) -> int | None:
    """An empty idle slot, else the least recently used idle one other than
    ``exclude``; None when every slot is busy (or only ``exclude`` is idle)."""
    for i, s in enumerate(slots):
        if not s.busy and s.held == 0:
            return i
    pool = [i for i, s in enumerate(slots) if not s.busy and i != exclude]
    if not pool:
        return None
    return min(pool, key=lambda i: slots[i].last_used)


def choose(slots: Sequence[SlotView], n_prompt: int) -> Choice | None:
    """Where a prompt of ``n_prompt`` tokens runs; None if it must wait for a slot."""
    best, common = None, 0
    for i, s in enumerate(slots):
        if s.common > common:
            best, common = i, s.common
    reuse = min(common, n_prompt - 1)
    if best is not None and reuse > 0:
        b = slots[best]
        if not b.busy and (2 * reuse >= b.held or len(slots) == 1):
            return Choice(best, reuse, None, 0)
    exclude = best if reuse > 0 else None
    target = victim(slots, exclude)
    if target is None:
        if best is not None and reuse > 0 and not slots[best].busy:
            # Only best is idle: rolling it back beats waiting.
            return Choice(best, reuse, None, 0)
        return None
    evicted = slots[target].held
    if best is not None and reuse > 0:
        return Choice(target, reuse, best, evicted)
    return Choice(target, 0, None, evicted)
