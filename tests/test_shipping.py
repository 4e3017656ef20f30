"""KV shipping: the pull decision (pure) and the transfer bookkeeping (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from routekit import PREFILL, shipping_node

from zmesh import protocol as P
from zmesh.kvstate import KvLayout, KvRefused, make_state
from zmesh.kvtransfer import Assembly, ShipCosts, split
from zmesh.routing import (
    REASON_SHIPPED,
    Candidate,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
    estimate_s,
)

node = shipping_node


def route(cands: list[Candidate], prompt: int = 1100, **kw: object):
    settings = RoutingSettings(ship=True, **kw)  # type: ignore[arg-type]
    return decide(RouteRequest(prompt, 0, 0), cands, settings, PolicyState.seeded(0))


def test_a_busy_holder_is_pulled_from_instead_of_forwarded_to() -> None:
    # The holder is 2 s deep in work; prefilling here costs ~1 s; shipping ~0.05 s.
    d = route([node("m", local=True), node("h", matched=1024, wait=2.0)])
    assert (d.target, d.forward, d.reason) == ("m", False, REASON_SHIPPED)
    assert d.pull_from == "h" and d.pull_tokens == 1024
    assert d.est_target_s < d.est_local_s
    assert 0 < d.est_ship_s < 0.1
    assert d.log_fields()["pull_from"] == "h"


def test_an_idle_holder_gets_the_forward_and_shipping_off_never_pulls() -> None:
    idle = [node("m", local=True), node("h", matched=1024, link=0.001)]
    d = route(idle)
    assert (d.target, d.forward, d.pull_from) == ("h", True, None)
    busy = [node("m", local=True), node("h", matched=1024, wait=2.0)]
    off = decide(RouteRequest(1100, 0, 0), busy, RoutingSettings(), PolicyState.seeded(0))
    assert off.reason != REASON_SHIPPED and off.pull_from is None


def test_a_pull_pays_for_the_slot_its_import_evicts() -> None:
    # The same busy holder as above; but the import here would overwrite 1,000 cached
    # tokens that someone must prefill again (~1 s): forwarding or a local prefill wins.
    from dataclasses import replace

    here = node("m", local=True)
    busy = node("h", matched=1024, wait=2.0)
    assert route([replace(here, ship_evict_tokens=0), busy]).reason == REASON_SHIPPED
    d = route([replace(here, ship_evict_tokens=1000), busy])
    assert d.reason != REASON_SHIPPED and d.pull_from is None
    # A small eviction does not change the pull.
    assert route([replace(here, ship_evict_tokens=16), busy]).reason == REASON_SHIPPED


def test_a_slow_link_is_never_worth_a_pull() -> None:
    # 100 Mbit/s at ~18 KB per token: ~1.5 ms per token, slower than prefill here.
    slow = 18_000 / 12.5e6
    d = route([node("m", local=True), node("h", matched=1024, wait=2.0, ship=slow)])
    assert d.reason != REASON_SHIPPED


def test_small_gains_and_unshippable_peers_are_not_pulled() -> None:
    few = route([node("m", local=True, matched=1000), node("h", matched=1024, wait=2.0)])
    assert few.reason != REASON_SHIPPED  # 24 more tokens < ship_min_tokens
    none = route([node("m", local=True), node("h", matched=1024, wait=2.0, ship=None)])
    assert none.reason != REASON_SHIPPED


@given(
    here=st.integers(0, 2000),
    there=st.integers(0, 2000),
    prompt=st.integers(1, 2000),
    wait_here=st.floats(0, 5),
    wait_there=st.floats(0, 5),
    ship=st.floats(1e-6, 1e-2),
)
def test_a_pull_is_chosen_only_when_predicted_sooner(
    here: int, there: int, prompt: int, wait_here: float, wait_there: float, ship: float
) -> None:
    local = node("m", local=True, matched=here, wait=wait_here)
    holder = node("h", matched=there, wait=wait_there, ship=ship)
    d = route([local, holder], prompt=prompt)
    if d.reason == REASON_SHIPPED:
        assert d.pull_tokens < prompt and d.pull_tokens - min(here, prompt) >= 64
        assert d.est_target_s < min(estimate_s(local, prompt), estimate_s(holder, prompt))
        # Predicted: the longer of the wait here and the transfer, then the rest prefilled.
        want = max(wait_here, 0.002 + d.pull_tokens * ship) + (prompt - d.pull_tokens) * PREFILL
        assert d.est_target_s == pytest.approx(want)


LAYOUT = KvLayout(fingerprint="ab", llama_version="1", slot_ctx=64, kv_type="f16", swa_full=True)


@given(size=st.integers(0, 5000), part=st.integers(1, 700))
def test_parts_reassemble_to_the_same_state(size: int, part: int) -> None:
    state = make_state(LAYOUT, "default", [1, 2, 3], bytes(range(256)) * (size // 256 + 1))
    parts = split(state, "r", part_bytes=part)
    assert all(len(p.data) <= part for p in parts) and parts[0].header
    got = None
    asm = Assembly(max_bytes=len(state.payload))
    for p in parts:
        assert got is None
        got = asm.add(P.decode(P.encode(p)))  # type: ignore[arg-type]
    assert got == state


def test_assembly_refuses_out_of_order_and_over_the_cap() -> None:
    state = make_state(LAYOUT, "default", [1], b"x" * 1000)
    parts = split(state, "r", part_bytes=100)
    with pytest.raises(KvRefused) as info:
        Assembly(max_bytes=10_000).add(parts[1])
    assert info.value.reason == "order"
    asm = Assembly(max_bytes=250)
    asm.add(parts[0])
    asm.add(parts[1])
    with pytest.raises(KvRefused) as info:
        asm.add(parts[2])
    assert info.value.reason == "too_large"
    asm = Assembly(max_bytes=10_000)
    asm.add(parts[0])
    with pytest.raises(KvRefused):
        asm.add(P.KvPart(request_id="r", part=1, parts=3, data=b"y"))


def test_ship_costs_follow_measurements() -> None:
    costs = ShipCosts(
        start_bytes_per_token=20_000, start_import_s_per_byte=1e-9, start_bandwidth_bps=1e9
    )
    before = costs.ship_s_per_token("p")
    costs.observe_transfer("p", nbytes=10_000_000, seconds=1.0 + 2 * 0.01, delay_s=0.01)
    assert costs.bandwidth_bps["p"] == pytest.approx(1e7)
    assert costs.ship_s_per_token("p") > before  # measured slower than the start value
    costs.observe_transfer("p", nbytes=100, seconds=1.0, delay_s=0.0)  # too small to time
    assert costs.bandwidth_bps["p"] == pytest.approx(1e7)
    costs.observe_state(n_tokens=100, nbytes=1_800_000)
    assert costs.bytes_per_token == 18_000  # the first measurement replaces the start value
    costs.forget("p")
    assert "p" not in costs.bandwidth_bps


def test_a_pull_carries_no_more_than_the_window_and_prefills_the_rest() -> None:
    d = route([node("m", local=True), node("h", matched=1024, wait=2.0)], ship_max_tokens=512)
    assert d.reason == REASON_SHIPPED and d.pull_tokens == 512
    # The rest of the prompt (1100 - 512 tokens) is prefilled here after the import.
    assert d.est_target_s == pytest.approx(max(0.0, d.est_ship_s) + (1100 - 512) * PREFILL)
