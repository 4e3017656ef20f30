"""LocalAdvert: the published set, sequenced deltas, cancellation, batching, snapshots."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.gossip import DeltaBatch, LocalAdvert, SnapshotPart, set_digest

U64 = 2**64 - 1


def parent_of(block_id: int) -> int:
    """Any fixed parent per id: in the real tree the id hashes its parent."""
    return (block_id * 0x9E3779B97F4A7C15) & U64


def adds(*ids: int) -> list[tuple[int, int]]:
    return [(i, parent_of(i)) for i in ids]


def flush_all(advert: LocalAdvert) -> list[DeltaBatch]:
    out = []
    while (batch := advert.flush()) is not None:
        out.append(batch)
    return out


def replay(batches: list[DeltaBatch], start: dict[int, int] | None = None) -> dict[int, int]:
    state = dict(start or {})
    for b in batches:
        for i in b.removed:
            del state[i]
        state.update(b.added)
    return state


def rebuild(parts: list[SnapshotPart]) -> dict[int, int]:
    state: dict[int, int] = {}
    for p in parts:
        state.update(p.blocks)
    return state


# ---- digest ------------------------------------------------------------------


def test_digest_is_order_free_and_incremental() -> None:
    ids = [random.Random(7).getrandbits(64) for _ in range(100)]
    assert set_digest([]) == 0
    assert set_digest(ids) == set_digest(reversed(ids)) == set_digest(sorted(ids))
    d = 0
    for i in ids:
        d ^= i
    assert d == set_digest(ids)
    assert set_digest(ids[:-1]) == set_digest(ids) ^ ids[-1]  # removing one id is one XOR


# ---- publishing --------------------------------------------------------------


def test_fresh_advert_is_empty_and_quiet() -> None:
    a = LocalAdvert(epoch=42)
    assert (a.epoch, a.seq, a.digest, a.n_blocks, a.pending) == (42, 0, 0, 0, 0)
    assert a.flush() is None
    assert a.seq == 0
    assert a.snapshot_parts() == [SnapshotPart(0, 1, [], 0, 0, 0)]


def test_flush_publishes_one_delta_and_bumps_seq() -> None:
    a = LocalAdvert(1)
    a.apply(adds(10, 11, 12), [])
    assert a.pending == 3
    assert a.seq == 0 and a.n_blocks == 0 and not a.contains(10)  # not published yet
    b = a.flush()
    assert b == DeltaBatch(1, adds(10, 11, 12), [])
    assert (a.seq, a.n_blocks, a.digest, a.pending) == (1, 3, 10 ^ 11 ^ 12, 0)
    assert a.contains(10) and dict(a.advertised) == dict(adds(10, 11, 12))
    assert a.flush() is None and a.seq == 1  # nothing pending: no seq

    a.apply([], [11])
    assert a.flush() == DeltaBatch(2, [], [11])
    assert (a.seq, a.n_blocks, a.digest) == (2, 2, 10 ^ 12)
    assert not a.contains(11)


def test_add_then_remove_in_one_apply_cancels() -> None:
    a = LocalAdvert(1)
    a.apply(adds(1, 2), [1])
    assert a.flush() == DeltaBatch(1, adds(2), [])
    a.apply(adds(3), [3])
    assert a.pending == 0
    assert a.flush() is None and a.seq == 1


def test_add_then_remove_across_applies_before_flush_cancels() -> None:
    a = LocalAdvert(1)
    a.apply(adds(5), [])
    a.apply([], [5])
    assert a.flush() is None and a.seq == 0


def test_remove_then_readd_of_published_id_is_no_change() -> None:
    a = LocalAdvert(1)
    a.apply(adds(5, 6), [])
    flush_all(a)
    a.apply([], [5])
    a.apply(adds(5), [])
    assert a.flush() is None
    a.apply(adds(6), [6])  # one drain: removed and re-added (interleaving unknown)
    assert a.flush() is None
    assert a.contains(5) and a.contains(6) and a.seq == 1


def test_remove_unknown_and_readd_present_are_ignored() -> None:
    a = LocalAdvert(1)
    a.apply(adds(1), [99])
    assert a.flush() == DeltaBatch(1, adds(1), [])
    a.apply(adds(1), [])  # already published
    a.apply([], [98])
    assert a.flush() is None


def test_big_change_is_split_into_bounded_batches() -> None:
    a = LocalAdvert(1, max_batch_blocks=4)
    a.apply(adds(*range(1, 11)), [])
    batches = flush_all(a)
    assert [b.seq for b in batches] == [1, 2, 3]
    assert [len(b.added) for b in batches] == [4, 4, 2]
    assert [i for b in batches for i, _ in b.added] == list(range(1, 11))  # tree order kept
    assert a.seq == 3 and a.n_blocks == 10

    a.apply(adds(11, 12, 13), [1, 2, 3])  # removals go first, each batch <= 4 entries
    batches = flush_all(a)
    assert [(b.seq, b.removed, [i for i, _ in b.added]) for b in batches] == [
        (4, [1, 2, 3], [11]),
        (5, [], [12, 13]),
    ]
    assert replay(batches, dict(adds(*range(1, 11)))) == dict(a.advertised)


def test_default_batch_bound_is_4096() -> None:
    a = LocalAdvert(1)
    a.apply(adds(*range(1, 4098)), [])
    batches = flush_all(a)
    assert [len(b.added) for b in batches] == [4096, 1]


def test_snapshot_describes_published_state_only() -> None:
    a = LocalAdvert(3)
    a.apply(adds(1, 2, 3, 4, 5), [])
    flush_all(a)
    a.apply(adds(6), [1])  # pending: not in the snapshot, goes out as delta seq+1
    parts = a.snapshot_parts(max_blocks=2)
    assert [(p.part, p.parts) for p in parts] == [(0, 3), (1, 3), (2, 3)]
    assert all((p.seq, p.digest, p.n_blocks) == (1, set_digest([1, 2, 3, 4, 5]), 5) for p in parts)
    assert all(len(p.blocks) <= 2 for p in parts)
    snap = rebuild(parts)
    assert snap == dict(adds(1, 2, 3, 4, 5))
    (delta,) = flush_all(a)
    assert delta.seq == parts[0].seq + 1
    assert replay([delta], snap) == dict(a.advertised) == dict(adds(2, 3, 4, 5, 6))


def test_invalid_bounds_are_rejected() -> None:
    with pytest.raises(ValueError):
        LocalAdvert(1, max_batch_blocks=0)
    with pytest.raises(ValueError):
        LocalAdvert(1).snapshot_parts(0)


# ---- properties --------------------------------------------------------------

ids_u64 = st.lists(st.integers(0, U64), min_size=1, max_size=24, unique=True)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), universe=ids_u64, max_batch=st.integers(1, 6))
def test_deltas_replay_to_the_published_set(
    data: st.DataObject, universe: list[int], max_batch: int
) -> None:
    """Random drains (toggles, interleaving lost), random flushes: deltas are exact."""
    a = LocalAdvert(9, max_batch_blocks=max_batch)
    truth: dict[int, int] = {}  # what the tree holds (includes unflushed changes)
    mirror: dict[int, int] = {}  # a peer applying every delta
    seq = 0
    for _ in range(data.draw(st.integers(1, 12))):
        added: list[tuple[int, int]] = []
        removed: list[int] = []
        for i in data.draw(st.lists(st.sampled_from(universe), max_size=10)):
            if i in truth:
                del truth[i]
                removed.append(i)
            else:
                truth[i] = parent_of(i)
                added.append((i, truth[i]))
        a.apply(added, removed)
        if data.draw(st.booleans()):
            parts = a.snapshot_parts(data.draw(st.integers(1, 5)))
            assert rebuild(parts) == mirror  # the snapshot is the state at seq
            assert {(p.seq, p.n_blocks, p.digest) for p in parts} == {
                (seq, len(mirror), set_digest(mirror))
            }
        for _ in range(data.draw(st.integers(0, 3))):
            batch = a.flush()
            if batch is None:
                break
            seq += 1
            assert batch.seq == seq
            assert 0 < len(batch.added) + len(batch.removed) <= max_batch
            assert all(i in mirror for i in batch.removed)  # every entry is a real change
            assert all(i not in mirror for i, _ in batch.added)
            mirror = replay([batch], mirror)
            assert dict(a.advertised) == mirror
            assert (a.seq, a.n_blocks, a.digest) == (seq, len(mirror), set_digest(mirror))
    for batch in flush_all(a):
        seq += 1
        assert batch.seq == seq
        mirror = replay([batch], mirror)
    assert mirror == dict(a.advertised) == truth
    assert a.digest == set_digest(truth) and a.n_blocks == len(truth)
    assert all(a.contains(i) == (i in truth) for i in universe)
