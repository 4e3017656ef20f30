"""`zmesh sim`: run the simulator once, sweep delay x skew x nodes, or the 1,000-node case.

    zmesh sim run   [--nodes 8] [--workload mmlu] [--alpha 1.0] [--delay-ms 1] [--policies ...]
    zmesh sim sweep [--nodes 4,16,64] [--delays-ms 0.1,1,10,50,200] [--alphas 0,0.5,1,1.5]
    zmesh sim scale [--nodes 1000] [--requests 1000000]
    zmesh sim plot out/sim/sweep-mmlu-cpu.json   # redraw a sweep's heatmaps

Every command is seeded and prints one line per finished run on stderr; ``--json``
prints one JSON object on stdout; results (JSON, PNG) go under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zmesh.sim.core import SIM_POLICIES, SimConfig, simulate
from zmesh.sim.costmodel import CostModel, load_cost_model
from zmesh.sim.tokens import PromptTable
from zmesh.workload import (
    WORKLOADS,
    Arrivals,
    Workload,
    make_workload,
    shared_prefix_workload,
)
from zmesh.workload.report import plot_policy_bars, ratio

BASELINES = ("random", "round_robin", "consistent_hash", "least_loaded")
DEFAULT_OUT = Path("out/sim")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _policies(text: str) -> list[str]:
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in SIM_POLICIES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown policies {bad}; known: {', '.join(SIM_POLICIES)}"
        )
    return names


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


# ---- one cell -----------------------------------------------------------------------


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
                subjects=self.subjects or None,
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
        )
        return cfg, wl, arrivals


def run_cell(cell: Cell, progress: bool = False) -> dict[str, Any]:
    cfg, wl, arrivals = cell.build()
    res = simulate(cfg, wl, arrivals, progress=_say if progress else None)
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
        _say(
            f"  [{done}/{len(cells)} {time.monotonic() - t0:6.1f}s] {c.policy:<15} "
            f"nodes {c.nodes:<4} alpha {c.alpha:<4} delay {c.delay_s * 1000:g} ms: "
            f"ttft {r['ttft_mean_s']:.3f}s p99 {r['ttft_p99_s']:.3f}s hit {r['hit_rate']:.2f} "
            f"spread {r['load_spread']:.2f} ({r['wall_s']:.1f}s)"
        )

    if jobs <= 1:
        for i, c in enumerate(cells):
            if progress_each:
                _say(f"  running {c.policy}")
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


# ---- run ------------------------------------------------------------------------------


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workload", default="mmlu", choices=WORKLOADS)
    ap.add_argument("--requests", type=int, default=4000, help="requests per run (default 4000)")
    ap.add_argument("--slots", type=int, default=4, help="KV slots per node (default 4)")
    ap.add_argument(
        "--subjects",
        type=int,
        default=0,
        help="mmlu: subjects used (0: 3 per node, at most 57)",
    )
    ap.add_argument("--groups", type=int, default=16, help="shared/chat: system prompts")
    ap.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="offered load: the fraction of the cluster that all-miss traffic would keep busy",
    )
    ap.add_argument("--concurrency", type=int, default=0, help="> 0: closed loop instead")
    ap.add_argument(
        "--arrivals",
        choices=["poisson", "bursts", "spread"],
        default=None,
        help="open-loop arrivals (default: bursts for --workload bursty, else poisson); "
        "spread: the bursts' requests evenly spaced up to the next burst",
    )
    ap.add_argument("--burst", type=float, default=8.0, help="bursts: mean requests per burst")
    ap.add_argument(
        "--sessions", type=int, default=0, help="bursty: conversations at once (0: 3 per node)"
    )
    ap.add_argument(
        "--forward-timeout-s",
        type=float,
        default=5.0,
        help="with --no-keepalive: a forward with no first token this long is served by its entry",
    )
    ap.add_argument(
        "--no-keepalive",
        dest="keepalive",
        action="store_false",
        help="model nodes before forward keep-alives (they gave a slow forward up)",
    )
    ap.add_argument(
        "--entry",
        choices=["random", "one"],
        default="random",
        help="one: every request enters at node 0 (no decisions it cannot see)",
    )
    ap.add_argument(
        "--set",
        dest="routing",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a routing setting (RoutingSettings field), e.g. --set place_slack_frac=0",
    )
    ap.add_argument("--jitter", type=float, default=0.2, help="extra delay: delay*jitter*Exp(1)")
    ap.add_argument("--loss", type=float, default=0.0, help="gossip message loss (0..1)")
    ap.add_argument("--failures", type=int, default=0, help="node crashes during the run")
    ap.add_argument(
        "--cost",
        default="cpu",
        help="cost model: cpu (measured), gpu (illustrative) or an engine-bench JSON file",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _shape(args: argparse.Namespace, nodes: int) -> dict[str, Any]:
    """The Cell fields that come from the workload options (shared by run and sweep)."""
    arrivals = args.arrivals or ("bursts" if args.workload == "bursty" else "poisson")
    return {
        "arrivals": arrivals,
        "burst": args.burst,
        "sessions": args.sessions or 3 * nodes,
        "routing": tuple(_setting(x) for x in args.routing),
        "forward_timeout_s": args.forward_timeout_s,
        "keepalive": args.keepalive,
        "entry": args.entry,
    }


def _setting(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    from zmesh.routing import RoutingSettings

    field = RoutingSettings.__dataclass_fields__.get(name.strip())
    if field is None or not value:
        raise SystemExit(f"--set {text!r}: expected NAME=VALUE with NAME a routing setting")
    kind = type(getattr(RoutingSettings(), name.strip()))
    return name.strip(), kind(value) if kind is not bool else value.lower() in ("1", "true")


def _subjects(args: argparse.Namespace, nodes: int) -> int:
    if args.workload != "mmlu":
        return 0
    return args.subjects or min(57, 3 * nodes)


def cmd_run(args: argparse.Namespace) -> int:
    cells = [
        Cell(
            policy=p,
            nodes=args.nodes,
            alpha=args.alpha,
            delay_s=args.delay_ms / 1000,
            workload=args.workload,
            requests=args.requests,
            slots=args.slots,
            load=args.load,
            cost=args.cost,
            seed=args.seed,
            subjects=_subjects(args, args.nodes),
            groups=args.groups,
            loss=args.loss,
            jitter=args.jitter,
            failures=args.failures,
            concurrency=args.concurrency,
            pending_prefixes=args.pending_prefixes,
            diagnose=True,
            **_shape(args, args.nodes),
        )
        for p in args.policies
    ]
    _say(
        f"zmesh sim run: {args.nodes} nodes, {args.workload} alpha {args.alpha}, "
        f"delay {args.delay_ms:g} ms, {args.requests} requests, policies {','.join(args.policies)}"
    )
    results = run_cells(cells, args.jobs)
    policies = {r["cell"]["policy"]: _public(r) for r in results}
    out = {"command": "sim run", "args": _jsonable(vars(args)), "policies": policies}
    out["ratios"] = _ratios(policies)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"run-{args.workload}-n{args.nodes}-a{args.alpha:g}-d{args.delay_ms:g}ms"
    if cells[0].arrivals != "poisson":
        stem += f"-{cells[0].arrivals}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(out, indent=1))
    plot_policy_bars(policies, args.out / f"{stem}.png", f"simulator: {stem}", _say)
    _print_table(policies)
    _print_diagnosis(policies)
    _say(f"zmesh sim run: wrote {path}")
    if args.json:
        print(json.dumps(out))
    return 0


def _public(r: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k != "cell"}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items() if k != "func"}


def _ratios(policies: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    z = policies.get("zmesh")
    if z is None:
        return out
    for name, f in policies.items():
        if name != "zmesh":
            out[f"zmesh_ttft_over_{name}"] = round(ratio(z["ttft_mean_s"], f["ttft_mean_s"]), 3)
    if "random" in policies:
        out["random_ttft_over_zmesh"] = round(
            ratio(policies["random"]["ttft_mean_s"], z["ttft_mean_s"]), 3
        )
    return out


def _print_table(policies: dict[str, dict[str, Any]]) -> None:
    cols = [
        ("ttft_mean_s", "ttft mean"),
        ("ttft_p50_s", "p50"),
        ("ttft_p99_s", "p99"),
        ("e2e_mean_s", "e2e mean"),
        ("hit_rate", "hit"),
        ("throughput_rps", "req/s"),
        ("forwards", "fwd"),
        ("fallbacks", "fallbk"),
        ("load_spread", "spread"),
    ]
    print(f"{'policy':<16}" + "".join(f"{h:>10}" for _, h in cols), file=sys.stderr)
    for name, f in policies.items():
        cells = "".join(
            f"{f[k]:>10.3f}" if isinstance(f[k], float) else f"{f[k]:>10}" for k, _ in cols
        )
        print(f"{name:<16}{cells}", file=sys.stderr)


def _print_diagnosis(policies: dict[str, dict[str, Any]]) -> None:
    """Per policy and routing reason: requests served away from the node whose cache
    matched them best when they arrived, the prefill that cost; and bursts that sent
    several requests to one node the load picture called idle."""
    for name, f in policies.items():
        d = f.get("diagnosis")
        if not d:
            continue
        parts = [
            f"{reason} {r['requests']} (away {r['away_from_best_match']}, "
            f"{r['prefill_lost_s']:.0f}s prefill lost, ttft {r['ttft_mean_s']:.2f}s)"
            for reason, r in d["by_reason"].items()
        ]
        _say(f"{name:<16}{'; '.join(parts)}")
        if d["idle_picks"]:
            _say(
                f"{'':<16}sent to a node that looked idle: {d['idle_picks']}, of which it "
                f"already had work: {d['idle_picks_already_busy']}; herds (one instant, "
                f">= 2 to one such node): {d['herds']} ({d['herded_requests']} requests)"
            )


# ---- sweep ----------------------------------------------------------------------------


def cmd_sweep(args: argparse.Namespace) -> int:
    cells = []
    for n in args.nodes:
        requests = args.requests or max(3000, 60 * n)
        for delay in args.delays_ms:
            for alpha in args.alphas:
                for p in args.policies:
                    cells.append(
                        Cell(
                            policy=p,
                            nodes=n,
                            alpha=alpha,
                            delay_s=delay / 1000,
                            workload=args.workload,
                            requests=requests,
                            slots=args.slots,
                            load=args.load,
                            cost=args.cost,
                            seed=args.seed,
                            subjects=_subjects(args, n),
                            groups=args.groups,
                            loss=args.loss,
                            jitter=args.jitter,
                            failures=args.failures,
                            concurrency=args.concurrency,
                            **_shape(args, n),
                        )
                    )
    _say(
        f"zmesh sim sweep: {len(cells)} runs (nodes {args.nodes} x delays {args.delays_ms} ms "
        f"x alphas {args.alphas} x {len(args.policies)} policies), {args.jobs} processes"
    )
    t0 = time.monotonic()
    results = run_cells(cells, args.jobs)
    grid = _grid(results)
    summary = _sweep_summary(grid, args.policies)
    out = {
        "command": "sim sweep",
        "args": _jsonable(vars(args)),
        "wall_s": round(time.monotonic() - t0, 1),
        "summary": summary,
        "cells": [
            {**{k: r["cell"][k] for k in ("policy", "nodes", "alpha", "delay_s")}, **_public(r)}
            for r in results
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{args.workload}-{Path(str(args.cost)).stem}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(out, indent=1))
    pngs = plot_heatmaps(grid, args, args.out / stem)
    for line in _summary_lines(summary):
        _say(line)
    _say(f"zmesh sim sweep: wrote {path}" + (f" and {len(pngs)} heatmaps" if pngs else ""))
    if args.json:
        print(json.dumps(out))
    return 0


_Key = tuple[int, float, float]  # nodes, delay_s, alpha


def _grid(results: list[dict[str, Any]]) -> dict[_Key, dict[str, dict[str, Any]]]:
    grid: dict[_Key, dict[str, dict[str, Any]]] = {}
    for r in results:
        c = r["cell"]
        grid.setdefault((c["nodes"], c["delay_s"], c["alpha"]), {})[c["policy"]] = r
    return grid


def _best_baseline(cell: dict[str, dict[str, Any]]) -> tuple[str, float]:
    have = [(cell[b]["ttft_mean_s"], b) for b in BASELINES if b in cell]
    if not have:
        return "", math.nan
    t, b = min(have)
    return b, t


def _sweep_summary(
    grid: dict[_Key, dict[str, dict[str, Any]]], policies: Sequence[str]
) -> dict[str, Any]:
    """Where zmesh stands against the best baseline, random, the paper's design, the oracle."""
    worst: tuple[float, _Key | None, str] = (0.0, None, "")
    rows = []
    for key, cell in sorted(grid.items()):
        z = cell.get("zmesh")
        if z is None:
            continue
        b, bt = _best_baseline(cell)
        row: dict[str, Any] = {"nodes": key[0], "delay_ms": key[1] * 1000, "alpha": key[2]}
        row["zmesh_over_best_baseline"] = round(ratio(z["ttft_mean_s"], bt), 3)
        row["best_baseline"] = b
        if "random" in cell:
            row["random_over_zmesh"] = round(
                ratio(cell["random"]["ttft_mean_s"], z["ttft_mean_s"]), 3
            )
            if "paper" in cell:
                row["random_over_paper"] = round(
                    ratio(cell["random"]["ttft_mean_s"], cell["paper"]["ttft_mean_s"]), 3
                )
        if "oracle" in cell:
            row["zmesh_over_oracle"] = round(
                ratio(z["ttft_mean_s"], cell["oracle"]["ttft_mean_s"]), 3
            )
            row["hit_zmesh_over_oracle"] = round(
                ratio(z["hit_rate"], cell["oracle"]["hit_rate"]), 3
            )
        rows.append(row)
        r = row["zmesh_over_best_baseline"]
        if math.isfinite(r) and r > worst[0]:
            worst = (r, key, b)
    return {
        "cells": rows,
        "max_zmesh_over_best_baseline": round(worst[0], 3),
        "at": (
            {
                "nodes": worst[1][0],
                "delay_ms": worst[1][1] * 1000,
                "alpha": worst[1][2],
                "baseline": worst[2],
            }
            if worst[1]
            else None
        ),
        "zmesh_never_worse_than_best_baseline": worst[0] <= 1.0,
        "policies": list(policies),
    }


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    lines = [
        f"zmesh / best baseline (mean TTFT), worst cell: {summary['max_zmesh_over_best_baseline']}"
        f" at {summary['at']}"
    ]
    for row in summary["cells"]:
        lines.append(
            "  "
            + ", ".join(
                f"{k} {v}" for k, v in row.items() if k not in ("best_baseline",) and v is not None
            )
        )
    return lines


