"""Routing policies: every branch, threshold edges, and properties over random meshes.

Times are powers of two so threshold edges compare exactly in floating point.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import subprocess
import sys
from collections import Counter
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routekit import PREFILL, SERVICE, candidate

from zmesh.routing import (
    ALL_POLICIES,
    CONSISTENT_HASH,
    LEAST_LOADED,
    ORACLE,
    PAPER,
    POLICIES,
    RANDOM,
    REASON_CONSISTENT_HASH,
    REASON_HOP_LIMIT,
    REASON_LEAST_LOADED,
    REASON_LOAD,
    REASON_LOCAL_BEST,
    REASON_NO_PEERS,
    REASON_PLACEMENT,
    REASON_PREFIX,
    REASON_RANDOM,
    REASON_ROUND_ROBIN,
    REASONS,
    ROUND_ROBIN,
    ZMESH,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
    estimate_s,
    gain_threshold,
    is_overloaded,
    placement_rank,
    ring_position,
)
from zmesh.routing.consistent_hash import _ring

cand = candidate


def req(prompt: int = 1024, hops: int = 0, head_key: int = 0) -> RouteRequest:
    return RouteRequest(prompt_tokens=prompt, hops=hops, head_key=head_key)


def run(
    candidates: list[Candidate],
    *,
    request: RouteRequest | None = None,
    state: PolicyState | None = None,
    **kw: object,
) -> Decision:
    return decide(
        request or req(),
        candidates,
        RoutingSettings(**kw),  # type: ignore[arg-type]
        state or PolicyState.seeded(0),
    )


# --------------------------------------------------------------------------- validation


def test_exactly_one_local_required() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        run([cand("a"), cand("b")])
    with pytest.raises(ValueError, match="exactly one"):
        run([cand("a", local=True), cand("b", local=True)])
    with pytest.raises(ValueError, match="exactly one"):
        run([])


def test_duplicate_node_ids_rejected() -> None:
    with pytest.raises(ValueError, match="unique"):
        run([cand("a", local=True), cand("a")])


def test_unknown_policy_lists_known_ones() -> None:
    with pytest.raises(ValueError, match="known: zmesh, random, round_robin"):
        RoutingSettings(policy="longest_match")
    # decide() guards too, should a settings object bypass __post_init__.
    s = RoutingSettings()
    object.__setattr__(s, "policy", "nope")
    with pytest.raises(ValueError, match=r"'nope'.*least_loaded"):
        decide(req(), [cand("a", local=True)], s, PolicyState())


@pytest.mark.parametrize(
    "kw",
    [
        {"max_hops": -1},
        {"min_gain_s": -0.1},
        {"balance_abs": -1},
        {"balance_rel": 0.5},
        {"vnodes": 0},
        {"place_slack_frac": -0.1},
        {"place_slack_frac": 1.0},
        {"give_up_s": -1.0},
        {"give_up_s": float("inf")},
        {"give_up_s": float("nan")},
    ],
)
def test_settings_validation(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RoutingSettings(**kw)  # type: ignore[arg-type]


def test_constants_are_stable() -> None:
    assert POLICIES == ("zmesh", "random", "round_robin", "consistent_hash", "least_loaded")
    assert set(REASONS) == {
        "hop_limit",
        "no_peers",
        "placement",
        "local_best",
        "prefix",
        "load",
        "random",
        "round_robin",
        "consistent_hash",
        "least_loaded",
        "shipped",
        "refused",
    }


# --------------------------------------------------------------------------- hop limit, no peers


def tempting_mesh() -> list[Candidate]:
    """A mesh where every policy would forward something, if allowed to."""
    return [
        cand("m", local=True, queue=50),
        cand("a", matched=1024),
        cand("b", matched=1024),
        cand("c", matched=1024),
    ]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("hops", "max_hops"), [(1, 1), (2, 1), (0, 0), (3, 3)])
def test_hop_limit_serves_locally_for_every_policy(policy: str, hops: int, max_hops: int) -> None:
    state = PolicyState.seeded(1)
    for key in range(20):
        d = run(
            tempting_mesh(),
            request=req(hops=hops, head_key=key * 0x9E3779B97F4A7C15),
            state=state,
            policy=policy,
            max_hops=max_hops,
        )
        assert (d.target, d.forward, d.reason) == ("m", False, REASON_HOP_LIMIT)
        assert d.est_target_s == d.est_local_s


@pytest.mark.parametrize("policy", POLICIES)
def test_hop_limit_wins_over_no_peers(policy: str) -> None:
    d = run([cand("m", local=True)], request=req(hops=1), policy=policy)
    assert d.reason == REASON_HOP_LIMIT


@pytest.mark.parametrize("policy", POLICIES)
def test_no_peers(policy: str) -> None:
    d = run([cand("m", local=True, queue=99)], policy=policy)
    assert (d.target, d.forward, d.reason) == ("m", False, REASON_NO_PEERS)
    assert d.scores == (("m", estimate_s(cand("m", local=True, queue=99), 1024)),)


@pytest.mark.parametrize("policy", POLICIES)
def test_only_dead_peers_means_no_peers(policy: str) -> None:
    mesh = [
        cand("m", local=True, queue=99),
        cand("a", matched=1024, alive=False),
        cand("b", matched=1024, alive=False),
    ]
    for key in range(50):
        d = run(mesh, request=req(head_key=key << 58), policy=policy)
        assert (d.target, d.forward, d.reason) == ("m", False, REASON_NO_PEERS)


@pytest.mark.parametrize("policy", POLICIES)
def test_dead_peers_never_chosen_nor_scored(policy: str) -> None:
    mesh = [
        cand("m", local=True, queue=99),
        cand("a", matched=1024, alive=False),
        cand("b", queue=1),
    ]
    state = PolicyState.seeded(7)
    for key in range(200):
        d = run(mesh, request=req(head_key=key << 56), state=state, policy=policy)
        assert d.target in {"m", "b"}
        assert [n for n, _ in d.scores] == ["m", "b"]


def test_local_alive_flag_is_ignored() -> None:
    d = run([cand("m", local=True, alive=False), cand("a", queue=3)])
    assert (d.target, d.reason) == ("m", REASON_LOCAL_BEST)


# --------------------------------------------------------------------------- zmesh estimates


def test_estimate_formula_and_clamping() -> None:
    c = cand("a", matched=256, queue=3, link=0.125)
    assert estimate_s(c, 1024) == 0.125 + 3 * SERVICE + 768 * PREFILL
    assert estimate_s(replace(c, matched_tokens=5000), 1024) == 0.125 + 3 * SERVICE
    assert estimate_s(replace(c, matched_tokens=-5), 1024) == 0.125 + 3 * SERVICE + 1.0


def test_prefix_forward() -> None:
    d = run([cand("m", local=True, matched=0), cand("a", matched=1024, link=0.125)])
    assert (d.target, d.forward, d.reason) == ("a", True, REASON_PREFIX)
    assert d.est_local_s == 1.0 and d.est_target_s == 0.125
    assert dict(d.scores) == {"m": 1.0, "a": 0.125}


def test_link_delay_can_outweigh_prefix() -> None:
    d = run([cand("m", local=True, matched=0), cand("a", matched=1024, link=2.0)])
    assert (d.target, d.forward, d.reason) == ("m", False, REASON_LOCAL_BEST)


def test_peer_queue_can_outweigh_prefix() -> None:
    d = run([cand("m", local=True, matched=0), cand("a", matched=1024, queue=4)])
    assert (d.target, d.reason) == ("m", REASON_LOCAL_BEST)  # 1.0 s vs 4 * 0.25 s


def test_load_forward_with_equal_matches() -> None:
    d = run([cand("m", local=True, matched=512, queue=3), cand("a", matched=512, queue=0)])
    assert (d.target, d.forward, d.reason) == ("a", True, REASON_LOAD)


def test_load_forward_even_with_a_shorter_match() -> None:
    # Peer has less cached but local is busy: saving comes from the queue, reason "load".
    d = run([cand("m", local=True, matched=1024, queue=8), cand("a", matched=512, queue=0)])
    assert (d.target, d.reason) == ("a", REASON_LOAD)
    assert d.est_local_s == 2.0 and d.est_target_s == 0.5


def test_reason_uses_clamped_matches() -> None:
    # Both hold the whole prompt; the peer's larger raw count must not read as a prefix gain.
    d = run(
        [cand("m", local=True, matched=1024, queue=2), cand("a", matched=4096)],
        request=req(prompt=1024),
    )
    assert (d.target, d.reason) == ("a", REASON_LOAD)


@pytest.mark.parametrize(
    ("local_queue", "forward"),
    [(1, False), (2, False), (3, True)],  # gain 0.25, 0.5 (== min_gain), 0.75 s
)
def test_min_gain_edge(local_queue: int, forward: bool) -> None:
    d = run(
        [cand("m", local=True, queue=local_queue + 1), cand("a", queue=1)],
        min_gain_s=0.5,
    )
    assert d.forward is forward
    assert d.reason == (REASON_LOAD if forward else REASON_LOCAL_BEST)


def test_min_gain_exactly_at_threshold_stays_local() -> None:
    mesh = [cand("m", local=True, queue=2), cand("a", queue=0)]  # gain exactly 0.5 s
    assert run(mesh, min_gain_s=0.5).reason == REASON_LOCAL_BEST
    assert run(mesh, min_gain_s=0.4375).reason == REASON_LOAD


def test_zero_min_gain_equal_estimates_stay_local() -> None:
    d = run([cand("m", local=True, queue=1), cand("a", queue=1)], min_gain_s=0.0)
    assert (d.target, d.reason) == ("m", REASON_LOCAL_BEST)


def test_tie_between_peers_broken_by_node_id_whatever_the_order() -> None:
    peers = [cand("c", matched=1024), cand("b", matched=1024), cand("d", matched=1024)]
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0]):
        mesh = [cand("m", local=True), *(peers[i] for i in perm)]
        d = run(mesh)
        assert (d.target, d.reason) == ("b", REASON_PREFIX)


# --------------------------------------------------------------------------- balance thresholds


def overload_mesh(local_queue: int, peer_queue: int) -> list[Candidate]:
    """The peer holds the whole prompt and, service aside, would win: prefill is costly."""
    return [
        cand("m", local=True, queue=local_queue, service=0.0, prefill=1.0),
        cand("a", matched=1024, queue=peer_queue, service=0.0, prefill=1.0),
    ]


@pytest.mark.parametrize(
    ("local_queue", "peer_queue", "overloaded"),
    [
        (10, 18, False),  # abs edge: 18 - 10 == 8 is not > 8 (and 18 > 15)
        (10, 19, True),  # 9 > 8 and 19 > 15
        (20, 30, False),  # rel edge: 30 - 20 > 8 but 30 == 1.5 * 20 is not > 30
        (20, 31, True),
        (0, 8, False),  # min queue 0: only the absolute threshold can bind
        (0, 9, True),
    ],
)
def test_balance_thresholds(local_queue: int, peer_queue: int, overloaded: bool) -> None:
    s = RoutingSettings()
    assert s.balance_abs == 8 and s.balance_rel == 1.5
    assert is_overloaded(peer_queue, local_queue, s) is overloaded
    d = run(overload_mesh(local_queue, peer_queue))
    if overloaded:
        assert (d.target, d.reason, d.overloaded) == ("m", REASON_LOCAL_BEST, ("a",))
    else:
        assert (d.target, d.reason, d.overloaded) == ("a", REASON_PREFIX, ())


def test_balance_thresholds_follow_settings() -> None:
    assert run(overload_mesh(10, 19), balance_abs=9).target == "a"
    assert run(overload_mesh(10, 19), balance_rel=1.9).target == "a"
    assert run(overload_mesh(10, 12), balance_abs=1, balance_rel=1.1).target == "m"


def test_min_queue_comes_from_peers_too_and_hotspot_sheds_load() -> None:
    # Local is the hotspot; the best-matching peer is overloaded against idle peer b,
    # so the request goes to b for load.
    mesh = [
        cand("m", local=True, queue=100),
        cand("a", matched=1024, queue=9),
        cand("b", matched=0, queue=0),
    ]
    d = run(mesh)
    assert (d.target, d.forward, d.reason, d.overloaded) == ("b", True, REASON_LOAD, ("a",))


def test_dead_peer_queue_does_not_set_the_minimum() -> None:
    mesh = [
        cand("m", local=True, queue=10, service=0.0),
        cand("a", matched=1024, queue=18, service=0.0),
        cand("z", queue=0, alive=False),
    ]
    d = run(mesh)
    assert (d.target, d.reason, d.overloaded) == ("a", REASON_PREFIX, ())


# --------------------------------------------------------------------------- global system prompt


def test_shared_prefix_with_equal_loads_stays_local() -> None:
    mesh = [cand("m", local=True, matched=600, queue=2)] + [
        cand(n, matched=600, queue=2, link=0.001) for n in "abc"
    ]
    d = run(mesh, request=req(prompt=700))
    assert (d.target, d.forward, d.reason) == ("m", False, REASON_LOCAL_BEST)


def test_shared_prefix_load_spreads_no_hotspot() -> None:
    """Every request enters at m and matches the same prefix everywhere: load decides.

    Forwarded requests stay in the queues (nothing answers during the burst), so the
    decisions must spread them; longest-match routing would pile them on one node.
    """
    nodes = ["m", "a", "b", "c"]
    queues = dict.fromkeys(nodes, 0)
    state = PolicyState.seeded(0)
    for _ in range(40):
        mesh = [
            cand(n, local=n == "m", matched=600, queue=queues[n], link=0.0 if n == "m" else 0.001)
            for n in nodes
        ]
        d = decide(req(prompt=700), mesh, RoutingSettings(), state)
        assert d.reason in {REASON_LOAD, REASON_LOCAL_BEST}
        queues[d.target] += 1
    assert max(queues.values()) / (sum(queues.values()) / len(nodes)) <= 1.2


# --------------------------------------------------------------------------- baselines


def baseline_mesh(n_peers: int = 3) -> list[Candidate]:
    return [cand("m", local=True)] + [cand(f"p{i}") for i in range(n_peers)]


def test_random_uses_passed_rng() -> None:
    mesh = baseline_mesh()

    def seq(seed: int) -> list[str]:
        state = PolicyState.seeded(seed)
        return [run(mesh, state=state, policy=RANDOM).target for _ in range(100)]

    assert seq(42) == seq(42)
    assert seq(42) != seq(43)
    assert set(seq(42)) == {"m", "p0", "p1", "p2"}
    # The global RNG is neither used nor disturbed.
    random.seed(5)
    before = random.random()
    random.seed(5)
    seq(1)
    assert random.random() == before


def test_random_reason_and_forward_flag() -> None:
    state = PolicyState.seeded(3)
    for _ in range(50):
        d = run(baseline_mesh(), state=state, policy=RANDOM)
        assert d.reason == REASON_RANDOM
        assert d.forward is (d.target != "m")


def test_random_ignores_candidate_order() -> None:
    mesh = baseline_mesh()
    sa, sb = PolicyState.seeded(9), PolicyState.seeded(9)
    a = [run(mesh, state=sa, policy=RANDOM).target for _ in range(30)]
    b = [run(mesh[::-1], state=sb, policy=RANDOM).target for _ in range(30)]
    assert a == b


def test_round_robin_cycles_through_all_sorted() -> None:
    mesh = [cand("m", local=True), cand("c"), cand("a"), cand("b", alive=False), cand("z")]
    state = PolicyState()
    targets = [run(mesh, state=state, policy=ROUND_ROBIN).target for _ in range(8)]
    assert targets == ["a", "c", "m", "z"] * 2
    assert state.rr_counter == 8
    d = run(mesh, state=state, policy=ROUND_ROBIN)
    assert (d.reason, d.forward) == (REASON_ROUND_ROBIN, True)


def test_round_robin_counter_untouched_by_local_shortcuts() -> None:
    state = PolicyState()
    run(baseline_mesh(), request=req(hops=1), state=state, policy=ROUND_ROBIN)
    run([cand("m", local=True)], state=state, policy=ROUND_ROBIN)
    assert state.rr_counter == 0


def keys(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.getrandbits(64) for _ in range(n)]


def test_consistent_hash_stable_across_calls_and_states() -> None:
    mesh = baseline_mesh()
    for k in keys(200):
        first = run(mesh, request=req(head_key=k), policy=CONSISTENT_HASH)
        again = run(mesh, request=req(head_key=k), policy=CONSISTENT_HASH)
        other = run(
            mesh[::-1],
            request=req(head_key=k),
            state=PolicyState.seeded(99),
            policy=CONSISTENT_HASH,
        )
        assert first.target == again.target == other.target
        assert first.reason == REASON_CONSISTENT_HASH
        assert first.forward is (first.target != "m")


def test_consistent_hash_spreads_keys() -> None:
    counts = Counter(
        run(baseline_mesh(), request=req(head_key=k), policy=CONSISTENT_HASH).target
        for k in keys(4000)
    )
    assert set(counts) == {"m", "p0", "p1", "p2"}
    assert all(0.10 < c / 4000 < 0.45 for c in counts.values()), counts


def test_consistent_hash_adding_a_node_moves_few_keys() -> None:
    three = baseline_mesh(2)
    four = baseline_mesh(3)
    moved = 0
    ks = keys(4000, seed=1)
    for k in ks:
        before = run(three, request=req(head_key=k), policy=CONSISTENT_HASH).target
        after = run(four, request=req(head_key=k), policy=CONSISTENT_HASH).target
        if before != after:
            moved += 1
            assert after == "p2"  # keys only move to the newcomer
    assert 0 < moved < len(ks) / 2


def test_consistent_hash_dead_node_keys_go_elsewhere_others_stay() -> None:
    mesh = baseline_mesh()
    dead = [*mesh[:-1], replace(mesh[-1], alive=False)]
    for k in keys(1000, seed=2):
        before = run(mesh, request=req(head_key=k), policy=CONSISTENT_HASH).target
        after = run(dead, request=req(head_key=k), policy=CONSISTENT_HASH).target
        assert after != "p2"
        if before != "p2":
            assert after == before


def test_consistent_hash_wraps_and_masks_keys() -> None:
    mesh = baseline_mesh()
    positions, owners = _ring(("m", "p0", "p1", "p2"), 64)
    top = run(mesh, request=req(head_key=(1 << 64) - 1), policy=CONSISTENT_HASH)
    assert positions[-1] < (1 << 64) - 1
    assert top.target == owners[0]  # past the last point: wraps to the first
    assert (
        run(mesh, request=req(head_key=(1 << 64) + 5), policy=CONSISTENT_HASH).target
        == run(mesh, request=req(head_key=5), policy=CONSISTENT_HASH).target
    )
    exact = run(mesh, request=req(head_key=positions[10]), policy=CONSISTENT_HASH)
    assert exact.target == owners[10]


def test_ring_positions_use_blake2b_not_hash() -> None:
    want = int.from_bytes(hashlib.blake2b(b"p0#3", digest_size=8).digest(), "little")
    assert ring_position("p0", 3) == want


def test_ring_is_cached_per_node_set() -> None:
    mesh = baseline_mesh()
    run(mesh, request=req(head_key=1), policy=CONSISTENT_HASH)
    hits = _ring.cache_info().hits
    for k in range(10):
        run(mesh[::-1], request=req(head_key=k), policy=CONSISTENT_HASH)
    assert _ring.cache_info().hits == hits + 10
    run(mesh, request=req(head_key=1), policy=CONSISTENT_HASH, vnodes=8)
    assert _ring.cache_info().hits == hits + 10  # other vnodes: another ring


def test_consistent_hash_same_across_processes() -> None:
    code = (
        "from zmesh.routing import *\n"
        "m=[Candidate(n, n=='m', 0, 0, 0.0, 0.0, 0.0) for n in ('m','p0','p1','p2')]\n"
        "s=RoutingSettings(policy='consistent_hash')\n"
        "print(','.join(decide(RouteRequest(1, 0, k * 0x9E3779B97F4A7C15), m, s,"
        " PolicyState()).target for k in range(64)))\n"
    )
    outs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        outs.add(out)
    assert len(outs) == 1


def test_least_loaded() -> None:
    mesh = [cand("m", local=True, queue=3), cand("b", queue=1), cand("a", queue=2)]
    d = run(mesh, policy=LEAST_LOADED)
    assert (d.target, d.forward, d.reason) == ("b", True, REASON_LEAST_LOADED)


def test_least_loaded_ties_local_first_then_node_id() -> None:
    mesh = [cand("m", local=True, queue=1), cand("b", queue=1), cand("a", queue=1)]
    assert run(mesh, policy=LEAST_LOADED).target == "m"
    mesh = [cand("m", local=True, queue=2), cand("b", queue=1), cand("a", queue=1)]
    assert run(mesh, policy=LEAST_LOADED).target == "a"
    assert run(mesh[::-1], policy=LEAST_LOADED).target == "a"


def test_least_loaded_ignores_matches() -> None:
    mesh = [cand("m", local=True, queue=0), cand("a", queue=1, matched=1024)]
    d = run(mesh, policy=LEAST_LOADED)
    assert (d.target, d.forward) == ("m", False)


def test_baselines_report_estimates() -> None:
    mesh = [cand("m", local=True, queue=3), cand("b", queue=1, matched=512)]
    d = run(mesh, policy=LEAST_LOADED)
    assert d.est_local_s == 1.75 and d.est_target_s == 0.75
    assert d.scores == (("m", 1.75), ("b", 0.75))


def test_log_fields_are_json_ready() -> None:
    mesh = [cand("m", local=True, queue=100), cand("a", matched=1024, queue=9), cand("b")]
    fields = run(mesh).log_fields()
    assert json.loads(json.dumps(fields)) == {
        "target": "b",
        "forward": True,
        "reason": "load",
        "est_local_s": 26.0,
        "est_target_s": 1.0,
        "scores": {"m": 26.0, "a": 2.25, "b": 1.0},
        "overloaded": ["a"],
    }


# --------------------------------------------------------------------------- properties

NAMES = [f"n{i}" for i in range(9)]


@st.composite
def meshes(draw: st.DrawFn) -> tuple[RouteRequest, list[Candidate]]:
    prompt = draw(st.integers(0, 4096))
    ids = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=9, unique=True))
    local_idx = draw(st.integers(0, len(ids) - 1))
    out = []
    for i, node in enumerate(ids):
        out.append(
            Candidate(
                node_id=node,
                is_local=i == local_idx,
                matched_tokens=draw(st.integers(-10, 5000)),
                queue_depth=draw(st.integers(0, 40)),
                link_delay_s=0.0 if i == local_idx else draw(st.floats(0, 0.5)),
                prefill_s_per_token=draw(st.sampled_from([0.0, 1e-4, 1 / 1024, 2e-3])),
                service_s=draw(st.sampled_from([0.0, 0.01, 0.25, 1.0])),
                alive=draw(st.booleans()),
            )
        )
    hops = draw(st.integers(0, 3))
    block_ids = draw(st.lists(st.integers(0, (1 << 64) - 1), max_size=prompt // 16))
    head = draw(st.integers(0, (1 << 64) - 1))
    return RouteRequest(prompt, hops, head, block_ids=block_ids, block_size=16), out


route_settings = st.builds(
    RoutingSettings,
    policy=st.sampled_from(ALL_POLICIES),
    max_hops=st.integers(0, 2),
    min_gain_s=st.sampled_from([0.0, 0.005, 0.1]),
    min_gain_frac=st.sampled_from([0.0, 0.1, 0.5]),
    balance_abs=st.integers(0, 16),
    balance_rel=st.sampled_from([1.0, 1.5, 2.0]),
    vnodes=st.integers(1, 16),
    place_slack_frac=st.sampled_from([0.0, 0.1, 0.5]),
)


@settings(max_examples=400, deadline=None)
@given(meshes(), route_settings, st.integers(0, 2**32))
def test_property_any_policy(
    mesh: tuple[RouteRequest, list[Candidate]], s: RoutingSettings, seed: int
) -> None:
    request, cands = mesh
    local = next(c for c in cands if c.is_local)
    by_id = {c.node_id: c for c in cands}
    d = decide(request, cands, s, PolicyState.seeded(seed))
    assert d.target in by_id
    assert d.reason in REASONS
    assert d.forward is (d.target != local.node_id)
    if d.forward:
        assert by_id[d.target].alive
    if request.hops >= s.max_hops:
        assert (d.target, d.reason) == (local.node_id, REASON_HOP_LIMIT)
    # Candidate order never changes the outcome.
    again = decide(request, cands[::-1], s, PolicyState.seeded(seed))
    assert (again.target, again.reason) == (d.target, d.reason)


@settings(max_examples=400, deadline=None)
@given(meshes(), route_settings)
def test_property_zmesh_picks_minimal_eligible_estimate(
    mesh: tuple[RouteRequest, list[Candidate]], s: RoutingSettings
) -> None:
    request, cands = mesh
    s = replace(s, policy=ZMESH)
    d = decide(request, cands, s, PolicyState())
    local = next(c for c in cands if c.is_local)
    alive = [c for c in cands if c.is_local or c.alive]
    min_q = min(c.queue_depth for c in alive)
    eligible = [c for c in alive if c.is_local or not is_overloaded(c.queue_depth, min_q, s)]
    est = {c.node_id: estimate_s(c, request.prompt_tokens) for c in eligible}
    if d.reason == REASON_PLACEMENT:
        # Holding the longest match of all eligible, near the best estimate, top hash rank.
        assert d.forward and d.target in est
        lowest = min(est.values())
        blocks = {
            c.node_id: min(max(c.matched_tokens, 0), request.prompt_tokens) // 16 for c in eligible
        }
        top = max(blocks.values())
        bar = lowest + s.place_slack_frac * lowest
        tied = [n for n, b in blocks.items() if b == top and est[n] <= bar]
        assert d.target in tied and len(tied) >= 2
        key = request.block_ids[top]
        assert d.target == max(tied, key=lambda n: (placement_rank(key, n), n))
        return
    if not d.forward:
        assert d.target == local.node_id
        if d.reason == REASON_LOCAL_BEST and s.place_slack_frac == 0.0:
            peers = [e for n, e in est.items() if n != local.node_id]
            assert not peers or est[local.node_id] - min(peers) <= gain_threshold(
                est[local.node_id], s
            )
        return
    assert d.target in est  # alive and not overloaded
    assert est[d.target] == min(est.values())
    assert est[local.node_id] - est[d.target] > gain_threshold(est[local.node_id], s)
    assert d.est_target_s == est[d.target] and d.est_local_s == est[local.node_id]
    t = next(c for c in cands if c.node_id == d.target)
    gained = min(t.matched_tokens, request.prompt_tokens) > max(
        min(local.matched_tokens, request.prompt_tokens), 0
    )
    assert d.reason == (REASON_PREFIX if gained else REASON_LOAD)


def test_min_gain_frac_ignores_noise_level_rate_differences() -> None:
    """Identical nodes whose measured prefill rates differ by 5 % keep cold work local."""
    local = Candidate("m", True, 0, 0, 0.0, 0.00200, 0.5, wait_s=0.0)
    peer = Candidate("p", False, 0, 0, 0.001, 0.00190, 0.5, wait_s=0.0)
    req = RouteRequest(prompt_tokens=600, hops=0, head_key=1)
    noisy = RoutingSettings(min_gain_frac=0.0)
    assert decide(req, [local, peer], noisy, PolicyState.seeded(0)).forward  # 59 ms "gain"
    calm = RoutingSettings(min_gain_frac=0.1)
    d = decide(req, [local, peer], calm, PolicyState.seeded(0))
    assert not d.forward and d.reason == REASON_LOCAL_BEST
    # A real prefix match still clears the relative bar easily.
    cached = Candidate("p", False, 576, 0, 0.001, 0.00190, 0.5, wait_s=0.0)
    d = decide(req, [local, cached], calm, PolicyState.seeded(0))
    assert d.forward and d.reason == REASON_PREFIX
    assert gain_threshold(1.2, calm) == pytest.approx(0.12)


def test_wait_s_overrides_queue_times_service() -> None:
    busy = Candidate("p", False, 0, 3, 0.0, 0.001, 0.5, wait_s=0.2)
    assert estimate_s(busy, 100) == pytest.approx(0.2 + 0.1)
    legacy = Candidate("p", False, 0, 3, 0.0, 0.001, 0.5)
    assert estimate_s(legacy, 100) == pytest.approx(1.5 + 0.1)


# --------------------------------------------------------------------------- placement

BS = 16


def placed(prompt_blocks: list[int], cands: list[Candidate], **kw: object) -> Decision:
    request = RouteRequest(
        prompt_tokens=len(prompt_blocks) * BS,
        hops=0,
        head_key=0,
        block_ids=prompt_blocks,
        block_size=BS,
    )
    return run(cands, request=request, **kw)


def idle_mesh(local: str, names: tuple[str, ...] = ("a", "b", "c", "d")) -> list[Candidate]:
    return [cand(n, local=n == local) for n in names]


def test_new_prefix_is_placed_on_one_node_whichever_node_it_entered() -> None:
    prompt = [11, 22, 33, 44]
    home = max("abcd", key=lambda n: (placement_rank(prompt[0], n), n))
    for entry in "abcd":
        d = placed(prompt, idle_mesh(entry))
        assert d.target == home
        assert d.reason == (REASON_LOCAL_BEST if entry == home else REASON_PLACEMENT)


def test_distinct_new_prefixes_spread_over_every_node() -> None:
    rng = random.Random(3)
    homes = Counter(placed([rng.getrandbits(64), 1, 2], idle_mesh("a")).target for _ in range(800))
    assert set(homes) == set("abcd")
    assert all(120 < n < 280 for n in homes.values()), homes


def test_placement_yields_to_load_beyond_the_slack() -> None:
    prompt = [5, 6, 7]
    home = max("abcd", key=lambda n: (placement_rank(prompt[0], n), n))
    others = [n for n in "abcd" if n != home]
    busy = [cand(n, local=n == others[0], queue=4 if n == home else 0) for n in "abcd"]
    d = placed(prompt, busy)
    assert d.target != home
    assert d.target == max(others, key=lambda n: (placement_rank(prompt[0], n), n))


def test_a_real_prefix_match_beats_placement() -> None:
    prompt = [5, 6, 7, 8]
    mesh = [cand("a", local=True), cand("b"), cand("c", matched=3 * BS), cand("d")]
    d = placed(prompt, mesh)
    assert (d.target, d.reason) == ("c", REASON_PREFIX)


def test_global_prompt_is_not_a_hotspot_key() -> None:
    """Every node holds the 2-block system prompt: the key is the block after it."""
    system = [100, 200]
    mesh = [cand(n, local=n == "a", matched=2 * BS) for n in "abcd"]
    targets = {placed([*system, rest, 9], mesh).target for rest in range(64)}
    assert len(targets) == 4
    again = {placed([*system, 7, rest], mesh).target for rest in range(64)}
    assert len(again) == 1  # same block past the shared prompt: same node


def test_a_busy_holder_is_not_copied_elsewhere_by_the_hash() -> None:
    """The only holder is busy beyond the slack: the idle nodes that hold nothing are not
    placed among by hash; the estimates decide (here: serve where it entered)."""
    prompt = [5, 6, 7, 8, 9]
    for entry in "abd":
        mesh = [cand(n, local=n == entry, matched=4 * BS if n == "c" else 0) for n in "abcd"]
        mesh[2] = replace(mesh[2], queue_depth=3)
        d = placed(prompt, mesh)
        assert (d.target, d.reason) == (entry, REASON_LOCAL_BEST)


def test_placement_needs_block_ids_a_tie_and_something_new() -> None:
    prompt = [5, 6, 7]
    off = placed(prompt, idle_mesh("a"), place_slack_frac=0.0)
    assert (off.target, off.reason) == ("a", REASON_LOCAL_BEST)
    no_ids = run(idle_mesh("a"), request=req(prompt=3 * BS))
    assert (no_ids.target, no_ids.reason) == ("a", REASON_LOCAL_BEST)
    everywhere = [cand(n, local=n == "a", matched=3 * BS) for n in "abcd"]
    assert placed(prompt, everywhere).reason == REASON_LOCAL_BEST


def test_placement_rank_is_stable_and_mixes() -> None:
    assert placement_rank(1, "a") == placement_rank(1, "a")
    assert placement_rank(1, "a") != placement_rank(2, "a")
    assert placement_rank(1, "a") != placement_rank(1, "b")
    assert 0 <= placement_rank((1 << 64) - 1, "z") < 1 << 64


def test_every_policy_is_registered_in_a_file_with_a_header() -> None:
    import importlib

    from zmesh.routing import POLICY_FNS

    assert set(POLICY_FNS) == set(ALL_POLICIES)
    assert set(POLICIES) < set(ALL_POLICIES)
    for name, fn in POLICY_FNS.items():
        module = importlib.import_module(fn.__module__)
        doc = module.__doc__ or ""
        assert f"``{name}``" in doc.split("\n", 1)[0], (name, fn.__module__)
        assert "Algorithm" in doc, fn.__module__


# --------------------------------------------------------------------------- give-up


def late_holder_mesh() -> list[Candidate]:
    """The holder answers in 3 s (its queue), the local node in 5 s (queue + cold prefill)."""
    return [
        cand("a", local=True, matched=0, queue=16),  # 16 * 0.25 + 1024 / 1024 = 5 s
        cand("b", matched=1024, queue=12),  # 12 * 0.25 = 3 s, nothing to prefill
    ]


@pytest.mark.parametrize(("give_up", "forward"), [(0.0, True), (3.0, True), (2.0, False)])
def test_give_up_excludes_peers_expected_later_than_it(give_up: float, forward: bool) -> None:
    d = run(late_holder_mesh(), give_up_s=give_up, min_gain_frac=0.0)
    assert d.forward is forward
    assert d.target == ("b" if forward else "a")
    assert ("b" in d.overloaded) is not forward  # logged as excluded, with the reason
    assert d.reason == (REASON_PREFIX if forward else REASON_LOCAL_BEST)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2048), st.integers(0, 12), st.sampled_from([0.0, 0.01, 0.2])),
        min_size=2,
        max_size=8,
    ),
    st.sampled_from([0.5, 1.0, 2.0, 4.0]),
)
def test_never_forwards_past_the_give_up(
    rows: list[tuple[int, int, float]], give_up: float
) -> None:
    mesh = [
        cand(f"n{k}", local=k == 0, matched=m, queue=q, link=link)
        for k, (m, q, link) in enumerate(rows)
    ]
    d = run(mesh, request=req(2048), give_up_s=give_up)
    if d.forward:
        assert d.est_target_s <= give_up
    # Without placement, the give-up changes nothing else: the best peer stays the best.
    d = run(mesh, request=req(2048), give_up_s=give_up, place_slack_frac=0.0)
    without = run(mesh, request=req(2048), place_slack_frac=0.0)
    if not without.forward or without.est_target_s <= give_up:
        assert (d.target, d.reason) == (without.target, without.reason)


# --------------------------------------------------------------------------- paper, oracle


def _blind(c: Candidate) -> Candidate:
    """``c`` as the paper's design sees it: no link, no queue, no wait."""
    return dataclasses.replace(c, link_delay_s=0.0, queue_depth=0, wait_s=0.0)


