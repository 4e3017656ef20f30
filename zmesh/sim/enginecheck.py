"""The simulator's server model against the real engine, on the same requests.

`zmesh bench engine --concurrency ... --sequential` serves the same closed-loop
requests on one real engine, batched and one at a time. `predict` runs those
requests through the simulator: one node, the same slots, the same places (all of
them batched, one sequential), the same concurrency, prompt and answer lengths, and
nothing shared between prompts. Its cost model is calibrated from the bench's own
one-at-a-time run (prefill rate, base, decode rate) plus a batch slowdown measured
elsewhere (`costmodel.CPU_BATCH_BETA` unless given), so the bench prints what the
simulator assumes about batching beside what the engine did, run by run.
"""

from __future__ import annotations

import statistics
from typing import Any

from zmesh.sim.config import SimConfig
from zmesh.sim.core import simulate
from zmesh.sim.costmodel import CPU_BATCH_BETA, CostModel
from zmesh.workload import Arrivals, Request, Workload

__all__ = ["calibrate", "predict", "side_by_side"]


def calibrate(
    sequential_c1: dict[str, Any],
    prompt_tokens: float,
    max_tokens: int,
    prefill_s_per_token: float,
    batch_beta: float = CPU_BATCH_BETA,
) -> CostModel:
    """A cost model from the bench's one-at-a-time, one-client run: its mean TTFT is
    base + prompt * prefill (the engine's measured prefill rate), the rest of its mean
    end-to-end time is (max_tokens - 1) decode steps."""
    ttft = float(sequential_c1["ttft_mean_s"])
    decode_s = (float(sequential_c1["e2e_mean_s"]) - ttft) / max(max_tokens - 1, 1)
    base = max(ttft - prompt_tokens * prefill_s_per_token, 0.0)
    return CostModel(prefill_s_per_token, base, decode_s, "engine bench, c=1", batch_beta)


def _workload(n: int, prompt_tokens: int, max_tokens: int) -> Workload:
    """``n`` prompts of ``prompt_tokens`` stand-in tokens each, sharing none of them
    (every piece is 4 letters: one token of the simulator's tokenizer)."""

    def word(i: int, k: int) -> str:
        v = i * 100_003 + k
        return " " + "".join(chr(97 + (v // 26**d) % 26) for d in range(4))

    reqs = [
        Request(
            index=i,
            group=f"p{i}",
            prefix="".join(word(i, k) for k in range(prompt_tokens)),
            suffix="",
            max_tokens=max_tokens,
        )
        for i in range(n)
    ]
    return Workload("engine-check", reqs)


def predict(
    cost: CostModel,
    *,
    concurrency: int,
    places: int,
    n_requests: int,
    n_slots: int,
    prompt_tokens: int,
    max_tokens: int,
) -> dict[str, float]:
    """The simulator's figures for one bench run (mean TTFT, mean end-to-end, tokens/s)."""
    cfg = SimConfig(
        nodes=1,
        n_slots=n_slots,
        max_running=places,
        cost=cost,
        block_size=16,
        jitter=0.0,
        delay_s=0.0,
    )
    res = simulate(
        cfg,
        _workload(n_requests, prompt_tokens, max_tokens),
        Arrivals("closed", concurrency=concurrency),
    )
    wall = float(res.figures["sim_s"])
    return {
        "ttft_mean_s": round(statistics.fmean(res.ttft_s), 4),
        "e2e_mean_s": round(statistics.fmean(res.e2e_s), 4),
        "tokens_per_s": round(n_requests * max_tokens / wall, 2) if wall > 0 else 0.0,
    }


def side_by_side(bench: dict[str, Any], prefill_s_per_token: float) -> list[dict[str, Any]]:
    """For every run of a `zmesh bench engine --sequential` result: the engine's
    figures, the simulator's, and their ratio (simulated / measured)."""
    runs = bench["runs"]
    base = next(r for r in runs if r["mode"] == "sequential" and r["concurrency"] == 1)
    cost = calibrate(base, bench["prompt_tokens"], bench["max_tokens"], prefill_s_per_token)
    rows = []
    for r in runs:
        sim = predict(
            cost,
            concurrency=r["concurrency"],
            places=bench["n_slots"] if r["mode"] == "batched" else 1,
            n_requests=r["requests"],
            n_slots=bench["n_slots"],
            prompt_tokens=round(bench["prompt_tokens"]),
            max_tokens=bench["max_tokens"],
        )
        row: dict[str, Any] = {"mode": r["mode"], "concurrency": r["concurrency"]}
        for k in ("ttft_mean_s", "e2e_mean_s", "tokens_per_s"):
            row[k] = {"engine": r[k], "sim": sim[k], "sim_over_engine": round(sim[k] / r[k], 3)}
        rows.append(row)
    return rows
