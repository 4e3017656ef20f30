"""`zmesh sim ship`: where KV shipping pays, bandwidth x delay x skew, per workload.

For every (workload, delay, alpha) the routing-only policies (``random``, ``zmesh``,
``oracle``: none moves KV, so bandwidth does not change them) run once, and
``zmesh_ship`` once per bandwidth. One row per (workload, alpha, delay, bandwidth):
mean TTFT of zmesh, zmesh_ship and the oracle, zmesh_ship / zmesh, how often a pull
was chosen (per request) and the bytes shipped per request, random / zmesh_ship. The
summary checks what issue 14 asks: zmesh_ship never worse than zmesh by more than
5 %, shipping rare and harmless on the slowest, farthest link, and on mmlu random /
zmesh_ship against 3 and zmesh_ship against the routing-only oracle.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from zmesh.sim.cells import Cell, cell_shape, jsonable, run_cells, say, subjects_for
from zmesh.sim.config import ZMESH_SHIP
from zmesh.workload import WORKLOADS
from zmesh.workload.report import ratio

BASE = ("random", "zmesh", "oracle")  # routing only: bandwidth does not change them
WORSE_BY = 1.05  # the bound: never worse than routing-only by more than 5 %


def add_ship_parser(
    sub: Any,
    common: Callable[[argparse.ArgumentParser], None],
    floats: Callable[[str], list[float]],
    ints: Callable[[str], list[int]],
) -> None:
    p = sub.add_parser(
        "ship", help="KV shipping: bandwidth x delay x skew, zmesh vs zmesh_ship vs oracle"
    )
    common(p)
    p.set_defaults(requests=2000)
    p.add_argument(
        "--workloads",
        type=lambda t: [w for w in t.split(",") if w],
        default=["mmlu", "shared"],
        help=f"comma list of {', '.join(WORKLOADS)} (default mmlu,shared: the hotspot); "
        "replaces --workload",
    )
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument(
        "--bandwidths-mbit",
        type=floats,
        default=[100, 1000, 10000],
        help="comma list, Mbit/s, for zmesh_ship (replaces --bandwidth-mbit)",
    )
    p.add_argument("--delays-ms", type=floats, default=[1, 10, 50], help="comma list")
    p.add_argument("--alphas", type=floats, default=[0.5, 1.0, 1.5], help="comma list")
    p.set_defaults(func=cmd_ship)


def cmd_ship(args: argparse.Namespace) -> int:
    bad = [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown workloads {bad}; known: {', '.join(WORKLOADS)}")
    cells: list[Cell] = []
    for wl in args.workloads:
        args.workload = wl
        for delay in args.delays_ms:
            for alpha in args.alphas:
                common = {
                    "nodes": args.nodes,
                    "alpha": alpha,
                    "delay_s": delay / 1000,
                    "workload": wl,
                    "requests": args.requests,
                    "slots": args.slots,
                    "load": args.load,
                    "cost": args.cost,
                    "seed": args.seed,
                    "subjects": subjects_for(args, args.nodes),
                    "groups": args.groups,
                    "jitter": args.jitter,
                    "loss": args.loss,
                    "failures": args.failures,
                    "concurrency": args.concurrency,
                    **cell_shape(args, args.nodes),
                }
                cells += [Cell(policy=p, **common) for p in BASE]
                for bw in args.bandwidths_mbit:
                    common["bandwidth_mbit"] = bw
                    cells.append(Cell(policy=ZMESH_SHIP, **common))
    say(
        f"zmesh sim ship: {len(cells)} runs ({args.workloads} x delays {args.delays_ms} ms x "
        f"alphas {args.alphas}; zmesh_ship x bandwidths {args.bandwidths_mbit} Mbit/s), "
        f"{args.nodes} nodes, {args.requests} requests each, {args.jobs} processes"
    )
    t0 = time.monotonic()
    results = run_cells(cells, args.jobs)
    rows = ship_rows(results)
    summary = ship_summary(rows)
    out = {
        "command": "sim ship",
        "args": jsonable(vars(args)),
        "wall_s": round(time.monotonic() - t0, 1),
        "rows": rows,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ship-n{args.nodes}.json"
    path.write_text(json.dumps(out, indent=1))
    for line in table_lines(rows) + summary_lines(summary):
        say(line)
    say(f"zmesh sim ship: {out['wall_s']}s wall; wrote {path}")
    if args.json:
        print(json.dumps(out))
    return 0


def ship_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (workload, alpha, delay, bandwidth) from the runs' figures."""
    base: dict[tuple[str, float, float], dict[str, dict[str, Any]]] = {}
    ships: list[dict[str, Any]] = []
    for r in results:
        c = r["cell"]
        key = (c["workload"], c["alpha"], c["delay_s"])
        if c["policy"] == ZMESH_SHIP:
            ships.append(r)
        else:
            base.setdefault(key, {})[c["policy"]] = r
    rows = []
    for r in ships:
        c = r["cell"]
        b = base.get((c["workload"], c["alpha"], c["delay_s"]), {})
        z, o, rnd = (b.get(p, {}).get("ttft_mean_s", float("nan")) for p in BASE[1:] + BASE[:1])
        ship = r["ttft_mean_s"]
        n = max(r["requests"] + r["errors"], 1)
        rows.append(
            {
                "workload": c["workload"],
                "alpha": c["alpha"],
                "delay_ms": round(c["delay_s"] * 1000, 3),
                "bandwidth_mbit": c["bandwidth_mbit"],
                "zmesh_ttft_s": z,
                "ship_ttft_s": ship,
                "oracle_ttft_s": o,
                "random_ttft_s": rnd,
                "ship_over_zmesh": round(ratio(ship, z), 3),
                "ship_over_oracle": round(ratio(ship, o), 3),
                "random_over_ship": round(ratio(rnd, ship), 3),
                "pulls_per_request": round(r.get("ship_pulls", 0) / n, 4),
                "imported": r.get("ship_imported", 0),
                "failed": r.get("ship_failed", 0),
                "mb_per_request": round(r.get("shipped_bytes_per_request", 0.0) / 1e6, 3),
                "ship_hit_rate": r["hit_rate"],
                "zmesh_hit_rate": b.get("zmesh", {}).get("hit_rate", float("nan")),
            }
        )
    rows.sort(key=lambda x: (x["workload"], x["alpha"], x["delay_ms"], x["bandwidth_mbit"]))
    return rows