def plot_heatmaps(
    grid: dict[_Key, dict[str, dict[str, Any]]], args: argparse.Namespace, stem: Path
) -> list[Path]:
    """Per node count: TTFT vs random (zmesh, paper), zmesh vs best baseline, hits vs oracle."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import TwoSlopeNorm
    except ImportError:
        _say("matplotlib is not installed: heatmaps skipped")
        return []
    # (title, value, colour map): green is good for zmesh in every panel.
    panels: list[tuple[str, Any, str]] = [
        (
            "random / zmesh (mean TTFT)",
            lambda c: ratio(c["random"]["ttft_mean_s"], c["zmesh"]["ttft_mean_s"]),
            "RdYlGn",
        ),
        (
            "random / paper design",
            lambda c: ratio(c["random"]["ttft_mean_s"], c["paper"]["ttft_mean_s"]),
            "RdYlGn",
        ),
        (
            "zmesh / best baseline",
            lambda c: ratio(c["zmesh"]["ttft_mean_s"], _best_baseline(c)[1]),
            "RdYlGn_r",
        ),
        (
            "hit rate zmesh / oracle",
            lambda c: ratio(c["zmesh"]["hit_rate"], c["oracle"]["hit_rate"]),
            "RdYlGn",
        ),
    ]
    out = []
    delays = sorted({k[1] for k in grid})
    alphas = sorted({k[2] for k in grid})
    for n in sorted({k[0] for k in grid}):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
        for ax, (title, fn, cmap) in zip(axes, panels, strict=True):
            data = []
            for a in alphas:
                row = []
                for d in delays:
                    try:
                        row.append(fn(grid[(n, d, a)]))
                    except KeyError:
                        row.append(math.nan)
                data.append(row)
            finite = [v for row in data for v in row if math.isfinite(v)] or [1.0]
            # Centred on 1 (a tie): which side of it a cell falls on is the finding.
            norm = TwoSlopeNorm(
                vmin=min(min(finite), 0.99), vcenter=1.0, vmax=max(max(finite), 1.01)
            )
            im = ax.imshow(data, origin="lower", aspect="auto", cmap=cmap, norm=norm)
            for yi, row in enumerate(data):
                for xi, v in enumerate(row):
                    if math.isfinite(v):
                        ax.text(xi, yi, f"{v:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(delays)))
            ax.set_xticklabels([f"{d * 1000:g}" for d in delays])
            ax.set_yticks(range(len(alphas)))
            ax.set_yticklabels([f"{a:g}" for a in alphas])
            ax.set_xlabel("inter-node delay (ms)")
            ax.set_ylabel("Zipf alpha (prefix skew)")
            ax.set_title(title)
            fig.colorbar(im, ax=ax, shrink=0.8)
        fig.suptitle(f"{n} nodes, {args.workload}, cost model {args.cost}, load {args.load}")
        fig.tight_layout()
        path = Path(f"{stem}-n{n}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append(path)
    return out


def cmd_plot(args: argparse.Namespace) -> int:
    """Redraw a sweep's heatmaps from its JSON file."""
    data = json.loads(Path(args.file).read_text())
    results = [{**c, "cell": c} for c in data["cells"]]
    sweep_args = argparse.Namespace(**data["args"])
    pngs = plot_heatmaps(_grid(results), sweep_args, Path(args.file).with_suffix(""))
    _say(f"zmesh sim plot: wrote {', '.join(str(p) for p in pngs)}")
    return 0