_NO_KNOBS = {
    "min_gain_s": 0.0,
    "min_gain_frac": 0.0,
    "balance_abs": 10**9,
    "place_slack_frac": 0.0,
    "give_up_s": 0.0,
}


@settings(max_examples=300, deadline=None)
@given(meshes(), st.integers(0, 2))
def test_property_paper_is_zmesh_blind_to_load_without_knobs(
    mesh: tuple[RouteRequest, list[Candidate]], max_hops: int
) -> None:
    # What the simulator ran as "paper" before the policy had a file of its own.
    request, cands = mesh
    blind = [_blind(c) for c in cands]
    paper = decide(request, cands, RoutingSettings(policy=PAPER, max_hops=max_hops), PolicyState())
    zmesh = decide(request, blind, RoutingSettings(max_hops=max_hops, **_NO_KNOBS), PolicyState())  # type: ignore[arg-type]
    assert (paper.target, paper.reason) == (zmesh.target, zmesh.reason)


@settings(max_examples=300, deadline=None)
@given(meshes())
def test_property_oracle_takes_the_lowest_estimate_first_listed_on_ties(
    mesh: tuple[RouteRequest, list[Candidate]],
) -> None:
    request, cands = mesh
    request = dataclasses.replace(request, hops=0)
    alive = [c for c in cands if c.alive or c.is_local]
    prompt = request.prompt_tokens
    ranked = sorted(alive, key=lambda c: estimate_s(c, prompt))  # stable: ties keep order
    # The oracle lists its best node first, as the local one.
    listed = [dataclasses.replace(c, is_local=k == 0, alive=True) for k, c in enumerate(ranked)]
    d = decide(request, listed, RoutingSettings(policy=ORACLE), PolicyState())
    assert d.target == ranked[0].node_id and not d.forward
    # ... which is what the zmesh policy without its knobs chose for it before.
    z = decide(request, listed, RoutingSettings(**_NO_KNOBS), PolicyState())  # type: ignore[arg-type]
    assert z.target == d.target
