"""Simulator: deterministic, exact where it claims to be, sane results, and the CLI."""

from __future__ import annotations

import argparse
import heapq
import json
import random
import subprocess
import sys
from collections import Counter

import pytest

from zmesh.blocks import BlockHasher
from zmesh.radix import RadixTree
from zmesh.sim.cache import KnownIdsHasher, SlotCache, TokenCache
from zmesh.sim.core import SIM_POLICIES, SimConfig, Simulator, simulate
from zmesh.sim.costmodel import PRESETS, CostModel, load_cost_model
from zmesh.sim.tokens import PromptTable, pseudo_tokenize
from zmesh.workload import Arrivals, chat_workload, mmlu_workload, shared_prefix_workload

HASHER = BlockHasher(b"test-model", "default", 16)


def _run(policy: str, **kw: object) -> dict:
    wl = kw.pop("workload", None) or mmlu_workload(300, alpha=1.0, subjects=8, seed=1)
    arrivals = kw.pop("arrivals", None) or Arrivals("poisson", rate=0.5)
    cfg = SimConfig(policy=policy, **{"nodes": 4, "n_slots": 3, "seed": 1, **kw})  # type: ignore[arg-type]
    return simulate(cfg, wl, arrivals).figures  # type: ignore[arg-type]


# ---- pieces ----------------------------------------------------------------------------


def test_cost_model_from_engine_bench(tmp_path) -> None:
    cpu = PRESETS["cpu"]
    assert cpu.prefill_s_per_token == pytest.approx(1 / 500)
    assert cpu.ttft_s(675 - 669) == pytest.approx(0.035)  # the warm TTFT it came from
    assert cpu.ttft_s(675) == pytest.approx(0.035 + 669 / 500)
    assert cpu.service_s(0, 4) == pytest.approx(cpu.base_s + 3 / 64)
    f = tmp_path / "engine.json"
    f.write_text(
        "progress on stderr\n"
        + json.dumps(
            {
                "prefill_tokens_per_s": 1000.0,
                "prompt_tokens": 600,
                "warm_mean_cached_tokens": 590,
                "warm_ttft_mean_s": 0.03,
                "decode_tokens_per_s": 50.0,
            }
        )
    )
    m = load_cost_model(f)
    assert m.prefill_s_per_token == pytest.approx(0.001)
    assert m.base_s == pytest.approx(0.02)
    assert load_cost_model("gpu") is PRESETS["gpu"]
    with pytest.raises(ValueError):
        load_cost_model("tpu")


def test_prompt_table_ids_are_the_real_block_ids() -> None:
    wl = chat_workload(3, turns=3, system_prompts=2, seed=0)
    table = PromptTable(wl, HASHER)
    for i in range(len(wl)):
        tokens, ids = table.get(i)
        assert list(tokens) == pseudo_tokenize(wl.prompt(i))
        assert ids == HASHER.block_ids(tokens)
        r = wl.requests[i]
        if r.parent >= 0:
            assert tokens[: len(table.get(r.parent)[0])] == table.get(r.parent)[0]
    mm = mmlu_workload(20, subjects=2, seed=0)
    t2 = PromptTable(mm, HASHER)
    for i in range(len(mm)):
        tokens, ids = t2.get(i)
        assert ids == HASHER.block_ids(tokens)


def test_known_ids_hasher_gives_the_tree_the_same_blocks() -> None:
    rng = random.Random(0)
    base = [rng.randrange(1000) for _ in range(100)]
    seqs = [tuple(base[: rng.randrange(20, 100)] + [rng.randrange(1000) for _ in range(30)])]
    seqs += [
        tuple(base + [rng.randrange(1000) for _ in range(rng.randrange(40))]) for _ in range(8)
    ]
    real, fast = RadixTree(HASHER), RadixTree(KnownIdsHasher(HASHER))
    for k, s in enumerate(seqs):
        real.set_sequence(k % 3, s)
        fast.hasher.remember(s, HASHER.block_ids(s))  # type: ignore[union-attr]
        fast.set_sequence(k % 3, s)
        assert real.block_ids() == fast.block_ids()
        a, b = real.drain_events(), fast.drain_events()
        assert sorted(a.added) == sorted(b.added) and sorted(a.removed) == sorted(b.removed)