def ship_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    if not rows:
        return {}
    worst = max(rows, key=lambda x: x["ship_over_zmesh"])
    slow_bw = min(x["bandwidth_mbit"] for x in rows)
    far = max(x["delay_ms"] for x in rows)
    slow = [x for x in rows if x["bandwidth_mbit"] == slow_bw and x["delay_ms"] == far]
    mmlu = [x for x in rows if x["workload"] == "mmlu"]
    out: dict[str, Any] = {
        "max_ship_over_zmesh": worst["ship_over_zmesh"],
        "at": {k: worst[k] for k in ("workload", "alpha", "delay_ms", "bandwidth_mbit")},
        "cells_worse_than_5pct": sum(x["ship_over_zmesh"] > WORSE_BY for x in rows),
        "slow_link": {
            "bandwidth_mbit": slow_bw,
            "delay_ms": far,
            "max_pulls_per_request": max((x["pulls_per_request"] for x in slow), default=0.0),
            "max_ship_over_zmesh": max((x["ship_over_zmesh"] for x in slow), default=0.0),
        },
    }
    if mmlu:
        best = max(mmlu, key=lambda x: x["random_over_ship"])
        out["mmlu_best_random_over_ship"] = best["random_over_ship"]
        out["mmlu_best_at"] = {k: best[k] for k in ("alpha", "delay_ms", "bandwidth_mbit")}
        out["mmlu_cells_ship_below_oracle"] = sum(x["ship_over_oracle"] < 1.0 for x in mmlu)
        out["mmlu_cells"] = len(mmlu)
    return out


def table_lines(rows: list[dict[str, Any]]) -> list[str]:
    head = (
        f"{'workload':<8}{'alpha':>6}{'delay':>7}{'Mbit/s':>8}{'zmesh':>8}{'ship':>8}"
        f"{'oracle':>8}{'ship/z':>8}{'pulls/req':>10}{'MB/req':>8}{'rnd/ship':>9}"
    )
    lines = [head]
    for x in rows:
        lines.append(
            f"{x['workload']:<8}{x['alpha']:>6g}{x['delay_ms']:>7g}{x['bandwidth_mbit']:>8g}"
            f"{x['zmesh_ttft_s']:>8.3f}{x['ship_ttft_s']:>8.3f}{x['oracle_ttft_s']:>8.3f}"
            f"{x['ship_over_zmesh']:>8.3f}{x['pulls_per_request']:>10.3f}"
            f"{x['mb_per_request']:>8.2f}{x['random_over_ship']:>9.2f}"
        )
    return lines


def summary_lines(s: dict[str, Any]) -> list[str]:
    if not s:
        return []
    lines = [
        f"zmesh_ship / zmesh, worst cell: {s['max_ship_over_zmesh']} at {s['at']}; "
        f"cells worse by more than 5 %: {s['cells_worse_than_5pct']}",
        f"slowest, farthest link ({s['slow_link']['bandwidth_mbit']:g} Mbit/s, "
        f"{s['slow_link']['delay_ms']:g} ms): pulls per request at most "
        f"{s['slow_link']['max_pulls_per_request']}, zmesh_ship / zmesh at most "
        f"{s['slow_link']['max_ship_over_zmesh']}",
    ]
    if "mmlu_best_random_over_ship" in s:
        lines.append(
            f"mmlu: random / zmesh_ship at best {s['mmlu_best_random_over_ship']} at "
            f"{s['mmlu_best_at']}; zmesh_ship below the oracle in "
            f"{s['mmlu_cells_ship_below_oracle']} of {s['mmlu_cells']} cells"
        )
    return lines
