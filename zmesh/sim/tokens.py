"""Prompt text -> token ids and block ids for the simulator, computed once per prompt.

The simulator does not load the model: a stand-in tokenizer cuts text into pieces of
at most 4 characters with their leading space (about what a BPE vocabulary does to
English) and maps each piece to a stable id. What matters for caching is kept exactly:
prompts that share text share a token prefix, and lengths are close to the real ones.
Block ids come from the real `BlockHasher`; a shared prefix is hashed once and a
request only hashes its own blocks (`block_ids(..., start_block, parent)`).
"""

from __future__ import annotations

import re
import zlib

from zmesh.blocks import BlockHasher
from zmesh.workload import Workload

__all__ = ["PromptTable", "pseudo_tokenize"]

_PIECE = re.compile(r"\s?[A-Za-z]{1,4}|\s?\d{1,3}|\s?[^\sA-Za-z\d]|\s")
VOCAB = 262_144


class _Vocab(dict[str, int]):
    """piece -> id, filled on first sight (a crc32 is stable across processes)."""

    def __missing__(self, piece: str) -> int:
        token = self[piece] = zlib.crc32(piece.encode()) % VOCAB
        return token


_VOCAB = _Vocab()


def pseudo_tokenize(text: str) -> list[int]:
    return list(map(_VOCAB.__getitem__, _PIECE.findall(text)))


class PromptTable:
    """Tokens and block ids of a workload's requests, with the shared parts memoised."""

    def __init__(self, workload: Workload, hasher: BlockHasher, memo_limit: int = 20_000) -> None:
        self.workload = workload
        self.hasher = hasher
        self.memo_limit = memo_limit
        self._prefix: dict[str, tuple[tuple[int, ...], list[int]]] = {}
        self._suffix: dict[str, tuple[int, ...]] = {}
        self._req: dict[int, tuple[tuple[int, ...], list[int]]] = {}
        self._pair: dict[tuple[str, str], tuple[tuple[int, ...], list[int]]] = {}
        self._chained = any(r.parent >= 0 for r in workload.requests)

    def _suffix_tokens(self, text: str) -> tuple[int, ...]:
        toks = self._suffix.get(text)
        if toks is None:
            if len(self._suffix) >= self.memo_limit:
                self._suffix.clear()
            toks = self._suffix[text] = tuple(pseudo_tokenize(text))
        return toks

    def _prefix_entry(self, text: str) -> tuple[tuple[int, ...], list[int]]:
        entry = self._prefix.get(text)
        if entry is None:
            toks = tuple(pseudo_tokenize(text))
            entry = self._prefix[text] = (toks, self.hasher.block_ids(toks))
        return entry

    def _extend(
        self, head: tuple[int, ...], head_ids: list[int], tail: tuple[int, ...]
    ) -> tuple[tuple[int, ...], list[int]]:
        tokens = head + tail
        n = len(head_ids)
        parent = head_ids[-1] if n else None
        more = self.hasher.block_ids(tokens, n, parent) if n else self.hasher.block_ids(tokens)
        return tokens, (head_ids + more) if n else more

    def get(self, i: int) -> tuple[tuple[int, ...], list[int]]:
        """(tokens, block ids) of request ``i``."""
        r = self.workload.requests[i]
        if r.parent >= 0:
            got = self._req.get(i)
            if got is None:
                head, head_ids = self.get(r.parent)
                got = self._req[i] = self._extend(head, head_ids, self._suffix_tokens(r.suffix))
            return got
        key = (r.prefix, r.suffix)
        got = self._pair.get(key)
        if got is None:
            if len(self._pair) >= self.memo_limit:
                self._pair.clear()
            head, head_ids = self._prefix_entry(r.prefix)
            got = self._extend(head, head_ids, self._suffix_tokens(r.suffix))
            self._pair[key] = got
        if self._chained:
            self._req[i] = got  # chat children extend it
        return got
