"""KV shipping at the engine: export a slot's cached prefix, import a shipped one.

Both run under the llama.cpp lock, so any thread may call them (once the engine is
closed they raise `closed_error`); the node runs them on the engine thread between two
steps (`Engine.call_soon`). An export reads a busy slot's stable prefix too (shared
into the scratch sequence, nothing copied); an import only ever lands in an idle slot.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from typing import cast

import llama_cpp as ll

from zmesh.blocks import BlockHasher
from zmesh.engine.pool import SlotPool
from zmesh.kvstate import KvRefused, KvState, make_state, verify
from zmesh.slots import SlotView, victim


class KvPool(SlotPool):
    def export_prefix(
        self, tokens: Sequence[int], namespace: str, min_tokens: int = 1
    ) -> KvState | None:
        """The KV state of the longest prefix of ``tokens`` that a slot of ``namespace``
        holds, or None if none holds ``min_tokens`` of it. The slot itself is untouched:
        its prefix is shared into the scratch sequence (no copy), read out, and dropped."""
        with self._live():
            best, common = self._longest_holder(tokens, namespace)
            common = min(common, self.max_ship_tokens)
            if best is None or common < max(min_tokens, 1):
                return None
            scratch = self._scratch_seq
            ll.llama_memory_seq_rm(self._mem, scratch, -1, -1)
            ll.llama_memory_seq_cp(self._mem, best.seq, scratch, 0, common)
            try:
                size = ll.llama_state_seq_get_size(self._ctx, scratch)
                buf = (ctypes.c_uint8 * size)()
                written = ll.llama_state_seq_get_data(self._ctx, buf, size, scratch)
                payload = ctypes.string_at(buf, written)
            finally:
                ll.llama_memory_seq_rm(self._mem, scratch, -1, -1)
            return make_state(self.kv_layout, namespace, list(best.tokens[:common]), payload)

    def import_prefix(self, state: KvState, namespace: str, *, free_only: bool = False) -> int:
        """Load a shipped prefix into an idle slot of ``namespace``; returns the tokens
        now cached that were not before (0 if a slot already held as much). Raises
        `KvRefused` for a state that does not fit this engine, or when every slot is
        busy; then no slot or tree holds any of it. ``free_only`` (a holder's push, no
        request waiting for it): only into an empty slot, else `KvRefused`
        ("no_free_slot"), and the slot is not reserved: no request will claim it."""
        verify(state, self.kv_layout, namespace, self.max_prompt_tokens)
        tokens = list(state.header.tokens)
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise KvRefused("tokens", f"token id {bad} outside 0..{self.n_vocab - 1}")
        with self._live():
            _, held = self._longest_holder(tokens, namespace)
            if held >= len(tokens):
                return 0
            with self._lock:
                index, views = self._import_target(tokens, namespace)
                if free_only and index is not None and views[index].held:
                    index = None  # victim() takes an empty idle slot first: none is
                elif index is not None and not free_only:
                    # Until its request claims it: a second import before then (the
                    # same turn of the engine thread, say) must not overwrite it.
                    self._reserved.add(index)
            if index is None:
                if free_only:
                    raise KvRefused("no_free_slot", "no empty idle slot (a push evicts nothing)")
                raise KvRefused("busy", "every slot runs a request")
            target = self._slots[index]
            if target.tokens:
                self.stats.evictions += 1
                self.stats.evicted_tokens += len(target.tokens)
            self._truncate(target, 0)
            payload = state.payload
            buf = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
            read = ll.llama_state_seq_set_data(self._ctx, buf, len(payload), target.seq)
            pos_min = ll.llama_memory_seq_pos_min(self._mem, target.seq)
            pos_max = ll.llama_memory_seq_pos_max(self._mem, target.seq)
            if read == 0 or pos_min != 0 or pos_max + 1 != len(tokens):
                ll.llama_memory_seq_rm(self._mem, target.seq, -1, -1)
                with self._lock:
                    self._reserved.discard(index)
                raise KvRefused(
                    "rejected",
                    f"llama.cpp did not load the state (read {read} bytes, "
                    f"positions {pos_min}..{pos_max} for {len(tokens)} tokens)",
                )
            target.namespace = namespace
            target.tokens = tokens
            with self._lock:
                target.last_used = time.monotonic()
            self._publish(target)
            return len(tokens) - held

    def free_slots(self) -> int:
        """Idle slots holding nothing and reserved by no import: where a pushed prefix
        lands without evicting anything (`import_prefix(..., free_only=True)`)."""
        with self._lock:
            _, views = self._import_target((), "")
        return sum(1 for v in views if not v.busy and not v.held)

    def import_evicts(self, tokens: Sequence[int], namespace: str) -> int:
        """Cached tokens that importing a prefix of ``tokens`` longer than this engine's
        match would overwrite now: all of the slot `import_prefix` would pick (0 when a
        slot is empty, or none could take it). `SlotCache.import_evicts` is its model
        (tests/test_slots.py runs both on one sequence). Any thread: it reads the trees
        and the slot facts under the tree lock, as `local_match` does, never llama.cpp."""
        with self._lock:
            index, views = self._import_target(tokens, namespace)
        return views[index].held if index is not None else 0

    def import_victim(self, tokens: Sequence[int], namespace: str) -> tuple[int, list[int]]:
        """`import_evicts`, and the block ids (of its own namespace) of what it names
        ([] for nothing): peers whose estimates hold them can give them back, so routing
        charges those tokens as a pull rather than a prefill (`shipping.evict_charge_s`)."""
        with self._lock:
            index, views = self._import_target(tokens, namespace)
            if index is None or not views[index].held:
                return 0, []
            for tree in self._trees.values():
                seq = tree.sequences().get(index)
                if seq:
                    return views[index].held, cast(BlockHasher, tree.hasher).block_ids(seq)
            return views[index].held, []

    def _import_target(
        self, tokens: Sequence[int], namespace: str
    ) -> tuple[int | None, list[SlotView]]:
        """The slot an import of a prefix of ``tokens`` takes, and the views it was chosen
        from; under ``_lock``. `zmesh.slots.victim` sparing the slot holding the longest
        prefix (the lowest-numbered), else that holder when it is the only idle slot.
        Read from the trees, exact for idle slots (a busy slot's tree may lag behind it,
        but a busy slot is never a target). Reserved slots count as busy."""
        tree = self._trees.get(namespace)
        m = tree.match(tokens) if tree is not None else None
        holder = min(cast(frozenset[int], m.owners)) if m and m.length and m.owners else None
        held = [0] * len(self._slots)
        for t in self._trees.values():
            for seq, seq_tokens in t.sequences().items():
                held[cast(int, seq)] = len(seq_tokens)
        views = [
            SlotView(held[i], 0, s.last_used, s.busy or i in self._reserved)
            for i, s in enumerate(self._slots)
        ]
        index = victim(views, holder)
        if index is None and holder is not None and not views[holder].busy:
            index = holder  # the only idle slot: the longer import replaces it
        return index, views
