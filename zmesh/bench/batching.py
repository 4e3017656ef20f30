"""Continuous batching benchmark: closed-loop clients on one engine, batched vs one
at a time, side by side in one run.

``c`` clients each send a request, wait for its end, and send the next, until
``requests`` have been served; every request has a prompt of its own (its own
namespace: nothing is reused) and generates ``max_tokens`` tokens. "batched" lets
every slot run (``max_running = n_slots``); "sequential" admits one request at a
time (``max_running = 1``: the old engine's path, queueing in the engine's FIFO).
Levels and modes interleave (c=1 batched, c=1 sequential, c=3 ...) so load drift on a
shared machine hits both alike. Reported per run: aggregate generated tokens/s,
TTFT (submit to first token, waiting for a slot included) mean/p50/p99, end-to-end
mean/p50/p99, llama_decode steps and the mean number of sequences per step. With
``--sequential`` and level 1, also what the simulator's server model predicts for the
same runs (`zmesh.sim.enginecheck`: calibrated on the one-at-a-time c=1 run), as
simulated / measured per figure.

    zmesh bench engine --concurrency 1,3,6 --sequential [--threads 1] [--json]
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from zmesh.config import EngineConfig
from zmesh.engine import Engine, GenerationResult, Request, StepReport
from zmesh.protocol import SamplingParams

TOPICS = ["rivers", "planets", "metals", "birds", "poems", "bridges", "markets", "storms"]


def prompt(engine: Engine, i: int, target_tokens: int) -> list[int]:
    """A prompt of about ``target_tokens`` tokens that shares nothing with another i."""
    text = f"Note {i}. The following are facts about {TOPICS[i % len(TOPICS)]}, set {i}.\n"
    k = 0
    while len(engine.tokenize(text)) < target_tokens:
        text += f"Fact {k} of set {i}: item {(i * 31 + k * 7) % 101} weighs {k * 3 + i} units.\n"
        k += 1
    return engine.tokenize(text + "Summary:")[: target_tokens + 2]


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_level(
    engine: Engine, prompts: list[list[int]], c: int, params: SamplingParams, tag: str
) -> dict[str, Any]:
    """Serve every prompt with ``c`` closed-loop clients; the figures of that run."""
    n = len(prompts)
    results: list[GenerationResult | None] = [None] * n
    e2e = [0.0] * n
    t_sub = [0.0] * n
    lock = threading.Lock()
    nxt = [0]
    all_done = threading.Event()
    steps: list[StepReport] = []
    errors: list[BaseException] = []

    def launch(i: int) -> None:
        t_sub[i] = time.perf_counter()
        req = Request(tokens=prompts[i], params=params, namespace=f"{tag}-{i}")
        engine.submit(req, on_done=ender(i))

    def ender(i: int) -> Callable[[GenerationResult | None, BaseException | None], None]:
        return lambda r, e: finished(i, r, e)

    def finished(i: int, r: GenerationResult | None, e: BaseException | None) -> None:
        e2e[i] = time.perf_counter() - t_sub[i]
        if e is not None:
            errors.append(e)
        results[i] = r
        with lock:
            j = nxt[0]
            nxt[0] += 1
        if j < n:
            launch(j)
        elif all(x is not None for x in results) or errors:
            all_done.set()

    def start() -> None:
        with lock:
            first = list(range(min(c, n)))
            nxt[0] = len(first)
        for i in first:
            launch(i)

    engine.on_step = steps.append
    t0 = time.perf_counter()
    engine.call_soon(start).result()
    all_done.wait()
    wall = time.perf_counter() - t0
    engine.on_step = None
    if errors:
        raise errors[0]
    done = [r for r in results if r is not None]
    ttft = [r.ttft_s for r in done]
    tokens = sum(r.completion_tokens for r in done)
    work = [len(s.decoded) + (s.prefill is not None) for s in steps]
    engine.clear()
    return {
        "concurrency": c,
        "requests": n,
        "wall_s": round(wall, 3),
        "generated_tokens": tokens,
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_mean_s": round(statistics.fmean(ttft), 4),
        "ttft_p50_s": round(_pct(ttft, 0.5), 4),
        "ttft_p99_s": round(_pct(ttft, 0.99), 4),
        "e2e_mean_s": round(statistics.fmean(e2e), 4),
        "e2e_p50_s": round(_pct(e2e, 0.5), 4),
        "e2e_p99_s": round(_pct(e2e, 0.99), 4),
        "steps": len(steps),
        "mean_sequences_per_step": round(statistics.fmean(work), 2) if work else 0.0,
    }


def loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def run(
    levels: list[int],
    sequential: bool,
    *,
    n_requests: int,
    prompt_tokens: int,
    max_tokens: int,
    n_threads: int,
    n_slots: int,
    prefill_chunk: int,
    n_gpu_layers: int,
    model_path: str | None = None,
) -> dict[str, Any]:
    cfg = EngineConfig(
        model_path=model_path,
        n_slots=n_slots,
        slot_ctx=max(256, prompt_tokens + max_tokens + 16),
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        prefill_chunk=prefill_chunk,
    )
    out: dict[str, Any] = {
        "threads": n_threads or os.cpu_count(),
        "n_slots": n_slots,
        "n_gpu_layers": n_gpu_layers,
        "prefill_chunk": prefill_chunk,
        "max_tokens": max_tokens,
        "loadavg_before": loadavg(),
        "runs": [],
    }
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    with Engine(cfg) as engine:
        prompts = [prompt(engine, i, prompt_tokens) for i in range(n_requests)]
        out["prompt_tokens"] = round(statistics.fmean(len(p) for p in prompts), 1)
        engine.generate(tokens=prompts[0], params=params, namespace="warmup")  # graphs, caches
        engine.clear()
        modes = ["batched", "sequential"] if sequential else ["batched"]
        for c in levels:
            for mode in modes:
                engine.max_running = 1 if mode == "sequential" else engine.n_slots
                res = {"mode": mode, **run_level(engine, prompts, c, params, f"{mode}{c}")}
                out["runs"].append(res)
                print(
                    f"  c={c:<2} {mode:<10} {res['tokens_per_s']:7.1f} tok/s  "
                    f"ttft mean {res['ttft_mean_s']:6.2f} s p99 {res['ttft_p99_s']:6.2f} s  "
                    f"e2e mean {res['e2e_mean_s']:6.2f} s  load {loadavg()}",
                    file=sys.stderr,
                )
            if c == 1:  # single sequences only so far: the engine's unbatched rate
                out["prefill_s_per_token"] = engine.stats.prefill_s_per_token
    out["loadavg_after"] = loadavg()
    if sequential and 1 in levels:
        # What the simulator's server model predicts for the same runs (sim/enginecheck.py).
        from zmesh.sim.enginecheck import side_by_side

        out["simulator"] = side_by_side(out, out["prefill_s_per_token"])
        for row in out["simulator"]:
            print(
                f"  sim c={row['concurrency']:<2} {row['mode']:<10} sim/engine: "
                + "  ".join(
                    f"{k} {v['sim_over_engine']:.2f}"
                    for k, v in row.items()
                    if k not in ("mode", "concurrency")
                ),
                file=sys.stderr,
            )
    if sequential:
        ratios = {}
        for c in levels:
            b, s = (
                next(r for r in out["runs"] if r["mode"] == m and r["concurrency"] == c)
                for m in ("batched", "sequential")
            )
            ratios[str(c)] = {
                "tokens_per_s": round(b["tokens_per_s"] / s["tokens_per_s"], 3),
                "ttft_mean": round(b["ttft_mean_s"] / s["ttft_mean_s"], 3),
                "e2e_mean": round(b["e2e_mean_s"] / s["e2e_mean_s"], 3),
            }
        out["batched_over_sequential"] = ratios
    return out