# ---- scale -----------------------------------------------------------------------------


def cmd_scale(args: argparse.Namespace) -> int:
    cells = [
        Cell(
            policy=p,
            nodes=args.nodes,
            alpha=args.alpha,
            delay_s=args.delay_ms / 1000,
            workload="shared",
            requests=args.requests,
            slots=args.slots,
            load=args.load,
            cost=args.cost,
            seed=args.seed,
            groups=args.groups or 2 * args.nodes,
            questions=args.questions,
            heartbeat_s=args.heartbeat_s,
            max_candidates=args.max_candidates,
        )
        for p in args.policies
    ]
    _say(
        f"zmesh sim scale: {args.nodes} nodes, {args.requests} requests, "
        f"{cells[0].groups} system prompts (alpha {args.alpha}), policies {','.join(args.policies)}"
    )
    t0 = time.monotonic()
    results = run_cells(cells, 1 if len(cells) == 1 else args.jobs, progress_each=True)
    policies = {r["cell"]["policy"]: _public(r) for r in results}
    out = {
        "command": "sim scale",
        "args": _jsonable(vars(args)),
        "wall_s": round(time.monotonic() - t0, 1),
        "policies": policies,
        "ratios": _ratios(policies),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-n{args.nodes}-r{args.requests}.json"
    path.write_text(json.dumps(out, indent=1))
    _print_table(policies)
    _say(f"zmesh sim scale: {out['wall_s']}s wall; wrote {path}")
    if args.json:
        print(json.dumps(out))
    return 0


# ---- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="zmesh sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="what", required=True)

    p = sub.add_parser("run", help="one configuration, every policy")
    _common(p)
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--alpha", type=float, default=1.0, help="Zipf skew of prefix popularity")
    p.add_argument("--delay-ms", type=float, default=1.0, help="one-way inter-node delay")
    p.add_argument("--policies", type=_policies, default=list(SIM_POLICIES))
    p.add_argument(
        "--pending-prefixes",
        action="store_true",
        help="proposed change: count queued / forwarded requests' prefixes as cached",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="the delay x skew x nodes study, every policy, heatmaps")
    _common(p)
    p.set_defaults(requests=0)
    p.add_argument("--nodes", type=_ints, default=[4, 16, 64], help="comma list (default 4,16,64)")
    p.add_argument("--delays-ms", type=_floats, default=[0.1, 1, 10, 50, 200], help="comma list")
    p.add_argument("--alphas", type=_floats, default=[0.0, 0.5, 1.0, 1.5], help="comma list")
    p.add_argument("--policies", type=_policies, default=list(SIM_POLICIES))
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("plot", help="redraw a sweep's heatmaps from its JSON")
    p.add_argument("file", help="sweep-*.json written by `zmesh sim sweep`")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("scale", help="the 1,000-node / 1,000,000-request case")
    _common(p)
    p.set_defaults(requests=1_000_000, slots=8)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--delay-ms", type=float, default=1.0)
    p.add_argument("--questions", type=int, default=20000, help="distinct questions drawn from")
    p.add_argument(
        "--heartbeat-s", type=float, default=1.0, help="periodic heartbeat (1,000 peers)"
    )
    p.add_argument(
        "--max-candidates",
        type=int,
        default=16,
        help="peers per zmesh decision: half longest estimated match, half random",
    )
    p.add_argument("--policies", type=_policies, default=["zmesh"])
    p.set_defaults(func=cmd_scale)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "groups", 16) == 16 and args.what == "scale":
        args.groups = 0  # scale: 2 system prompts per node unless given
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