def test_slot_cache_follows_the_engine_policy() -> None:
    c = SlotCache(2, HASHER)
    p = tuple(range(100))
    a = c.claim((*p, 500, 501))
    assert (a.slot, a.reuse) == (0, 0)
    c.finish(a.slot, (*p, 500, 501, -1))
    b = c.claim((*p, 600))  # most of slot 0 is our prefix: continue there in place
    assert (b.slot, b.reuse) == (0, 100)
    c.finish(b.slot, (*p, 600, -2))
    other = tuple(range(1000, 1050))
    d = c.claim(other)  # nothing shared: the free slot
    assert (d.slot, d.reuse) == (1, 0)
    c.finish(d.slot, (*other, -3))
    short = (*tuple(range(30)), 7, 7, 7, 7)
    e = c.claim(short)  # 30 of slot 0's 102: share into the LRU other slot, keep slot 0
    assert (e.slot, e.reuse, e.evicted) == (1, 30, 51)
    c.finish(e.slot, (*short, -4))
    assert c.match(p) == 100 and c.match(short) == len(short)
    assert c.tree.block_ids()  # advertised blocks follow the slots


def test_token_cache_evicts_under_its_budget() -> None:
    c = TokenCache(200, HASHER)
    for k in range(6):
        seq = tuple(range(k * 1000, k * 1000 + 80))
        c.claim(seq)
        c.finish(0, seq, HASHER.block_ids(seq))
        assert c.tree.total_tokens <= 200
    assert c.match(tuple(range(5000, 5080))) == 80  # the newest survived
    assert c.match(tuple(range(0, 80))) == 0  # the oldest was evicted


# ---- determinism and exactness ------------------------------------------------------------


def test_simulation_is_deterministic() -> None:
    a = _run("zmesh", loss=0.05)
    b = _run("zmesh", loss=0.05)
    for k in ("ttft_mean_s", "hit_rate", "per_node", "forwards", "events", "snapshots"):
        assert a[k] == b[k]
    c = _run("zmesh", loss=0.05, seed=2)
    assert (c["ttft_mean_s"], c["per_node"]) != (a["ttft_mean_s"], a["per_node"])


def test_poisson_starts_are_drawn_one_at_a_time_as_if_all_up_front() -> None:
    wl = shared_prefix_workload(50, groups=4, seed=1)
    sim = Simulator(SimConfig(nodes=2, seed=5), wl, Arrivals("poisson", rate=3.0))
    sim._start_arrivals()
    assert len(sim._heap) == 1  # one pending start, not fifty
    rng, t = random.Random(5 ^ 0xA441), 0.0
    for s in range(50):
        t += rng.expovariate(3.0)
        at, _, _, stream, _ = heapq.heappop(sim._heap)
        assert (at, stream) == (t, s)
        sim._open_next()
    assert not sim._heap


@pytest.mark.parametrize("policy", ["zmesh", "paper", "least_loaded"])
@pytest.mark.parametrize("nodes", [5, 20])
def test_pruned_candidates_decide_like_the_full_list(policy: str, nodes: int) -> None:
    # verify=True also decides every request on every alive peer, built as a node
    # builds them (zmesh.candidates); 20 nodes uses the shared estimates and their index.
    wl = mmlu_workload(300, alpha=1.0, subjects=8, seed=1)
    cfg = SimConfig(policy=policy, nodes=nodes, n_slots=3, seed=1, verify=True, delay_s=0.002)
    sim = Simulator(cfg, wl, Arrivals("poisson", rate=0.5))
    assert sim.run().figures["requests"] == 300
    assert len(sim.checked) >= 250  # every routed request (fallbacks are not routed)
    assert len({full for _, full in sim.checked}) > 1  # decisions went several ways
    mismatched = [(pruned, full) for pruned, full in sim.checked if pruned != full]
    assert mismatched == []


def test_index_matches_equal_the_estimates() -> None:
    wl = shared_prefix_workload(800, groups=30, alpha=0.8, prefix_words=80, seed=2)
    sim = Simulator(
        SimConfig(nodes=24, n_slots=3, policy="zmesh", seed=3), wl, Arrivals("poisson", rate=6)
    )
    sim.run()
    view = sim.views[0]
    assert view.holders is not None
    for i in range(0, 800, 37):
        _, ids = sim.prompts.get(i)
        got = sim._index_matches(view.holders, ids)
        for p, est in view.alive:
            assert got.get(p, 0) == est.match_blocks(ids)


