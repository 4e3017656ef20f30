"""Simulator, KV shipping (policy zmesh_ship): when a pull is chosen, what it leaves
cached, that every request is answered once, and that pruning keeps the decision."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.blocks import BlockHasher
from zmesh.candidates import ship_fixed_s, ship_s_per_token
from zmesh.kvtransfer import ShipCosts
from zmesh.sim.cache import SlotCache, TokenCache
from zmesh.sim.core import SimConfig, Simulator
from zmesh.sim.state import Job, SimNode
from zmesh.workload import Arrivals, Workload, mmlu_workload, shared_prefix_workload

HASHER = BlockHasher(b"test-model", "default", 16)


def _hot() -> Workload:
    # A few long shared system prompts, short questions: the case shipping is for.
    return shared_prefix_workload(400, groups=4, alpha=1.0, prefix_words=400, seed=3)


class _Checked(Simulator):
    """Counts every answer and checks each import against the node's cache."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.answers: Counter[int] = Counter()
        self.imports: list[tuple[int, int, int, bool]] = []

    def _complete(self, job: Job, node: SimNode) -> None:
        self.answers[job.index] += 1
        super()._complete(job, node)

    def _import_pull(self, node: SimNode, job: Job) -> float:
        n = job.pull_got
        prefix = job.tokens[: max(n, 0)]
        before = node.cache.match(prefix)
        tokens0 = self.ship_stats["tokens"]
        seconds = super()._import_pull(node, job)
        after = node.cache.match(prefix)
        # The blocks the node will advertise: its tree's, block ids from the real hasher.
        held_ids = node.cache.tree.match(prefix).length // self.cfg.block_size
        self.imports.append(
            (after - before, self.ship_stats["tokens"] - tokens0, n, held_ids == n // 16)
        )
        return seconds


def _sim(bandwidth_mbit: float, delay_s: float, **kw: object) -> _Checked:
    cfg = SimConfig(
        policy="zmesh_ship",
        nodes=4,
        n_slots=2,
        seed=2,
        bandwidth_mbit=bandwidth_mbit,
        delay_s=delay_s,
        **kw,  # type: ignore[arg-type]
    )
    return _Checked(cfg, _hot(), Arrivals("poisson", rate=8.0))


def test_shipping_is_chosen_on_a_fast_link_and_every_request_answered_once() -> None:
    # Admission and the eviction charge off: refusals, and forwards to a holder that
    # the charge makes dearer to skip, take a few of this small run's pulls away, and
    # what is checked here is the pull itself.
    sim = _sim(10_000.0, 0.0005, routing={"admission": False, "evict_charge": 0.0})
    f = sim.run().figures
    assert f["requests"] == 400 and f["errors"] == 0
    assert sorted(sim.answers) == list(range(400))
    assert set(sim.answers.values()) == {1}
    assert f["reasons"].get("shipped", 0) == f["ship_pulls"] >= 5
    assert f["ship_imported"] >= 5
    assert f["ship_imported"] + f["ship_failed"] == f["ship_pulls"]
    assert f["shipped_bytes_per_request"] > 0
    # Each import grows the requester's cache by exactly the tokens counted as shipped,
    # and its tree (what it advertises) holds the pulled prefix's blocks.
    assert sim.imports
    for grown, counted, n, advertised in sim.imports:
        assert grown == counted
        if counted:
            assert 0 < counted <= n <= sim.cfg.ship_max_tokens
            assert advertised


def test_shipping_is_never_chosen_on_a_very_slow_link() -> None:
    sim = _sim(0.5, 0.05)  # half a megabit: a 512-token state takes two minutes
    f = sim.run().figures
    assert f["requests"] == 400 and f["errors"] == 0
    assert f["ship_pulls"] == 0 and "shipped" not in f["reasons"]
    assert set(sim.answers.values()) == {1}


def test_shipping_off_decides_as_zmesh() -> None:
    # zmesh_ship with ship turned back off is the zmesh policy, figure for figure.
    wl = mmlu_workload(200, alpha=1.0, subjects=8, seed=1)
    a = Simulator(
        SimConfig(policy="zmesh", nodes=4, n_slots=3, seed=1), wl, Arrivals("poisson", rate=0.5)
    )
    b = Simulator(
        SimConfig(policy="zmesh_ship", nodes=4, n_slots=3, seed=1, routing={"ship": False}),
        wl,
        Arrivals("poisson", rate=0.5),
    )
    fa, fb = a.run().figures, b.run().figures
    for k in ("ttft_mean_s", "ttft_p99_s", "hit_rate", "forwards", "reasons"):
        assert fa[k] == fb[k]


@pytest.mark.parametrize("nodes", [5, 20])
def test_pruned_candidates_decide_like_the_full_list_with_shipping(nodes: int) -> None:
    cfg = SimConfig(
        policy="zmesh_ship", nodes=nodes, n_slots=2, seed=1, verify=True, bandwidth_mbit=10_000.0
    )
    # 20 nodes: the shared estimates and their index; the load grows with the nodes.
    sim = Simulator(cfg, _hot(), Arrivals("poisson", rate=2.0 * nodes))
    f = sim.run().figures
    assert f["requests"] == 400
    assert any(full[1] == "shipped" for _, full in sim.checked)
    assert [(a, b) for a, b in sim.checked if a != b] == []


def test_ship_cost_terms_are_the_nodes() -> None:
    costs = ShipCosts(
        start_bytes_per_token=18_000.0, start_import_s_per_byte=2e-9, start_bandwidth_bps=1.25e8
    )
    assert costs.ship_s_per_token("p") == pytest.approx(18_000 / 1.25e8 + 18_000 * 2e-9)
    assert ship_s_per_token(18_000.0, 1.25e8, 18_000 * 2e-9) == costs.ship_s_per_token("p")
    assert ship_fixed_s(0.01, 0.015) == pytest.approx(0.035)


@settings(max_examples=60, deadline=None)
@given(
    seqs=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=80), max_size=6),
    shipped=st.lists(st.integers(0, 3), min_size=1, max_size=80),
    slots=st.integers(1, 3),
)
def test_import_grows_the_cache_by_what_it_returns(
    seqs: list[list[int]], shipped: list[int], slots: int
) -> None:
    for cache in (SlotCache(slots, HASHER), TokenCache(120, HASHER)):
        for s in seqs:
            claim = cache.claim(tuple(s))
            cache.finish(claim.slot, tuple(s))
        prefix = tuple(shipped)
        before = cache.match(prefix)
        evicts = cache.import_evicts(prefix)
        slots = list(cache.slots) if isinstance(cache, SlotCache) else []
        new = cache.import_prefix(prefix)
        if isinstance(cache, SlotCache) and new:
            # import_evicts named what the import overwrote: the slot it landed in.
            (changed,) = [i for i, old in enumerate(slots) if cache.slots[i] != old] or [-1]
            assert changed >= 0 and len(slots[changed]) == evicts
        assert cache.match(prefix) == (before + new if new else before)
        assert new == (0 if before >= len(prefix) else len(prefix) - before)
        if new:
            assert cache.match(prefix) == len(prefix)


