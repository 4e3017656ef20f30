"""The simulator's batching server model: a node that runs several requests at once,
each at the cost model's batched rate, and the oracle that knows it."""

from __future__ import annotations

import pytest

from zmesh.oracle import OracleNode, choose
from zmesh.routing import PolicyState
from zmesh.sim.cache import SlotCache
from zmesh.sim.config import SimConfig
from zmesh.sim.core import simulate
from zmesh.sim.costmodel import CPU_BATCH_BETA, PRESETS, CostModel
from zmesh.sim.enginecheck import calibrate, predict
from zmesh.workload import Arrivals, mmlu_workload

COST = CostModel(0.002, 0.03, 0.015, "test", batch_beta=0.5)


def test_slowdown_is_one_alone_and_grows_by_beta_per_sequence() -> None:
    assert COST.slowdown(1) == 1.0
    assert COST.slowdown(3) == pytest.approx(2.0)
    # The cpu preset's beta is the measured 1.44x tokens/s at 3 busy slots.
    assert 3 / PRESETS["cpu"].slowdown(3) == pytest.approx(1.44)
    assert PRESETS["cpu"].batch_beta == CPU_BATCH_BETA


# Decoding only (prompts cost next to nothing): every request is one decode per step.
DECODE = CostModel(1e-7, 0.0, 0.015, "decode only", batch_beta=0.5)


def test_decoders_that_start_together_share_every_step() -> None:
    """Three at once on three places each get a token per step of slowdown(3): they
    end together, 3 / slowdown(3) times the tokens/s of one at a time."""
    kw = {"n_requests": 3, "n_slots": 3, "prompt_tokens": 4, "max_tokens": 101}
    alone = 100 * DECODE.decode_s_per_token
    batched = predict(DECODE, concurrency=3, places=3, **kw)
    seq = predict(DECODE, concurrency=3, places=1, **kw)
    assert batched["e2e_mean_s"] == pytest.approx(alone * DECODE.slowdown(3), rel=1e-3)
    assert seq["e2e_mean_s"] == pytest.approx(alone * (1 + 2 + 3) / 3, rel=1e-3)
    assert batched["tokens_per_s"] / seq["tokens_per_s"] == pytest.approx(
        3 / DECODE.slowdown(3), rel=1e-3
    )


def test_places_beyond_the_running_ones_wait_in_the_queue() -> None:
    """Six clients on three places: three run, three wait for a place to free."""
    kw = {"n_requests": 6, "n_slots": 3, "prompt_tokens": 4, "max_tokens": 101}
    r = predict(DECODE, concurrency=6, places=3, **kw)
    one = 100 * DECODE.decode_s_per_token * DECODE.slowdown(3)
    assert r["e2e_mean_s"] == pytest.approx((3 * one + 3 * 2 * one) / 6, rel=1e-3)


def test_prompts_are_read_one_at_a_time() -> None:
    """Without answers to decode, a batch is no faster than one at a time: the engine
    reads one prompt per step (batch.py), so batching only reorders nothing."""
    kw = {"n_requests": 6, "n_slots": 3, "prompt_tokens": 300, "max_tokens": 1}
    batched = predict(COST, concurrency=6, places=3, **kw)
    seq = predict(COST, concurrency=6, places=1, **kw)
    for k in ("ttft_mean_s", "e2e_mean_s", "tokens_per_s"):
        assert batched[k] == pytest.approx(seq[k], rel=1e-6), k


def test_a_prompt_read_beside_decoders_slows_them_by_its_chunks() -> None:
    """A long answer running alone, then a long prompt arrives: while the prompt is
    read (one chunk per step) the answer gets a token per chunk step, so it ends later
    than alone, and the prompt reads slower than alone."""
    alone = predict(
        COST, concurrency=1, places=3, n_requests=1, n_slots=3, prompt_tokens=8, max_tokens=200
    )
    both = predict(
        COST, concurrency=2, places=3, n_requests=2, n_slots=3, prompt_tokens=8, max_tokens=200
    )
    assert both["e2e_mean_s"] > alone["e2e_mean_s"]
    assert both["tokens_per_s"] > alone["tokens_per_s"]  # still more tokens per second


def test_calibration_reproduces_the_one_at_a_time_run() -> None:
    measured = {"ttft_mean_s": 0.5, "e2e_mean_s": 2.0}
    cost = calibrate(measured, prompt_tokens=160, max_tokens=64, prefill_s_per_token=0.0025)
    r = predict(
        cost, concurrency=1, places=1, n_requests=4, n_slots=3, prompt_tokens=160, max_tokens=64
    )
    assert r["ttft_mean_s"] == pytest.approx(0.5, abs=1e-4)
    assert r["e2e_mean_s"] == pytest.approx(2.0, abs=1e-4)


def test_one_place_is_the_one_at_a_time_model() -> None:
    """max_running=1 is the model the published sweeps ran: same figures whatever the
    batch slowdown (it never applies to a batch of one)."""
    wl = mmlu_workload(200, alpha=1.0, subjects=8, seed=3)
    figs = []
    for beta in (0.0, 0.9):
        cost = CostModel(0.002, 0.035, 1 / 64, "t", batch_beta=beta)
        cfg = SimConfig(nodes=4, n_slots=3, seed=3, cost=cost, max_running=1)
        figs.append(simulate(cfg, wl, Arrivals("poisson", rate=1.0)).figures)
    assert figs[0]["ttft_mean_s"] == figs[1]["ttft_mean_s"]
    assert figs[0]["reasons"] == figs[1]["reasons"]


def test_batching_nodes_route_near_the_oracle_and_lose_no_request() -> None:
    """On nodes that run 3 at once, zmesh's load picture is what a batching node
    advertises (`candidates.batch_wait_s`: a place, and the prompts ahead read one at a
    time). With only "a place is free" (the place model) it sent requests to nodes
    still reading other prompts and ended 1.66x the oracle's mean TTFT here."""
    wl = mmlu_workload(300, alpha=1.0, subjects=8, seed=5)
    ttft = {}
    for policy in ("zmesh", "oracle"):
        cfg = SimConfig(nodes=4, n_slots=3, seed=5, max_running=3, policy=policy)
        f = simulate(cfg, wl, Arrivals("poisson", rate=3.0)).figures
        assert (f["requests"], f["errors"], f["rejected"]) == (300, 0, 0), f
        ttft[policy] = f["ttft_mean_s"]
    assert ttft["zmesh"] <= 1.2 * ttft["oracle"], ttft


def test_max_running_must_fit_the_slots() -> None:
    with pytest.raises(ValueError, match="max_running"):
        SimConfig(n_slots=3, max_running=4)
    with pytest.raises(ValueError, match="max_running"):
        SimConfig(max_running=0)


def test_oracle_weighs_the_batch_a_request_would_join() -> None:
    """A holder of half the prompt that would prefill the rest 3x slower (a full batch)
    loses to an idle node that prefills all of it alone."""
    tokens = tuple(range(200))
    holder, idle = SlotCache(3), SlotCache(3)
    holder.finish(holder.claim(tokens[:100]).slot, tokens[:100], None, 0.0)

    def nodes(factor: float) -> list[OracleNode]:
        return [
            OracleNode("holder", 0, holder, 2, 0.0, prefill_factor=factor),
            OracleNode("idle", 1, idle, 0, 0.0),
        ]

    assert choose(nodes(1.0), tokens, 0.002, PolicyState.seeded(0))[0].node_id == "holder"
    assert choose(nodes(3.0), tokens, 0.002, PolicyState.seeded(0))[0].node_id == "idle"