def test_every_policy_runs_and_accounts_for_every_request() -> None:
    wl = chat_workload(40, turns=3, system_prompts=3, seed=4)
    for policy in SIM_POLICIES:
        f = _run(policy, workload=wl, arrivals=Arrivals("closed", concurrency=4))
        assert f["requests"] + f["errors"] == len(wl)
        assert f["errors"] == 0
        assert 0.0 <= f["hit_rate"] <= 1.0
        assert sum(f["per_node"]) == f["requests"]


# ---- sanity: the study's qualitative claims --------------------------------------------------


def test_zero_delay_and_skew_zmesh_beats_random() -> None:
    z, r = _run("zmesh", delay_s=0.0, jitter=0.0), _run("random", delay_s=0.0, jitter=0.0)
    assert z["hit_rate"] > r["hit_rate"] + 0.15
    assert z["ttft_mean_s"] < 0.6 * r["ttft_mean_s"]


def test_oracle_hits_at_least_as_much_as_cache_blind_policies() -> None:
    o = _run("oracle")
    for policy in ("random", "round_robin", "least_loaded"):
        assert o["hit_rate"] >= _run(policy)["hit_rate"]
    assert o["forwards"] == 0  # it routes on the client side


def test_hotspot_hurts_the_paper_design_not_zmesh() -> None:
    # One hot prefix, heavy traffic: longest-match-only routing piles it on one node.
    wl = shared_prefix_workload(1200, groups=6, alpha=2.0, prefix_words=150, seed=5)
    kw = {"nodes": 8, "n_slots": 2, "workload": wl, "arrivals": Arrivals("poisson", rate=25.0)}
    paper, zmesh = _run("paper", **kw), _run("zmesh", **kw)
    assert paper["load_spread"] > zmesh["load_spread"]
    assert zmesh["ttft_mean_s"] < 0.5 * paper["ttft_mean_s"]  # same hits, no queue
    assert zmesh["hit_rate"] >= paper["hit_rate"] - 0.02


def test_high_delay_makes_forwarding_cost_more() -> None:
    fast = _run("zmesh", delay_s=0.0005, cost=PRESETS["gpu"])
    slow = _run("zmesh", delay_s=0.2, cost=PRESETS["gpu"])
    assert slow["ttft_mean_s"] > fast["ttft_mean_s"]
    assert slow["forwards"] < fast["forwards"]  # delay-aware: it forwards less


def test_lossy_gossip_is_repaired_by_snapshots() -> None:
    clean, lossy = _run("zmesh"), _run("zmesh", loss=0.3)
    assert lossy["deltas_lost"] > 0
    assert lossy["snapshots"] > clean["snapshots"]
    assert lossy["requests"] == 300


def test_node_crashes_fall_back_and_resync() -> None:
    wl = mmlu_workload(600, alpha=1.0, subjects=8, seed=1)
    f = _run("zmesh", workload=wl, arrivals=Arrivals("poisson", rate=1.0), failures=3)
    assert f["requests"] + f["errors"] == 600
    assert f["requests"] > 550
    assert f["snapshots"] > 4  # restarted nodes come back with a new epoch


def test_scale_path_with_candidate_subsets() -> None:
    wl = shared_prefix_workload(3000, groups=200, alpha=1.0, prefix_words=60, seed=6, questions=500)
    cfg = SimConfig(
        nodes=200,
        n_slots=4,
        policy="zmesh",
        seed=1,
        heartbeat_s=1.0,
        suspect_after_s=3.0,
        dead_after_s=9.0,
    )
    res = simulate(cfg, wl, Arrivals("poisson", rate=60))
    assert res.config["max_candidates"] == 16 and res.config["estimates"] == "shared"
    assert res.figures["requests"] == 3000
    assert res.figures["hit_rate"] > 0.5


# ---- the command line ------------------------------------------------------------------


