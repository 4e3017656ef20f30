"""The slot pool: what each KV slot holds, the radix trees that mirror it, and
applying the slot policy (zmesh/slots.py) to llama.cpp's memory.

One model and one context hold ``n_slots`` sequences (slots) in a unified KV cache.
A request reuses the longest cached prefix of any slot of its namespace: it either
continues in that slot after rolling it back to the shared prefix, or shares the
prefix into another slot with ``llama_memory_seq_cp`` (no copy: cells are tagged
with both sequences). A slot that a running request decodes in is busy (pinned): it
is never rolled back or evicted, only shared from.

Each namespace (tenant) has a radix tree; slots never share cache across
namespaces. A tree never claims more than a slot holds: it is cut back before a slot
is overwritten and extended after the work (for a busy slot, once its prompt is in,
and when its request ends). Tree queries come from other threads (the routing
loop), guarded by ``_lock``, as are the slot facts those threads read beside them
(``busy``, ``last_used``, the import reservations: see `KvPool.import_evicts`);
llama.cpp's state is touched under ``_llama``, through `LlamaBase._live`: after a
close every such call raises `closed_error`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import llama_cpp as ll

from zmesh.blocks import DEFAULT_KEY, BlockHasher
from zmesh.config import EngineConfig
from zmesh.engine.llama import LlamaBase
from zmesh.engine.types import EngineStats
from zmesh.kvstate import KvLayout
from zmesh.radix import BlockEvents, RadixTree
from zmesh.slots import Choice, SlotView, choose, common_prefix


@dataclass(slots=True)
class _Slot:
    seq: int
    namespace: str | None = None
    tokens: list[int] = field(default_factory=list)  # decoded into llama.cpp
    last_used: float = 0.0
    busy: bool = False  # a running request decodes here: pinned


class SlotPool(LlamaBase):
    def __init__(self, cfg: EngineConfig, hash_key: bytes = DEFAULT_KEY) -> None:
        super().__init__(cfg)
        self.hash_key = hash_key
        self.block_size = cfg.block_size
        self.stats = EngineStats()
        self._lock = threading.Lock()  # guards slots' trees against routing reads
        self._trees: dict[str, RadixTree] = {}
        self._slots = [_Slot(seq=i) for i in range(cfg.n_slots)]
        self._scratch_seq = cfg.n_slots
        # Slots an import filled for a request not yet admitted: no other import takes
        # them (`KvPool.import_prefix`); dropped when a claim takes the slot or nothing
        # waits any more. Under ``_lock``.
        self._reserved: set[int] = set()

    # ---- cache view (thread-safe) -----------------------------------------

    def hasher(self, namespace: str) -> BlockHasher:
        with self._lock:  # the routing thread may ask while the engine adds a tree
            return self._tree(namespace).hasher  # type: ignore[return-value]

    def _tree(self, namespace: str) -> RadixTree:
        tree = self._trees.get(namespace)
        if tree is None:
            hasher = BlockHasher(self.fingerprint, namespace, self.block_size, self.hash_key)
            tree = self._trees[namespace] = RadixTree(hasher)
        return tree

    def _publish(self, slot: _Slot) -> None:
        """Make the slot's tree hold what the slot holds."""
        with self._lock:
            if slot.namespace is not None:
                self._tree(slot.namespace).set_sequence(slot.seq, slot.tokens)

    def local_match(self, tokens: Sequence[int], namespace: str) -> int:
        """Tokens of ``tokens`` cached in some slot of ``namespace``."""
        with self._lock:
            tree = self._trees.get(namespace)
            return tree.match(tokens).length if tree else 0

    def evict_tokens(self, tokens: Sequence[int], namespace: str) -> int:
        """Cached tokens of other content that serving ``tokens`` here would overwrite:
        the slot policy's choice (`choose`) on the slots as published, every one taken
        as idle (a request waits for its slot); 0 in place or into an empty slot."""
        with self._lock:
            views = []
            for s in self._slots:
                tree = self._trees.get(s.namespace) if s.namespace is not None else None
                held = tree.sequence(s.seq) if tree is not None else ()
                common = common_prefix(held, tokens) if s.namespace == namespace else 0
                views.append(SlotView(len(held), common, s.last_used))
        c = choose(views, len(tokens)) if tokens else None
        return 0 if c is None or c.in_place else c.evicted

    def drain_events(self) -> BlockEvents:
        """Block ids added/removed across all namespaces since the last drain."""
        out = BlockEvents()
        with self._lock:
            for ns, tree in list(self._trees.items()):
                ev = tree.drain_events()
                out.added.extend(ev.added)
                out.removed.extend(ev.removed)
                if not tree.sequences():  # one tree per tenant seen: drop empty ones
                    del self._trees[ns]
        return out

    def block_ids(self) -> set[int]:
        with self._lock:
            return {b for tree in self._trees.values() for b in tree.block_ids()}

    def busy_slots(self) -> int:
        """Slots holding cached tokens (running a request or not)."""
        return sum(1 for s in self._slots if s.tokens)

    def running_slots(self) -> int:
        """Slots a request is running in now."""
        return sum(1 for s in self._slots if s.busy)

    def slot_tokens(self) -> list[tuple[str | None, list[int]]]:
        return [(s.namespace, list(s.tokens)) for s in self._slots]

    def slot_state_bytes(self, slot: int) -> int:
        with self._live():
            return int(ll.llama_state_seq_get_size(self._ctx, slot))

    @property
    def kv_layout(self) -> KvLayout:
        """What a shipped KV state must agree with to be imported here."""
        return KvLayout(
            fingerprint=self.fingerprint.hex(),
            llama_version=ll.__version__,
            slot_ctx=self.slot_ctx,
            kv_type="f16",  # llama.cpp's default cell type; zmesh does not change it
            swa_full=True,
        )

    def check_consistency(self) -> list[str]:
        """Differences between llama.cpp's memory, the slots and the trees (empty =
        ok). A busy slot's tree may lag behind it, never run ahead of it."""
        problems = []
        with self._live(), self._lock:
            for s in self._slots:
                pos_max = ll.llama_memory_seq_pos_max(self._mem, s.seq)
                pos_min = ll.llama_memory_seq_pos_min(self._mem, s.seq)
                if pos_max + 1 != len(s.tokens):
                    problems.append(
                        f"slot {s.seq}: llama.cpp pos_max {pos_max}, slot {len(s.tokens)}"
                    )
                if s.tokens and pos_min != 0:
                    problems.append(f"slot {s.seq}: llama.cpp pos_min {pos_min}")
                if s.tokens and not s.busy and s.namespace not in self._trees:
                    problems.append(f"slot {s.seq}: no tree for namespace {s.namespace}")
                for ns, tree in self._trees.items():
                    want = tuple(s.tokens) if s.namespace == ns else ()
                    have = tree.sequence(s.seq)
                    if s.busy and s.namespace == ns:
                        if have != want[: len(have)]:
                            problems.append(f"slot {s.seq}: tree[{ns}] runs ahead of the slot")
                    elif have != want:
                        problems.append(f"slot {s.seq}: tree[{ns}] disagrees with the slot")
        return problems

    # ---- the slot policy, applied -------------------------------------------

    def _views(self, tokens: Sequence[int], namespace: str) -> list[SlotView]:
        return [
            SlotView(
                held=len(s.tokens),
                common=common_prefix(s.tokens, tokens) if s.namespace == namespace else 0,
                last_used=s.last_used,
                busy=s.busy,
            )
            for s in self._slots
        ]

    def _longest_holder(self, tokens: Sequence[int], namespace: str) -> tuple[_Slot | None, int]:
        """The slot of ``namespace`` sharing the longest prefix with ``tokens``, and its length."""
        best, common = None, 0
        for s in self._slots:
            if s.namespace == namespace and s.tokens:
                n = common_prefix(s.tokens, tokens)
                if n > common:
                    best, common = s, n
        return best, common

    def _claim(self, ids: list[int], namespace: str) -> Choice | None:
        """Choose the slot for ``ids`` and make it hold the reusable prefix; None when
        every slot it could take is busy. The slot is then busy (pinned)."""
        with self._live():
            c = choose(self._views(ids, namespace), len(ids))
            if c is None:
                return None
            target = self._slots[c.slot]
            if c.in_place:
                self._truncate(target, c.reuse)
            else:
                if c.evicted:
                    self.stats.evictions += 1
                    self.stats.evicted_tokens += c.evicted
                self._truncate(target, 0)
                target.namespace = namespace
                if c.source is not None:
                    source = self._slots[c.source]
                    ll.llama_memory_seq_cp(self._mem, source.seq, target.seq, 0, c.reuse)
                    target.tokens = source.tokens[: c.reuse]
                self._publish(target)
            with self._lock:
                target.busy = True
                self._reserved.discard(target.seq)  # the import it held was for this claim
            return c

    def _release(self, slot: _Slot) -> None:
        """The slot's request ended: publish what it holds; it is idle again."""
        self._publish(slot)
        with self._lock:  # read together with the trees by other threads
            slot.last_used = time.monotonic()
            slot.busy = False

    def _drop_reservations(self) -> None:
        with self._lock:
            self._reserved.clear()

    def _truncate(self, slot: _Slot, keep: int) -> None:
        """Roll ``slot`` back to its first ``keep`` tokens, in llama.cpp and the tree."""
        if keep >= len(slot.tokens):
            return
        with self._live():
            if not ll.llama_memory_seq_rm(self._mem, slot.seq, keep, -1):
                ll.llama_memory_seq_rm(self._mem, slot.seq, -1, -1)
                keep = 0
        slot.tokens = slot.tokens[:keep]
        with self._lock:
            if slot.namespace is not None:
                self._tree(slot.namespace).set_sequence(slot.seq, slot.tokens)
            if not slot.tokens:
                slot.namespace = None

    def clear(self) -> None:
        """Drop what every idle slot holds (benchmarks and tests start over with it)."""
        with self._live():
            for s in self._slots:
                if not s.busy:
                    self._truncate(s, 0)
