"""One simulation as data (`Cell`), run in worker processes; what run, sweep and scale share.

A `Cell` holds everything needed to rebuild a run in another process (workload,
arrivals, cluster, routing overrides); `run_cells` runs them (``jobs`` processes) and
prints one line per finished run. The offered load is turned into a request rate by
`rate_for_load`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmesh.sim.core import SimConfig, simulate
from zmesh.sim.costmodel import CostModel, load_cost_model
from zmesh.sim.tokens import PromptTable
from zmesh.workload import (
    Arrivals,
    Workload,
    make_workload,
    shared_prefix_workload,
)
from zmesh.workload.report import ttft_ratios


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mean_prompt_tokens(workload: Workload, block_size: int = 16, sample: int = 300) -> float:
    from zmesh.blocks import BlockHasher

    table = PromptTable(workload, BlockHasher(b"probe", "default", block_size))
    n = min(sample, len(workload.requests))
    return sum(len(table.get(i)[0]) for i in range(n)) / max(n, 1)


def rate_for_load(load: float, nodes: int, workload: Workload, cost: CostModel) -> float:
    """Requests per second that would keep ``load`` of the cluster busy if nothing hit.

    A load of 0.5 is light for a policy that hits its cache and heavy for one that
    misses: the same offered work separates them. Conversations (chained prompts,
    answers of varied length) are averaged over every request, not the first 300.
    """
    reqs = workload.requests
    if any(r.parent >= 0 for r in reqs):
        mt = sum(r.max_tokens for r in reqs) / len(reqs)
        prompt = mean_prompt_tokens(workload, sample=len(reqs))
    else:
        mt = reqs[0].max_tokens if reqs else 4
        prompt = mean_prompt_tokens(workload)
    cold = cost.service_s(int(prompt), mt)  # type: ignore[arg-type]
    return load * nodes / cold


@dataclass(frozen=True)
class Cell:
    """One simulation: everything needed to rebuild it in a worker process."""

    policy: str
    nodes: int
    alpha: float
    delay_s: float
    workload: str
    requests: int
    slots: int
    load: float
    cost: str
    seed: int
    subjects: int = 0  # mmlu: 0 = all
    subject_names: tuple[str, ...] = ()  # mmlu: these subjects (the lab's), not a draw
    groups: int = 16
    loss: float = 0.0
    jitter: float = 0.2
    failures: int = 0
    heartbeat_s: float = 0.2
    max_candidates: int = 0
    estimates: str = "auto"
    questions: int = 0
    concurrency: int = 0  # > 0: closed loop instead of Poisson
    pending_prefixes: bool = False
    arrivals: str = "poisson"  # or "bursts", "spread" (bursts spread evenly)
    burst: float = 8.0
    sessions: int = 24  # bursty: conversations going on at once
    diagnose: bool = False
    routing: tuple[tuple[str, Any], ...] = ()  # RoutingSettings overrides
    forward_timeout_s: float = 5.0
    keepalive: bool = True
    entry: str = "random"
    bandwidth_mbit: float = 1000.0  # every link's, for KV shipping (zmesh_ship)
    max_running: int = 1  # requests a node runs at once (continuous batching)

    def build(self) -> tuple[SimConfig, Workload, Arrivals]:
        cost = load_cost_model(self.cost)
        if self.workload == "shared" and self.questions:
            wl = shared_prefix_workload(
                self.requests, self.groups, self.alpha, seed=self.seed, questions=self.questions
            )
        else:
            wl = make_workload(
                self.workload,
                self.requests,
                self.alpha,
                self.seed,
                subjects=list(self.subject_names) or self.subjects or None,
                groups=self.groups,
                sessions=self.sessions,
            )
        rate = rate_for_load(self.load, self.nodes, wl, cost) if self.concurrency <= 0 else 1.0
        if self.concurrency > 0:
            arrivals = Arrivals("closed", concurrency=self.concurrency)
        elif self.arrivals in ("bursts", "spread"):
            arrivals = Arrivals(
                "bursts", rate=rate, burst=self.burst, spread=self.arrivals == "spread"
            )
        else:
            arrivals = Arrivals("poisson", rate=rate)
        cfg = SimConfig(
            nodes=self.nodes,
            policy=self.policy,
            n_slots=self.slots,
            delay_s=self.delay_s,
            jitter=self.jitter,
            loss=self.loss,
            failures=self.failures,
            heartbeat_s=self.heartbeat_s,
            suspect_after_s=max(1.0, 3 * self.heartbeat_s),
            dead_after_s=max(3.0, 9 * self.heartbeat_s),
            max_candidates=self.max_candidates,
            estimates=self.estimates,
            cost=cost,
            seed=self.seed,
            pending_prefixes=self.pending_prefixes,
            diagnose=self.diagnose,
            routing=dict(self.routing),
            forward_timeout_s=self.forward_timeout_s,
            forward_keepalive=self.keepalive,
            entry=self.entry,
            bandwidth_mbit=self.bandwidth_mbit,
            max_running=self.max_running,
        )
        return cfg, wl, arrivals


def run_cell(cell: Cell, progress: bool = False) -> dict[str, Any]:
    cfg, wl, arrivals = cell.build()
    res = simulate(cfg, wl, arrivals, progress=say if progress else None)
    out = dict(res.figures)
    out["cell"] = cell.__dict__
    out["rate_rps"] = arrivals.rate if arrivals.mode != "closed" else None
    out["cost_model"] = cfg.cost.as_dict()
    return out


def run_cells(
    cells: Sequence[Cell], jobs: int, progress_each: bool = False
) -> list[dict[str, Any]]:
    """Run cells (in ``jobs`` processes), printing one line per finished cell."""
    t0 = time.monotonic()
    results: list[dict[str, Any] | None] = [None] * len(cells)

    def line(i: int, r: dict[str, Any]) -> None:
        c = cells[i]
        done = sum(x is not None for x in results)
        say(
            f"  [{done}/{len(cells)} {time.monotonic() - t0:6.1f}s] {c.policy:<15} "
            f"nodes {c.nodes:<4} alpha {c.alpha:<4} delay {c.delay_s * 1000:g} ms: "
            f"ttft {r['ttft_mean_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s hit {r['hit_rate']:.2f} "
            f"spread {r['load_spread']:.2f} ({r['wall_s']:.1f}s)"
        )

    if jobs <= 1:
        for i, c in enumerate(cells):
            if progress_each:
                say(f"  running {c.policy}")
            results[i] = run_cell(c, progress_each)
            line(i, results[i])  # type: ignore[arg-type]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futs = {pool.submit(run_cell, c): i for i, c in enumerate(cells)}
            for fut in as_completed(futs):
                i = futs[fut]
                results[i] = fut.result()
                line(i, results[i])  # type: ignore[arg-type]
    return [r for r in results if r is not None]


def cell_shape(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    """The Cell fields that come from the workload options (shared by run and sweep)."""
    arrivals = args.arrivals or ("bursts" if args.workload == "bursty" else "poisson")
    return {
        "arrivals": arrivals,
        "burst": args.burst,
        "sessions": args.sessions or 3 * nodes,
        "routing": tuple(routing_setting(x) for x in args.routing),
        "forward_timeout_s": args.forward_timeout_s,
        "keepalive": args.keepalive,
        "entry": args.entry,
        "bandwidth_mbit": getattr(args, "bandwidth_mbit", 1000.0),
        "max_running": getattr(args, "max_running", 1),
    }


def routing_setting(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    from zmesh.routing import RoutingSettings

    field = RoutingSettings.__dataclass_fields__.get(name.strip())
    if field is None or not value:
        raise SystemExit(f"--set {text!r}: expected NAME=VALUE with NAME a routing setting")
    kind = type(getattr(RoutingSettings(), name.strip()))
    return name.strip(), kind(value) if kind is not bool else value.lower() in ("1", "true")


def subjects_for(args: argparse.Namespace, nodes: int) -> int:
    if args.workload != "mmlu":
        return 0
    return args.subjects or min(57, 3 * nodes)


def public_figures(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "cell"}


def jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "func"}


def ratios(policies: dict[str, dict[str, Any]]) -> dict[str, float]:
    return ttft_ratios(policies, tag="ttft_")


def print_table(policies: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("ttft_mean_s", "ttft mean"),
        ("ttft_p50_s", "p50"),
        ("ttft_p99_s", "p99"),
        ("e2e_mean_s", "e2e mean"),
        ("hit_rate", "hit"),
        ("throughput_rps", "req/s"),
        ("forwards", "fwd"),
        ("fallbacks", "fallbk"),
        ("refused", "refused"),
        ("load_spread", "spread"),
    ]
    print(f"{'policy':<16}" + "".join(f"{h:>10}" for _, h in cols), file=sys.stderr)
    for name, f in policies.items():
        cells = "".join(
            f"{f.get(k, 0):>10.3f}" if isinstance(f.get(k), float) else f"{f.get(k, 0):>10}"
            for k, _ in cols
        )
        print(f"{name:<16}{cells}", file=sys.stderr)