def _zmesh_sim(*args: str, timeout: float) -> tuple[dict, str]:
    """Run ``python -m zmesh sim ARGS --json``, which must succeed: what it printed
    (one JSON object) and its stderr."""
    cmd = [sys.executable, "-m", "zmesh", "sim", *args, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    return json.loads(out.stdout), out.stderr


def test_sim_run_cli_writes_json(tmp_path) -> None:
    res, _ = _zmesh_sim(
        *("run", "--nodes", "3", "--requests", "150", "--policies", "zmesh,random"),
        *("--jobs", "1", "--out", str(tmp_path)),
        timeout=120,
    )
    assert set(res["policies"]) == {"zmesh", "random"}
    assert "ttft_mean_s" in res["policies"]["zmesh"] and "hit_rate" in res["policies"]["random"]
    assert list(tmp_path.glob("run-*.json"))


def test_sim_sweep_cli_tiny(tmp_path) -> None:
    res, _ = _zmesh_sim(
        *("sweep", "--nodes", "3", "--delays-ms", "1,100", "--alphas", "0,1"),
        *("--requests", "120", "--jobs", "1", "--out", str(tmp_path)),
        timeout=240,
    )
    assert len(res["cells"]) == 2 * 2 * len(SIM_POLICIES)
    assert "max_zmesh_over_best_baseline" in res["summary"]


def test_cost_model_is_a_dataclass() -> None:
    assert CostModel(0.001, 0.01, 0.01).service_s(10, 1) == pytest.approx(0.02)


# ---- bursts of long conversations ---------------------------------------------------------


def _bursty(
    policy: str, arrivals: str = "bursts", n: int = 400, keepalive: bool = True, **routing: object
) -> dict:
    from zmesh.sim.cells import Cell, run_cell

    cell = Cell(
        policy=policy,
        nodes=4,
        alpha=1.0,
        delay_s=0.001,
        workload="bursty",
        requests=n,
        slots=4,
        load=0.7,
        cost="cpu",
        seed=2,
        arrivals=arrivals,
        sessions=12,
        diagnose=True,
        routing=tuple(routing.items()),
        keepalive=keepalive,
    )
    return run_cell(cell)


def test_bursts_arrive_when_due_at_one_instant_and_turns_wait_for_answers() -> None:
    from zmesh.workload import bursty_workload

    wl = bursty_workload(150, sessions=6, seed=1, first_words=100, max_prompt_words=600)
    arrivals = Arrivals("bursts", rate=0.5, burst=4)
    sim = Simulator(SimConfig(nodes=3, policy="zmesh", seed=1), wl, arrivals)
    sent: dict[int, float] = {}
    arrive = sim._on_arrive

    def record(i: int, stream: int) -> None:
        sent[i] = sim.now
        arrive(i, stream)

    sim._on_arrive = record  # type: ignore[method-assign]
    f = sim.run().figures
    assert f["requests"] == 150 and f["errors"] == 0
    due = arrivals.due(150, seed=1)
    for r in wl.requests:
        assert sent[r.index] >= due[r.index]
        if r.parent >= 0:  # the client sends a turn once the last one is answered
            assert sent[r.index] >= sent[r.parent] + sim.e2e[r.parent] - 1e-9
    instants = Counter(sent.values())
    assert max(instants.values()) >= 3  # several requests at one instant


def test_diagnosis_counts_herds_only_when_arrivals_bunch() -> None:
    bunched = _bursty("random")
    d = bunched["diagnosis"]
    assert d["herds"] > 0 and d["herded_requests"] >= 2 * d["herds"]
    assert 0 < d["idle_picks_already_busy"] <= d["idle_picks"]
    by = d["by_reason"]
    assert sum(r["requests"] for r in by.values()) == bunched["requests"]
    assert all(r["away_from_best_match"] <= r["requests"] for r in by.values())
    assert by["random"]["tokens_lost"] > 0
    spread = _bursty("random", arrivals="spread")["diagnosis"]
    assert spread["herds"] == 0  # no two requests share an instant


def test_keepalives_and_give_up_keep_bursts_from_falling_back() -> None:
    # Bursts queue long decodes at the holders of the conversations. Nodes without
    # keep-alives forwarded there anyway, gave the forward up after 5 s without a first
    # token and served it again at its entry (docs/evaluation.md, "Bursts"); not
    # forwarding past the give-up helped; keep-alives remove the give-up itself.
    old = _bursty("zmesh", keepalive=False, give_up_s=0.0)
    give_up = _bursty("zmesh", keepalive=False)
    now = _bursty("zmesh")
    assert old["fallbacks"] > 0.1 * old["requests"]
    assert give_up["fallbacks"] < 0.6 * old["fallbacks"]
    assert give_up["ttft_mean_s"] < old["ttft_mean_s"]
    assert now["fallbacks"] == 0
    assert now["ttft_mean_s"] < old["ttft_mean_s"]


def test_sim_run_cli_bursty_diagnosis_and_settings(tmp_path) -> None:
    args = ["run", "--workload", "bursty", "--nodes", "3"]
    args += ["--requests", "60", "--policies", "zmesh,oracle", "--jobs", "1"]
    args += ["--set", "give_up_s=2.5", "--forward-timeout-s", "3", "--no-keepalive"]
    res, stderr = _zmesh_sim(*args, "--out", str(tmp_path), timeout=300)
    z = res["policies"]["zmesh"]
    assert sum(r["requests"] for r in z["diagnosis"]["by_reason"].values()) == z["requests"]
    assert res["policies"]["oracle"]["diagnosis"]["by_reason"]["oracle"]["requests"] == 60
    assert "sent to a node that looked idle" in stderr
    assert list(tmp_path.glob("run-bursty-n3-*-bursts.json"))
    bad = subprocess.run(
        [sys.executable, "-m", "zmesh", "sim", *args, "--set", "no_such=1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "no_such" in bad.stderr


def test_admission_refuses_the_burst_herd_and_answers_every_request_once() -> None:
    # Requests of one instant entering at different nodes all went to their conversation's
    # holder, the one node that could see the herd; now it refuses those that would wait
    # longer than their forwarder expects to take itself (routing/admission.py).
    from zmesh.sim.cli import Cell

    def run(**routing: object) -> tuple[dict, Counter[int]]:
        cell = Cell(
            policy="zmesh",
            nodes=4,
            alpha=1.0,
            delay_s=0.001,
            workload="bursty",
            requests=400,
            slots=4,
            load=0.7,
            cost="cpu",
            seed=2,
            arrivals="bursts",
            sessions=12,
            diagnose=True,
            routing=tuple(routing.items()),
        )
        sim = Simulator(*cell.build())
        answered: Counter[int] = Counter()
        complete = sim._complete

        def record(job, node) -> None:  # type: ignore[no-untyped-def]
            answered[job.index] += 1
            complete(job, node)

        sim._complete = record  # type: ignore[method-assign]
        return sim.run().figures, answered

    off, off_answers = run(admission=False)
    on, answers = run()
    local, _ = run(admit_retries=0)
    assert off["refused"] == 0 and on["refused"] > 0 and local["refused"] > 0
    herd = off["diagnosis"]["herd_queued"]
    assert herd > 50
    assert on["diagnosis"]["herd_queued"] < 0.7 * herd
    assert local["diagnosis"]["herd_queued"] < 0.7 * herd
    # A refusal costs a round trip, never an answer: each request answered once.
    for figures, answered in ((on, answers), (off, off_answers)):
        assert figures["requests"] == 400 and figures["errors"] == 0
        assert set(answered) == set(range(400)) and set(answered.values()) == {1}
    assert on["reasons"]["refused"] > 0  # some were served by their entry after all


def test_eviction_aware_admission_moves_cold_copies_where_they_evict_less() -> None:
    # MMLU at 16 nodes: 48 subjects on 64 slots, some far longer than others. Placement
    # sends a subject nobody holds to its hash node, which must overwrite another
    # subject, while the entry may evict less (or has a free slot). With
    # admit_evictions both sides count what serving there would overwrite (as the
    # oracle does), the peer refuses such copies, and more of the cache stays useful.
    from zmesh.sim.cells import Cell, subjects_for

    def run(evictions: bool) -> tuple[dict, Counter[int]]:
        cell = Cell(
            policy="zmesh",
            nodes=16,
            alpha=0.5,
            delay_s=0.0001,
            workload="mmlu",
            requests=1000,
            slots=4,
            load=0.5,
            cost="cpu",
            seed=0,
            subjects=subjects_for(argparse.Namespace(subjects=0, workload="mmlu"), 16),
            # Admission on its own: the eviction charge (on by default) already keeps
            # these copies off nodes that would evict (0.354 s against 0.388 s here).
            routing=(("admit_evictions", evictions), ("evict_charge", 0.0)),
        )
        sim = Simulator(*cell.build())
        answered: Counter[int] = Counter()
        complete = sim._complete

        def record(job, node) -> None:  # type: ignore[no-untyped-def]
            answered[job.index] += 1
            complete(job, node)

        sim._complete = record  # type: ignore[method-assign]
        return sim.run().figures, answered

    off, _ = run(False)
    on, answered = run(True)
    assert on["refused"] > 3 * max(off["refused"], 3)
    assert on["hit_rate"] > off["hit_rate"] + 0.02
    assert on["ttft_mean_s"] < 0.9 * off["ttft_mean_s"]
    assert on["requests"] == 1000 and on["errors"] == 0
    assert set(answered) == set(range(1000)) and set(answered.values()) == {1}
