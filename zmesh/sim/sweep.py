"""`zmesh sim sweep`: the delay x skew x nodes study, its summary and heatmaps (and `plot`).

Every policy on every (nodes, delay, alpha) cell; the summary says where zmesh
stands against the best baseline, random, the paper's design and the oracle.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmesh.sim.cells import Cell, cell_shape, jsonable, public_figures, run_cells, say, subjects_for
from zmesh.workload.report import ratio

BASELINES = ("random", "round_robin", "consistent_hash", "least_loaded")


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
                            subjects=subjects_for(args, n),
                            groups=args.groups,
                            loss=args.loss,
                            jitter=args.jitter,
                            failures=args.failures,
                            concurrency=args.concurrency,
                            **cell_shape(args, n),
                        )
                    )
    say(
        f"zmesh sim sweep: {len(cells)} runs (nodes {args.nodes} x delays {args.delays_ms} ms "
        f"x alphas {args.alphas} x {len(args.policies)} policies), {args.jobs} processes"
    )
    t0 = time.monotonic()
    results = run_cells(cells, args.jobs)
    grid = _grid(results)
    summary = _sweep_summary(grid, args.policies)
    out = {
        "command": "sim sweep",
        "args": jsonable(vars(args)),
        "wall_s": round(time.monotonic() - t0, 1),
        "summary": summary,
        "cells": [
            {
                **{k: r["cell"][k] for k in ("policy", "nodes", "alpha", "delay_s")},
                **public_figures(r),
            }
            for r in results
        ],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"sweep-{args.workload}-{Path(str(args.cost)).stem}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(out, indent=1))
    pngs = plot_heatmaps(grid, args, args.out / stem)
    for line in _summary_lines(summary):
        say(line)
    say(f"zmesh sim sweep: wrote {path}" + (f" and {len(pngs)} heatmaps" if pngs else ""))
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
        say("matplotlib is not installed: heatmaps skipped")
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
    say(f"zmesh sim plot: wrote {', '.join(str(p) for p in pngs)}")
    return 0
