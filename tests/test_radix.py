"""Radix tree and block-id invariants, checked against a brute-force reference."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.blocks import BlockHasher
from zmesh.radix import RadixTree, common_length

FP = b"test-model"
BS = 4


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def expected_ids(hasher: BlockHasher, seqs) -> set[int]:
    return {i for s in seqs for i in hasher.block_ids(s)}


def check_invariants(tree: RadixTree, hasher: BlockHasher, ref: dict, applied: dict) -> None:
    assert tree.sequences() == {o: tuple(s) for o, s in ref.items()}
    prefixes = {tuple(s[:k]) for s in ref.values() for k in range(1, len(s) + 1)}
    assert tree.total_tokens == len(prefixes)
    ids = tree.block_ids()
    assert ids == expected_ids(hasher, ref.values())
    assert tree.n_blocks == len(ids)
    # The event stream replayed from the start gives the same set, with right parents.
    ev = tree.drain_events()
    for block_id, parent in ev.added:
        assert block_id not in applied
        applied[block_id] = parent
    for block_id in ev.removed:
        del applied[block_id]
    assert set(applied) == ids
    for parent in applied.values():  # prefix-closed
        assert parent == hasher.seed or parent in applied


tokens_st = st.lists(st.integers(0, 5), max_size=24)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), tokens_st), max_size=30), tokens_st)
def test_owned_tree_mirrors_owners(ops, query):
    hasher = BlockHasher(FP, "t", block_size=BS)
    tree, ref, applied = RadixTree(hasher), {}, {}
    for owner, toks in ops:
        tree.set_sequence(owner, toks)
        if toks:
            ref[owner] = list(toks)
        else:
            ref.pop(owner, None)
        check_invariants(tree, hasher, ref, applied)
    m = tree.match(query)
    best = max((lcp(query, s) for s in ref.values()), default=0)
    assert m.length == best
    want = {o for o, s in ref.items() if lcp(query, s) >= best} if best else set()
    assert set(m.owners) == want


@settings(max_examples=200, deadline=None)
@given(st.lists(tokens_st, max_size=20), st.integers(0, 60))
def test_release_all_empties_tree(seqs, _):
    hasher = BlockHasher(FP, "t", block_size=BS)
    tree = RadixTree(hasher)
    for i, s in enumerate(seqs):
        tree.set_sequence(i, s)
    for i in range(len(seqs)):
        tree.release(i)
    assert tree.total_tokens == 0 and tree.node_count() == 0 and tree.n_blocks == 0
    ev = tree.drain_events()
    assert sorted(b for b, _ in ev.added) == sorted(ev.removed)


@settings(max_examples=200, deadline=None)
@given(st.lists(tokens_st, min_size=1, max_size=25), st.integers(0, 80))
def test_cache_mode_evicts_lru_leaves_prefix_closed(seqs, budget):
    hasher = BlockHasher(FP, "t", block_size=BS)
    tree, applied = RadixTree(hasher), {}
    for s in seqs:
        tree.insert(s)
    prefixes = {tuple(s[:k]) for s in seqs for k in range(1, len(s) + 1)}
    assert tree.total_tokens == len(prefixes)
    freed = tree.evict(budget)
    assert tree.total_tokens <= budget
    assert freed == len(prefixes) - tree.total_tokens
    ev = tree.drain_events()
    for b, p in ev.added:
        applied[b] = p
    for b in ev.removed:
        del applied[b]
    assert set(applied) == tree.block_ids()
    for parent in applied.values():
        assert parent == hasher.seed or parent in applied
    # Whatever survived was inserted: every remaining prefix is a real prefix.
    for s in seqs:
        assert tree.match(s).length <= len(s)


def test_lru_order_keeps_recently_used():
    tree = RadixTree()
    tree.insert([1, 1, 1, 1])
    tree.insert([2, 2, 2, 2])
    tree.insert([3, 3, 3, 3])
    tree.match([1, 1, 1, 1], touch=True)
    tree.evict(8)
    assert tree.match([1, 1, 1, 1]).length == 4
    assert tree.match([2, 2, 2, 2]).length == 0
    assert tree.match([3, 3, 3, 3]).length == 4


def test_shared_prefix_blocks_counted_once_and_kept_while_held():
    hasher = BlockHasher(FP, "t", block_size=BS)
    tree = RadixTree(hasher)
    prefix = list(range(8))
    tree.set_sequence("a", [*prefix, 9, 9, 9, 9])
    tree.set_sequence("b", [*prefix, 7, 7, 7, 7])
    assert tree.n_blocks == 4  # 2 shared + 1 + 1
    tree.release("a")
    assert tree.block_ids() == set(hasher.block_ids([*prefix, 7, 7, 7, 7]))
    tree.drain_events()
    tree.set_sequence("b", prefix)  # roll back to the shared prefix
    ev = tree.drain_events()
    assert ev.added == [] and len(ev.removed) == 1


def test_block_ids_depend_on_tenant_model_and_chain():
    a = BlockHasher(b"m1", "t1", block_size=BS)
    b = BlockHasher(b"m1", "t2", block_size=BS)
    c = BlockHasher(b"m2", "t1", block_size=BS)
    toks = list(range(12))
    ids = a.block_ids(toks)
    assert len(ids) == 3 and len(set(ids)) == 3
    assert not set(ids) & set(b.block_ids(toks))
    assert not set(ids) & set(c.block_ids(toks))
    assert a.block_ids(toks[:8]) == ids[:2]  # a prefix's ids are a prefix of the ids
    assert a.block_ids(toks, start_block=1, parent=ids[0]) == ids[1:]
    assert a.block_ids([1, 2, 3]) == []  # partial blocks get no id
    assert all(0 <= i < 2**64 for i in ids)
    assert a.matched_tokens(ids, set(ids[:2])) == 8
    assert a.matched_tokens(ids, {ids[0], ids[2]}) == 4  # stops at the first miss


@given(
    st.lists(st.integers(0, 3), max_size=40),
    st.lists(st.integers(0, 3), max_size=40),
    st.integers(0, 5),
)
def testcommon_length_equals_a_token_by_token_scan(a: list[int], b: list[int], off: int) -> None:
    off = min(off, len(b))
    n = 0
    while n < min(len(a), len(b) - off) and a[n] == b[off + n]:
        n += 1
    assert common_length(tuple(a), b, off) == n
    assert common_length(tuple(a), tuple(b), off) == n
