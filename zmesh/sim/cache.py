"""Models of a node's KV cache over the real `RadixTree` (block ids from the real hasher).

- `SlotCache`: the engine's slot pool: the engine's own slot policy
  (zmesh/slots.py `choose`) over the slots' contents, without llama.cpp. A request
  reuses the slot with the longest common prefix, continuing in place when most of
  that slot is its prefix, else sharing the prefix into a free or least-recently-used
  slot. The tree runs in owned mode (one owner per slot), exactly as in the engine, so
  its block events are what a real node would advertise. Used by the simulator's
  nodes and by the cluster benchmark's oracle to mirror real nodes.
  `tests/test_slots.py` runs one recorded request sequence through the real engine and
  through this model: same slot, cached tokens and evictions, request by request.
- `TokenCache`: SGLang-style radix cache under a token budget (LRU leaf eviction).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import cast

from zmesh.blocks import BlockHasher
from zmesh.radix import BlockEvents, RadixTree
from zmesh.slots import Choice, SlotView, choose, victim

__all__ = ["Claim", "KnownIdsHasher", "SlotCache", "TokenCache"]


class KnownIdsHasher(BlockHasher):
    """A `BlockHasher` that returns already-known ids for the sequence being inserted.

    The radix tree asks for the block ids of a whole sequence whenever it adds a node;
    the simulator already has them (computed once per prompt by the real hasher), so
    `remember` them for that exact tuple object and the tree skips rehashing.
    """

    __slots__ = ("_ids", "_tokens")

    def __init__(self, base: BlockHasher) -> None:
        self.block_size = base.block_size
        self.key = base.key
        self.namespace = base.namespace
        self.seed = base.seed
        self._tokens: object = None
        self._ids: list[int] = []

    def remember(self, tokens: tuple[int, ...], ids: list[int]) -> None:
        self._tokens, self._ids = tokens, ids

    def block_ids(
        self, tokens: Sequence[int], start_block: int = 0, parent: int | None = None
    ) -> list[int]:
        if tokens is self._tokens and start_block == 0 and parent is None:
            return self._ids
        return BlockHasher.block_ids(self, tokens, start_block, parent)


class Claim:
    """Where a request runs and how much of its prompt is already cached."""

    __slots__ = ("evicted", "reuse", "slot")

    def __init__(self, slot: int, reuse: int, evicted: int) -> None:
        self.slot, self.reuse, self.evicted = slot, reuse, evicted


class SlotCache:
    """The engine's slot pool for one namespace, mirrored in a real `RadixTree`."""

    __slots__ = ("_clock", "hasher", "last_used", "n_slots", "slots", "tree")

    def __init__(self, n_slots: int, hasher: BlockHasher | None = None) -> None:
        if n_slots < 1:
            raise ValueError("n_slots must be >= 1")
        self.n_slots = n_slots
        self.hasher = KnownIdsHasher(hasher) if hasher is not None else None
        self.tree = RadixTree(self.hasher)
        self.slots: list[tuple[int, ...]] = [() for _ in range(n_slots)]
        self.last_used = [0.0] * n_slots
        self._clock = 0.0

    def match(self, tokens: Sequence[int]) -> int:
        """Tokens of ``tokens`` held by some slot (what the node's router sees)."""
        return self.tree.match(tokens).length

    def claim(self, tokens: tuple[int, ...]) -> Claim:
        """Pick the slot for ``tokens`` and cut it back to the reusable prefix
        (`zmesh.slots.choose`, as the engine does; no slot is ever busy here)."""
        c = self._choose(tokens)
        if c.in_place:
            if c.reuse < len(self.slots[c.slot]):
                self._set(c.slot, self.slots[c.slot][: c.reuse])
        elif c.source is not None:
            self._set(c.slot, self.slots[c.source][: c.reuse])
        elif c.evicted:
            self._set(c.slot, ())
        return Claim(c.slot, c.reuse, c.evicted)

    def _choose(self, tokens: tuple[int, ...]) -> Choice:
        # The tree's match is the longest common prefix over the slots, and its
        # owners are the slots holding all of it: the lowest of them is the policy's
        # best, and the other slots cannot change the choice.
        m = self.tree.match(tokens)
        best = _lowest_slot(m.owners)
        views = [
            SlotView(len(s), m.length if i == best else 0, self.last_used[i])
            for i, s in enumerate(self.slots)
        ]
        choice = choose(views, len(tokens))
        assert choice is not None  # no slot is busy here: there is always a target
        return choice

    def finish(
        self,
        slot: int,
        sequence: tuple[int, ...],
        ids: list[int] | None = None,
        now: float | None = None,
    ) -> None:
        """The slot now holds ``sequence`` (prompt + generated tokens but the last).

        ``now`` stamps the slot's last use (the engine uses the clock); without it a
        counter keeps the order, which is all the slot choice within one node needs.
        """
        if self.hasher is not None and ids is not None:
            self.hasher.remember(sequence, ids)
        self._set(slot, sequence)
        self._clock = max(self._clock + 1e-9, now) if now is not None else self._clock + 1.0
        self.last_used[slot] = self._clock

    def import_prefix(
        self, tokens: tuple[int, ...], ids: list[int] | None = None, now: float | None = None
    ) -> int:
        """Load a shipped prefix, as `Engine.import_prefix` does: into a free slot or the
        least recently used one other than the longest holder's; returns the tokens now
        cached that were not before (0 if a slot already held as much)."""
        m = self.tree.match(tokens)
        if m.length >= len(tokens):
            return 0
        target = self._import_target(tokens)
        if self.hasher is not None and ids is not None:
            self.hasher.remember(tokens, ids)
        self._set(target, tokens)
        self._clock = max(self._clock + 1e-9, now) if now is not None else self._clock + 1.0
        self.last_used[target] = self._clock
        return len(tokens) - m.length

    def free_slots(self, busy: Collection[int] = ()) -> list[int]:
        """Empty slots no running request (``busy``) holds: where a holder's push lands
        (`Engine.free_slots`)."""
        return [i for i, s in enumerate(self.slots) if not s and i not in busy]

    def import_free(
        self,
        tokens: tuple[int, ...],
        ids: list[int] | None = None,
        now: float | None = None,
        busy: Collection[int] = (),
    ) -> int:
        """A holder's push: load a shipped prefix into an empty slot only, as
        `Engine.import_prefix(..., free_only=True)`; the tokens now cached that were not
        before (0: held already, or no free slot)."""
        m = self.tree.match(tokens)
        free = self.free_slots(busy)
        if m.length >= len(tokens) or not free:
            return 0
        if self.hasher is not None and ids is not None:
            self.hasher.remember(tokens, ids)
        self._set(free[0], tokens)
        self._clock = max(self._clock + 1e-9, now) if now is not None else self._clock + 1.0
        self.last_used[free[0]] = self._clock
        return len(tokens) - m.length

    def import_evicts(self, tokens: Sequence[int]) -> int:
        """Cached tokens that importing a prefix of ``tokens`` longer than this cache's
        match would overwrite: the slot `import_prefix` picks (0 if one is free)."""
        return len(self.slots[self._import_target(tokens)])

    def import_victim_ids(self, tokens: Sequence[int]) -> list[int]:
        """The block ids of what that import would overwrite ([] if a slot is free, or
        no hasher): peers holding them can give them back (`shipping.evict_charge_s`)."""
        seq = self.slots[self._import_target(tokens)]
        if not seq or self.hasher is None:
            return []
        return self.hasher.block_ids(seq)

    def _import_target(self, tokens: Sequence[int]) -> int:
        # As `Engine.import_prefix`: `zmesh.slots.victim` sparing the longest holder,
        # else that holder itself (no slot is ever busy here).
        m = self.tree.match(tokens)
        holder = _lowest_slot(m.owners) if m.length > 0 else None
        views = [SlotView(len(s), 0, self.last_used[i]) for i, s in enumerate(self.slots)]
        target = victim(views, holder)
        if target is None:
            assert holder is not None  # victim() finds a slot unless only holder is idle
            return holder
        return target

    def miss_evict_tokens(self) -> int:
        """Cached tokens a miss would overwrite here (what a node advertises for the
        eviction charge; 0: a slot is free): a prompt sharing only its first token with
        the last one served, as real prompts share a BOS token or a header. The policy
        then spares the lowest slot sharing it and takes the least recently used other
        (`Load.miss_evict_tokens` asks the engine the same)."""
        last = max(range(self.n_slots), key=lambda i: self.last_used[i])
        if not self.slots[last]:
            return 0
        return self.evicted_tokens((self.slots[last][0], -1))

    def evicted_tokens(self, tokens: tuple[int, ...]) -> int:
        """Tokens of other cached content that serving ``tokens`` would overwrite.

        0 when the request continues a slot in place or a slot is free. The oracle
        charges for it: a greedy router that ignores it evicts a hot prefix to save a
        few tokens of prefill.
        """
        c = self._choose(tokens)
        return 0 if c.in_place else c.evicted

    def _set(self, slot: int, tokens: tuple[int, ...]) -> None:
        self.slots[slot] = tokens
        self.tree.set_sequence(slot, tokens)

    def drain_events(self) -> BlockEvents:
        return self.tree.drain_events()


