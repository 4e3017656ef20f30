"""Block ids: pinned values (they are on the wire: peers of two versions must agree)
and the chained definition, against a plain reference, for any tokens and resumes."""

from __future__ import annotations

import hashlib
from array import array

from hypothesis import given
from hypothesis import strategies as st

from zmesh.blocks import ID_BYTES, BlockHasher


def _reference(h: BlockHasher, tokens: list[int], start: int, parent: int) -> list[int]:
    """Block i's id = keyed blake2b-64(id of block i-1 LE, tokens of block i as int32 LE)."""
    ids, prev, bs = [], parent, h.block_size
    for i in range(start, len(tokens) // bs):
        payload = (
            prev.to_bytes(ID_BYTES, "little") + array("i", tokens[i * bs : (i + 1) * bs]).tobytes()
        )
        digest = hashlib.blake2b(payload, digest_size=ID_BYTES, key=h.key).digest()
        prev = int.from_bytes(digest, "little")
        ids.append(prev)
    return ids


def test_ids_are_pinned() -> None:
    h = BlockHasher(b"model-fingerprint", "tenant-a", block_size=4)
    assert h.block_ids(list(range(100, 113))) == [
        6410341119958593384,
        15765172575326381246,
        7001726529140338332,
    ]
    assert h.block_ids([2**31 - 1, 0, 5, 262143, 7, 8, 9, 10]) == [
        16670831366036034153,
        12386501464640228043,
    ]


@given(
    tokens=st.lists(st.integers(0, 2**31 - 1), max_size=80),
    block_size=st.integers(1, 9),
    cut=st.integers(0, 12),
)
def test_ids_follow_the_chained_definition_also_when_resumed(
    tokens: list[int], block_size: int, cut: int
) -> None:
    h = BlockHasher(b"fp", "t", block_size=block_size)
    full = h.block_ids(tokens)
    assert full == _reference(h, tokens, 0, h.seed)
    start = min(cut, len(full))
    if start:
        assert h.block_ids(tokens, start, full[start - 1]) == full[start:]
    assert h.block_ids(tokens[: block_size - 1]) == []
