"""The slot policy (zmesh/slots.py): its rules as properties, and the simulator's
`SlotCache` against the real engine on one recorded request sequence."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.protocol import SamplingParams
from zmesh.sim.cache import SlotCache
from zmesh.slots import SlotView, choose, common_prefix

views = st.lists(
    st.builds(
        SlotView,
        held=st.integers(0, 50),
        common=st.integers(0, 50),
        last_used=st.floats(0, 100),
        busy=st.booleans(),
    ),
    min_size=1,
    max_size=6,
).map(lambda vs: [SlotView(v.held, min(v.common, v.held), v.last_used, v.busy) for v in vs])


@given(views, st.integers(1, 60))
def test_a_busy_slot_is_never_rolled_back_or_evicted(slots: list[SlotView], n: int) -> None:
    c = choose(slots, n)
    if all(s.busy for s in slots):
        assert c is None
        return
    assert c is not None
    target = slots[c.slot]
    assert not target.busy  # the request runs in an idle slot
    assert 0 <= c.reuse <= n - 1
    if c.source is not None:  # shared by seq_cp, from any slot, busy or not
        assert c.source != c.slot and c.reuse <= slots[c.source].common
        assert c.evicted == target.held
    elif c.reuse:  # in place: rolled back to the shared prefix
        assert c.reuse <= target.common and c.evicted == 0
    else:
        assert c.evicted == target.held


def test_the_rules_by_example() -> None:
    idle_long = SlotView(held=100, common=30, last_used=1.0)
    # Under half of the slot is ours: keep it, share its prefix into the empty slot.
    c = choose([idle_long, SlotView(0, 0, 0.0)], 40)
    assert c is not None and (c.slot, c.source, c.reuse, c.evicted) == (1, 0, 30, 0)
    # Most of it is ours: continue in place.
    c = choose([SlotView(40, 30, 1.0), SlotView(0, 0, 0.0)], 40)
    assert c is not None and (c.slot, c.in_place, c.reuse) == (0, True, 30)
    # Busy: never in place, even when most of it is ours; copied into the LRU idle one.
    busy = SlotView(40, 30, 9.0, busy=True)
    c = choose([busy, SlotView(10, 0, 5.0), SlotView(10, 0, 2.0)], 40)
    assert c is not None and (c.slot, c.source, c.evicted) == (2, 0, 10)
    # All busy: wait.
    assert choose([busy, SlotView(5, 0, 1.0, busy=True)], 40) is None
    # Only the holder is idle: rolling it back beats waiting.
    c = choose([idle_long, SlotView(5, 0, 1.0, busy=True)], 40)
    assert c is not None and (c.slot, c.in_place) == (0, True)
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2 and common_prefix([], [1]) == 0


def test_slot_cache_makes_the_engines_choices_request_by_request() -> None:
    """One recorded sequence (shared heads, multi-turn extensions, strangers) through
    the real engine, then through `SlotCache`: same slot, cached tokens and evicted
    tokens for every request. What each predicts it would evict (`Engine.evict_tokens`,
    `SlotCache.evicted_tokens`: holder-side admission's eviction charge) is what the
    request then evicts."""
    rng = random.Random(11)
    heads = [rng.sample(range(300, 3000), 40) for _ in range(4)]
    prompts: list[list[int]] = []
    for _ in range(30):
        kind = rng.random()
        if kind < 0.5:
            head = rng.choice(heads)[: rng.randint(5, 40)]
            tokens = [2, *head, *rng.sample(range(300, 3000), rng.randint(0, 20))]
        elif kind < 0.75 and prompts:
            tokens = rng.choice(prompts) + rng.sample(range(300, 3000), rng.randint(1, 15))
        else:
            tokens = [2, *rng.sample(range(300, 3000), rng.randint(1, 50))]
        prompts.append(tokens[:120])
    recorded = []
    with Engine(EngineConfig(n_slots=3, slot_ctx=160, block_size=8)) as eng:
        for tokens in prompts:
            predicted = eng.evict_tokens(tokens, "default")
            r = eng.generate(tokens=tokens, params=SamplingParams(max_tokens=rng.randint(1, 3)))
            assert predicted == r.evicted_tokens
            held = tuple(eng.slot_tokens()[r.slot][1])
            recorded.append((r.slot, r.cached_tokens, r.evicted_tokens, held))
        assert eng.check_consistency() == []
    kinds = {"in place": 0, "copied": 0, "evicted": 0}
    cache = SlotCache(3)
    for tokens, (slot, cached, evicted, held) in zip(prompts, recorded, strict=True):
        before = cache.slots[slot][:cached]
        assert cache.evicted_tokens(tuple(tokens)) == evicted
        c = cache.claim(tuple(tokens))
        assert (c.slot, c.reuse, c.evicted) == (slot, cached, evicted)
        kinds["evicted"] += evicted > 0
        if cached:
            kinds["in place" if before == tuple(tokens[:cached]) else "copied"] += 1
        cache.finish(slot, held)
    # The sequence took every branch of the policy (else it proves little).
    assert min(kinds.values()) >= 3, kinds


def test_slot_cache_predicts_the_engines_imports_request_by_request() -> None:
    """Shipped prefixes imported between requests, as a node does (import, then the
    request that pulled it): before each import the engine's `import_evicts` (what a
    node's routing charges a pull) equals `SlotCache.import_evicts` (the simulator's),
    the import then evicts exactly that and lands in the same slot, and the requests
    after it make the same claims in both."""
    rng = random.Random(5)
    config = EngineConfig(n_slots=3, slot_ctx=160, block_size=8)
    shipped = [[2, *rng.sample(range(300, 3000), rng.randint(20, 60))] for _ in range(5)]
    heads = [rng.sample(range(300, 3000), 40) for _ in range(3)]
    with Engine(config) as eng:
        states = {}
        for prefix in shipped:  # the holder's side: serve each prefix once, export it
            eng.generate(tokens=prefix, params=SamplingParams(max_tokens=1))
            state = eng.export_prefix(prefix, "default")
            assert state is not None and state.n_tokens == len(prefix)
            states[tuple(prefix)] = state
        eng.clear()
        cache = SlotCache(3, eng.hasher("default"))
        seen = {"import into a free slot": 0, "import evicts": 0, "claims": 0}
        for step in range(36):
            if step == 18:  # start over once (as a bench does): imports into free slots again
                eng.clear()
                cache = SlotCache(3, eng.hasher("default"))
            kind = rng.random()
            prefix: list[int] | None = None
            if kind < 0.35:
                prefix = rng.choice(shipped)
                tokens = [*prefix, *rng.sample(range(300, 3000), rng.randint(1, 20))]
            elif kind < 0.7:
                head = rng.choice(heads)[: rng.randint(5, 40)]
                tokens = [2, *head, *rng.sample(range(300, 3000), rng.randint(0, 20))]
            else:
                tokens = [2, *rng.sample(range(300, 3000), rng.randint(1, 50))]
            if prefix is not None and eng.local_match(tokens, "default") < len(prefix):
                evicts = eng.import_evicts(tokens, "default")
                assert evicts == cache.import_evicts(tokens)
                # And the block ids of what it evicts (routing asks peers for them).
                ids = cache.import_victim_ids(tokens)
                assert eng.import_victim(tokens, "default") == (evicts, ids)
                assert bool(ids) == (evicts >= config.block_size)
                before = eng.stats.evicted_tokens
                new = eng.import_prefix(states[tuple(prefix)], "default")
                assert new == cache.import_prefix(tuple(prefix)) > 0
                assert eng.stats.evicted_tokens - before == evicts
                landed = [i for i, (_, held) in enumerate(eng.slot_tokens()) if held == prefix]
                assert landed == [i for i, held in enumerate(cache.slots) if held == tuple(prefix)]
                seen["import evicts" if evicts else "import into a free slot"] += 1
            n = rng.randint(1, 3)
            r = eng.generate(tokens=tokens, params=SamplingParams(max_tokens=n))
            held = tuple(eng.slot_tokens()[r.slot][1])
            c = cache.claim(tuple(tokens))
            assert (c.slot, c.reuse, c.evicted) == (r.slot, r.cached_tokens, r.evicted_tokens)
            cache.finish(r.slot, held)
            seen["claims"] += 1
        assert eng.check_consistency() == []
    # The sequence took both import branches (else it proves little).
    assert min(seen.values()) >= 2, seen
