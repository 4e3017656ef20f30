"""Compressed token radix tree mirroring what a node's KV cache holds.

Two ways to use it (one per tree, not mixed):
- owned (the engine): each slot is an *owner* holding exactly one token sequence;
  `set_sequence` / `release` keep the tree equal to the slots, pruning at once.
- cache mode (the simulator): `insert` unowned sequences, `evict` LRU leaves
  under a token budget, like SGLang's RadixCache.

With a `BlockHasher`, every node knows the ids of the full blocks that *end* inside
its token range, so the advertised id set is the union over nodes; it stays
prefix-closed because nodes only ever leave leaf-first. Every change of that set is
queued as an event for the gossip layer (`drain_events`).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

from zmesh.blocks import BlockHasher


@dataclass(slots=True)
class BlockEvents:
    """Changes of the advertised block-id set since the last drain."""

    added: list[tuple[int, int]] = field(default_factory=list)  # (id, parent id)
    removed: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass(frozen=True, slots=True)
class Match:
    length: int  # tokens of the query found in the tree
    owners: frozenset[Hashable]  # owners whose sequence holds that whole match


class _Node:
    __slots__ = ("blocks", "children", "key", "last_access", "owners", "parent", "start")

    def __init__(self, parent: _Node | None, key: tuple[int, ...], start: int) -> None:
        self.parent = parent
        self.key = key  # the token segment on the edge into this node
        self.start = start  # depth (in tokens) where the segment begins
        self.children: dict[int, _Node] = {}
        self.owners: set[Hashable] = set()  # owners whose sequence covers this node
        self.blocks: list[int] = []  # ids of full blocks ending inside this segment
        self.last_access = 0

    @property
    def end(self) -> int:
        return self.start + len(self.key)


def common_length(a: Sequence[int], b: Sequence[int], b_offset: int = 0) -> int:
    """Length of the common prefix of a and b[b_offset:]."""
    n = min(len(a), len(b) - b_offset)
    x, y = tuple(a[:n]), tuple(b[b_offset : b_offset + n])
    if x == y:
        return n
    # Bisect on slice equality: C-speed compares instead of a Python step per token
    # (prompts share hundreds of tokens before they differ). x[:lo] == y[:lo] and
    # x[:hi] != y[:hi] throughout.
    lo, hi = 0, n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x[lo:mid] == y[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class RadixTree:
    def __init__(self, hasher: BlockHasher | None = None) -> None:
        self.hasher = hasher
        self.root = _Node(None, (), 0)
        self.total_tokens = 0
        self._seqs: dict[Hashable, tuple[int, ...]] = {}
        self._events = BlockEvents()
        self._clock = itertools.count(1)
        self._n_blocks = 0

    # ---- queries -------------------------------------------------------------

    def match(self, tokens: Sequence[int], touch: bool = False) -> Match:
        """Longest prefix of ``tokens`` held; ``touch`` marks the path recently used."""
        node, i, n = self.root, 0, len(tokens)
        owners: frozenset[Hashable] = frozenset()
        now = next(self._clock) if touch else 0
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                break
            matched = common_length(child.key, tokens, i)
            owners = frozenset(child.owners)
            if touch:
                child.last_access = now
            i += matched
            if matched < len(child.key):
                break
            node = child
        return Match(i, owners)

    def sequences(self) -> dict[Hashable, tuple[int, ...]]:
        return dict(self._seqs)

    def sequence(self, owner: Hashable) -> tuple[int, ...]:
        return self._seqs.get(owner, ())

    @property
    def n_blocks(self) -> int:
        return self._n_blocks

    def block_ids(self) -> set[int]:
        return {b for node in self._nodes() for b in node.blocks}

    def node_count(self) -> int:
        return sum(1 for _ in self._nodes())

    def drain_events(self) -> BlockEvents:
        events, self._events = self._events, BlockEvents()
        return events

    # ---- owned mode ----------------------------------------------------------

    def set_sequence(self, owner: Hashable, tokens: Sequence[int]) -> None:
        """Make ``owner`` hold exactly ``tokens`` (its old tail is released)."""
        new = tuple(tokens)
        old = self._seqs.get(owner, ())
        keep = common_length(old, new)
        if keep < len(old):
            self._truncate(owner, old, keep)
        if new:
            self._seqs[owner] = new
            if keep < len(new):
                self._insert(new, owner)
        else:
            self._seqs.pop(owner, None)

    def release(self, owner: Hashable) -> None:
        self.set_sequence(owner, ())

    # ---- cache mode ----------------------------------------------------------

    def insert(self, tokens: Sequence[int]) -> None:
        """Insert an unowned sequence (evictable by `evict`)."""
        if tokens:
            self._insert(tuple(tokens), None)

    def evict(self, max_tokens: int) -> int:
        """Drop least-recently-used unowned leaves until at most ``max_tokens`` remain.

        Returns the number of tokens freed.
        """
        if self.total_tokens <= max_tokens:
            return 0
        before = self.total_tokens
        heap = [(n.last_access, id(n), n) for n in self._nodes() if self._evictable(n)]
        heapq.heapify(heap)
        while heap and self.total_tokens > max_tokens:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            self._delete_leaf(node)
            if parent is not None and parent is not self.root and self._evictable(parent):
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return before - self.total_tokens

    # ---- internals -----------------------------------------------------------

    def _nodes(self) -> Iterator[_Node]:
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    @staticmethod
    def _evictable(node: _Node) -> bool:
        return not node.children and not node.owners

    def _insert(self, tokens: tuple[int, ...], owner: Hashable | None) -> None:
        node, i, n = self.root, 0, len(tokens)
        now = next(self._clock)
        chain: list[int] | None = None  # block ids of tokens, computed on first need
        while i < n:
            child = node.children.get(tokens[i])
            if child is None:
                child = _Node(node, tokens[i:], i)
                node.children[tokens[i]] = child
                self.total_tokens += len(child.key)
                if self.hasher is not None:
                    if chain is None:
                        chain = self.hasher.block_ids(tokens)
                    self._assign_new_blocks(child, chain)
            else:
                matched = common_length(child.key, tokens, i)
                if matched < len(child.key):
                    child = self._split(child, matched)
            if owner is not None:
                child.owners.add(owner)
            child.last_access = now
            i = child.end
            node = child

    def _assign_new_blocks(self, node: _Node, chain: list[int]) -> None:
        bs = self.hasher.block_size  # type: ignore[union-attr]
        first, last = node.start // bs, node.end // bs  # blocks first..last-1 end inside
        if first >= last:
            return
        node.blocks = chain[first:last]
        seed = self.hasher.seed  # type: ignore[union-attr]
        for k in range(first, last):
            self._events.added.append((chain[k], chain[k - 1] if k else seed))
        self._n_blocks += last - first

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s segment after ``at`` tokens; return the new upper node."""
        parent = node.parent
        assert parent is not None and 0 < at < len(node.key)
        upper = _Node(parent, node.key[:at], node.start)
        upper.owners = set(node.owners)
        upper.last_access = node.last_access
        if self.hasher is not None:
            bs = self.hasher.block_size
            n_upper = (node.start + at) // bs - node.start // bs
            upper.blocks, node.blocks = node.blocks[:n_upper], node.blocks[n_upper:]
        parent.children[node.key[0]] = upper
        node.key = node.key[at:]
        node.start += at
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    def _truncate(self, owner: Hashable, old: tuple[int, ...], keep: int) -> None:
        """Release ``owner`` from every node of its path deeper than ``keep`` tokens."""
        path: list[_Node] = []
        node, i = self.root, 0
        while i < len(old):
            child = node.children[old[i]]
            if child.start < keep < child.end:
                child = self._split(child, keep - child.start)
            path.append(child)
            i = child.end
            node = child
        for node in reversed(path):
            if node.start < keep:
                break
            node.owners.discard(owner)
            if not node.owners and not node.children:
                self._delete_leaf(node)

    def _delete_leaf(self, node: _Node) -> None:
        parent = node.parent
        assert parent is not None and not node.children
        del parent.children[node.key[0]]
        node.parent = None
        self.total_tokens -= len(node.key)
        if node.blocks:
            self._events.removed.extend(reversed(node.blocks))
            self._n_blocks -= len(node.blocks)
