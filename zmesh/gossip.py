"""Our own advertised block set: sequenced deltas, digest and snapshot parts (sans-IO).

`LocalAdvert` sits between the radix tree's block events and the PUB socket. It keeps
two views of one set without copying it:

- the *published* set (a dict ``id -> parent``), exactly what peers can know: the
  state after the delta numbered ``seq``. ``seq``, ``digest``, ``n_blocks``,
  ``contains`` and ``snapshot_parts`` all describe this view, so a heartbeat
  ``(seq, digest, n_blocks)`` and a snapshot taken at ``seq`` always agree with the
  deltas ``1..seq``;
- the *pending* change (ids to add, ids to remove) applied since the last flush, which
  becomes the next delta(s) ``seq + 1, ...`` when `flush` is called.

Snapshot rule: a snapshot never contains unflushed changes. Those go out later as
delta ``seq + 1``, which continues the snapshot, so a peer that installs the snapshot
and then applies the following deltas ends with exactly our set. Flushing before
taking a snapshot (as the node does) only makes it fresher.

Digest: XOR of all ids (order-free, updated in O(1) per id), always paired with the
count ``n_blocks``. It detects a diverged estimate, not an adversary.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import islice

__all__ = [
    "DEFAULT_MAX_BATCH_BLOCKS",
    "DEFAULT_SNAPSHOT_PART_BLOCKS",
    "DeltaBatch",
    "LocalAdvert",
    "SnapshotPart",
    "set_digest",
]

DEFAULT_MAX_BATCH_BLOCKS = 4096
DEFAULT_SNAPSHOT_PART_BLOCKS = 4096


def set_digest(ids: Iterable[int]) -> int:
    """XOR of ``ids``: independent of order, so both sides can update it per id."""
    return functools.reduce(operator.xor, ids, 0)


@dataclass(frozen=True, slots=True)
class DeltaBatch:
    """One `CacheDelta` to publish. Receivers apply ``removed`` first, then ``added``."""

    seq: int
    added: list[tuple[int, int]]  # (id, parent id)
    removed: list[int]


@dataclass(frozen=True, slots=True)
class SnapshotPart:
    """One chunk of the published set; every part of one snapshot shares seq/digest/n."""

    part: int
    parts: int
    blocks: list[tuple[int, int]]  # (id, parent id)
    seq: int
    digest: int
    n_blocks: int


class LocalAdvert:
    """The block ids this node advertises, numbered by delta ``seq`` within ``epoch``.

    Feed it the radix tree's events with `apply`; publish with `flush` (call it until
    it returns None); answer snapshot requests with `snapshot_parts`.
    """

    __slots__ = (
        "_digest",
        "_pending_add",
        "_pending_rm",
        "_published",
        "_seq",
        "epoch",
        "max_batch_blocks",
    )

    def __init__(self, epoch: int, max_batch_blocks: int = DEFAULT_MAX_BATCH_BLOCKS) -> None:
        if max_batch_blocks < 1:
            raise ValueError("max_batch_blocks must be >= 1")
        self.epoch = epoch
        self.max_batch_blocks = max_batch_blocks
        self._published: dict[int, int] = {}
        self._pending_add: dict[int, int] = {}  # not published yet; insertion order kept
        self._pending_rm: dict[int, None] = {}  # published, to remove (ordered set)
        self._seq = 0
        self._digest = 0

    # ---- the published view ---------------------------------------------------

    @property
    def seq(self) -> int:
        """Number of the last delta returned by `flush` (0: none yet)."""
        return self._seq

    @property
    def digest(self) -> int:
        """XOR of the published ids (state at `seq`)."""
        return self._digest

    @property
    def n_blocks(self) -> int:
        """Number of published ids (state at `seq`)."""
        return len(self._published)

    @property
    def advertised(self) -> Mapping[int, int]:
        """The published set ``id -> parent`` (a live view: do not mutate)."""
        return self._published

    def contains(self, block_id: int) -> bool:
        """Whether ``block_id`` is in the published set (state at `seq`)."""
        return block_id in self._published

    @property
    def pending(self) -> int:
        """Number of id changes waiting for the next `flush`."""
        return len(self._pending_add) + len(self._pending_rm)

    # ---- changes ---------------------------------------------------------------

    def apply(self, added: Iterable[tuple[int, int]], removed: Iterable[int]) -> None:
        """Record one drain of tree events; they are published by the next `flush`.

        The tree adds and removes each id alternately, but a drain keeps two separate
        lists and loses their interleaving, so we count: an id ends present iff
        ``present before + adds - removes`` is positive. Hence an id added then
        removed (in one call or across calls before a flush) cancels out, an id
        removed then re-added is no change, and removing an unknown id is ignored.
        An id determines its parent (chained hash), so a present id's parent is kept.
        """
        net: dict[int, int] = {}
        parents: dict[int, int] = {}
        for block_id, parent in added:
            net[block_id] = net.get(block_id, 0) + 1
            parents[block_id] = parent
        for block_id in removed:
            net[block_id] = net.get(block_id, 0) - 1
        for block_id, change in net.items():
            if change > 0:
                self._make_present(block_id, parents[block_id])
            elif change < 0:
                self._make_absent(block_id)

    def _make_present(self, block_id: int, parent: int) -> None:
        if block_id in self._pending_rm:
            del self._pending_rm[block_id]  # removal not published yet: cancel it
        elif block_id not in self._published:
            self._pending_add.setdefault(block_id, parent)

    def _make_absent(self, block_id: int) -> None:
        if block_id in self._pending_add:
            del self._pending_add[block_id]  # addition not published yet: cancel it
        elif block_id in self._published:
            self._pending_rm[block_id] = None

    def flush(self) -> DeltaBatch | None:
        """Publish up to `max_batch_blocks` pending changes as delta ``seq + 1``.

        Returns None when nothing is pending (seq unchanged). A large change is split
        over several deltas, each a consistent state, so call it until it returns None.
        Removals go first, then additions in the tree's order (parents first).
        """
        if not self._pending_add and not self._pending_rm:
            return None
        budget = self.max_batch_blocks
        published = self._published
        digest = self._digest
        removed = list(islice(self._pending_rm, budget))
        for block_id in removed:
            del self._pending_rm[block_id]
            del published[block_id]
            digest ^= block_id
        added = list(islice(self._pending_add.items(), budget - len(removed)))
        for block_id, parent in added:
            del self._pending_add[block_id]
            published[block_id] = parent
            digest ^= block_id
        self._digest = digest
        self._seq += 1
        return DeltaBatch(self._seq, added, removed)

    # ---- snapshots -------------------------------------------------------------

    def snapshot_parts(self, max_blocks: int = DEFAULT_SNAPSHOT_PART_BLOCKS) -> list[SnapshotPart]:
        """The published set at `seq`, cut into parts of at most ``max_blocks`` blocks.

        Pending (unflushed) changes are not included: see the module docstring. An
        empty set is one empty part, so the receiver still learns seq and digest.
        """
        if max_blocks < 1:
            raise ValueError("max_blocks must be >= 1")
        items = list(self._published.items())
        chunks = [items[i : i + max_blocks] for i in range(0, len(items), max_blocks)] or [[]]
        n = len(items)
        return [
            SnapshotPart(i, len(chunks), chunk, self._seq, self._digest, n)
            for i, chunk in enumerate(chunks)
        ]