def test_sim_ship_cli_tiny(tmp_path, capsys) -> None:
    from zmesh.sim.cli import main

    argv = ["ship", "--workloads", "shared", "--nodes", "4", "--requests", "120"]
    argv += ["--delays-ms", "1", "--alphas", "1", "--bandwidths-mbit", "100,10000"]
    assert main([*argv, "--jobs", "1", "--out", str(tmp_path), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["bandwidth_mbit"] for r in res["rows"]] == [100, 10000]
    for r in res["rows"]:
        assert r["zmesh_ttft_s"] > 0 and r["oracle_ttft_s"] > 0 and r["ship_ttft_s"] > 0
        assert r["pulls_per_request"] >= 0 and r["mb_per_request"] >= 0
    assert res["summary"]["slow_link"]["bandwidth_mbit"] == 100
    assert (tmp_path / "ship-n4.json").exists()


def test_node_crashes_during_pulls_leave_every_request_answered_at_most_once() -> None:
    # The eviction charge off, as in the pull test above: this checks pulls under crashes.
    sim = _sim(10_000.0, 0.0005, failures=3, downtime_s=2.0, routing={"evict_charge": 0.0})
    f = sim.run().figures
    assert f["ship_pulls"] >= 5
    assert f["requests"] + f["errors"] == 400
    assert sum(sim.answers.values()) == f["requests"]
    assert set(sim.answers.values()) == {1}
