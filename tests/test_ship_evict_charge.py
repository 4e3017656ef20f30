"""The eviction charge of a pull: evicted tokens a peer also holds cost a pull back,
not a prefill (`shipping.evict_charge_s`, `evict_held`); the node's and the
simulator's inputs to it (`Engine.import_victim` is covered by tests/test_slots.py's
model check through `SlotCache.import_victim_ids`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hypothesis import given
from hypothesis import strategies as st
from routekit import PREFILL, SHIP, shipping_node

from zmesh.blocks import BlockHasher
from zmesh.routing import (
    REASON_SHIPPED,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
)
from zmesh.routing.shipping import evict_charge_s, evict_held
from zmesh.sim.cache import KnownIdsHasher, SlotCache

node = shipping_node


def route(cands: list[Candidate], prompt: int = 1100) -> Decision:
    return decide(
        RouteRequest(prompt, 0, 0),
        cands,
        RoutingSettings(ship=True, ship_evict_pull_back=True),
        PolicyState.seeded(0),
    )


def test_evicting_what_a_peer_holds_does_not_forbid_the_pull() -> None:
    # test_shipping's busy holder; the import here evicts 1,000 tokens (~1 s to
    # prefill again), which alone rules the pull out. Peer "o" holds them all over a
    # fast link: losing them costs a pull back (~0.05 s), and the pull wins again.
    here = replace(node("m", local=True), ship_evict_tokens=1000)
    busy = node("h", matched=1024, wait=2.0)
    other = node("o")
    assert route([here, busy, other]).reason != REASON_SHIPPED
    held = replace(here, ship_evict_held=(("o", 1000),))
    d = route([held, busy, other])
    assert (d.reason, d.pull_from) == (REASON_SHIPPED, "h")


def test_a_holder_over_a_slow_link_or_unknown_leaves_the_charge_whole() -> None:
    here = replace(node("m", local=True), ship_evict_tokens=1000, ship_evict_held=(("o", 1000),))
    busy = node("h", matched=1024, wait=2.0)
    slow = node("o", ship=18_000 / 12.5e6)  # 100 Mbit/s: slower than prefilling
    assert route([here, busy, slow]).reason != REASON_SHIPPED
    assert route([here, busy]).reason != REASON_SHIPPED  # "o" is not a candidate
    assert route([here, busy, node("o", ship=None)]).reason != REASON_SHIPPED


def test_the_charge_in_figures() -> None:
    s = RoutingSettings(ship=True, ship_evict_pull_back=True)
    here = replace(node("m", local=True), ship_evict_tokens=600)
    peers = [node("a"), node("b", ship=SHIP * 4)]
    assert evict_charge_s(here, peers, s) == 600 * PREFILL
    part = replace(here, ship_evict_held=(("a", 400), ("b", 600)))
    via_a = 0.002 + 400 * SHIP + 200 * PREFILL
    via_b = 0.002 + 600 * SHIP * 4
    assert evict_charge_s(part, peers, s) == min(via_a, via_b)
    # A pull carries at most ship_max_tokens: the rest is prefilled.
    capped = RoutingSettings(ship=True, ship_evict_pull_back=True, ship_max_tokens=512)
    assert evict_charge_s(part, peers, capped) == min(via_a, 0.002 + 512 * SHIP * 4 + 88 * PREFILL)
    # Held counts above what is evicted are clipped.
    over = replace(here, ship_evict_held=(("a", 5000),))
    assert evict_charge_s(over, peers, s) == 0.002 + 600 * SHIP


@given(
    evicted=st.integers(0, 3000),
    held=st.lists(st.tuples(st.sampled_from("abcz"), st.integers(-5, 4000)), max_size=4),
    rates=st.lists(st.one_of(st.none(), st.floats(1e-7, 1e-2)), min_size=3, max_size=3),
    cap=st.integers(0, 1024),
)
def test_the_charge_is_never_above_a_full_prefill_nor_negative(
    evicted: int, held: list[tuple[str, int]], rates: list[float | None], cap: int
) -> None:
    here = replace(node("m", local=True), ship_evict_tokens=evicted, ship_evict_held=tuple(held))
    peers = [node(n, ship=r) for n, r in zip("abc", rates, strict=True)]
    c = evict_charge_s(
        here, peers, RoutingSettings(ship=True, ship_evict_pull_back=True, ship_max_tokens=cap)
    )
    assert 0 <= c <= evicted * PREFILL + 1e-12
    if not held:
        assert c == evicted * PREFILL


@dataclass
class Holder:
    node_id: str
    blocks: set[int]

    def match_blocks(self, block_ids: list[int]) -> int:
        n = 0
        for b in block_ids:
            if b not in self.blocks:
                break
            n += 1
        return n


def test_evict_held_counts_leading_blocks_in_tokens() -> None:
    ids = [11, 12, 13]
    peers = [Holder("a", {11, 12}), Holder("b", {12, 13}), Holder("c", {11, 12, 13, 14})]
    assert evict_held(peers, ids, 16) == (("a", 32), ("c", 48))
    assert evict_held(peers, [], 16) == ()


def test_the_sim_cache_names_the_blocks_its_import_would_evict() -> None:
    hasher = BlockHasher(b"fp", "default", 16)
    cache = SlotCache(2, KnownIdsHasher(hasher))
    a, b, c = (tuple(range(s, s + 64)) for s in (0, 1000, 2000))
    assert cache.import_victim_ids(c) == []  # a free slot: nothing evicted
    cache.finish(0, a, now=1.0)
    cache.finish(1, b, now=2.0)
    # Both full: the import of c lands in the least recently used, a.
    assert cache.import_evicts(c) == 64
    assert cache.import_victim_ids(c) == hasher.block_ids(a)
    assert evict_held([Holder("p", set(hasher.block_ids(a)))], cache.import_victim_ids(c), 16) == (
        ("p", 64),
    )


def test_without_the_setting_the_whole_eviction_is_a_prefill() -> None:
    here = replace(node("m", local=True), ship_evict_tokens=600, ship_evict_held=(("a", 600),))
    off = RoutingSettings(ship=True)
    assert evict_charge_s(here, [node("a")], off) == 600 * PREFILL