class TokenCache:
    """A radix cache of unowned sequences under ``max_tokens``, LRU leaves evicted first."""

    __slots__ = ("hasher", "max_tokens", "tree")

    def __init__(self, max_tokens: int, hasher: BlockHasher | None = None) -> None:
        self.max_tokens = max_tokens
        self.hasher = KnownIdsHasher(hasher) if hasher is not None else None
        self.tree = RadixTree(self.hasher)

    def match(self, tokens: Sequence[int]) -> int:
        return self.tree.match(tokens).length

    def evicted_tokens(self, tokens: tuple[int, ...]) -> int:
        return 0  # LRU leaves go under the token budget; not modelled for the oracle

    def miss_evict_tokens(self) -> int:
        return 0  # not modelled (as above)

    def import_prefix(
        self, tokens: tuple[int, ...], ids: list[int] | None = None, now: float | None = None
    ) -> int:
        """Insert a shipped prefix; returns the tokens now cached that were not before."""
        held = self.tree.match(tokens).length
        if held >= len(tokens):
            return 0
        if self.hasher is not None and ids is not None:
            self.hasher.remember(tokens, ids)
        self.tree.insert(tokens)
        self.tree.evict(self.max_tokens)
        return len(tokens) - held

    def free_slots(self, busy: Collection[int] = ()) -> list[int]:
        return []  # no slots: a holder's push is never taken (it would evict LRU leaves)

    def import_free(
        self,
        tokens: tuple[int, ...],
        ids: list[int] | None = None,
        now: float | None = None,
        busy: Collection[int] = (),
    ) -> int:
        return 0

    def import_evicts(self, tokens: Sequence[int]) -> int:
        return 0  # LRU leaves go under the token budget; not modelled

    def import_victim_ids(self, tokens: Sequence[int]) -> list[int]:
        return []

    def claim(self, tokens: tuple[int, ...]) -> Claim:
        reuse = min(self.tree.match(tokens, touch=True).length, len(tokens) - 1)
        return Claim(0, max(reuse, 0), 0)

    def finish(
        self,
        slot: int,
        sequence: tuple[int, ...],
        ids: list[int] | None = None,
        now: float | None = None,
    ) -> None:
        if self.hasher is not None and ids is not None:
            self.hasher.remember(sequence, ids)
        self.tree.insert(sequence)
        self.tree.evict(self.max_tokens)

    def drain_events(self) -> BlockEvents:
        return self.tree.drain_events()


def _lowest_slot(owners: frozenset[object]) -> int | None:
    """The lowest-numbered slot among a match's owners (this cache's owners are slots)."""
    return min(cast(frozenset[int], owners)) if owners else None
