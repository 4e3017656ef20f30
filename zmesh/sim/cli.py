"""`zmesh sim`: run the simulator once, sweep delay x skew x nodes, KV shipping's sweep
(bandwidth x delay x skew), or the 1,000-node case.

    zmesh sim run   [--nodes 8] [--workload mmlu] [--alpha 1.0] [--delay-ms 1] [--policies ...]
    zmesh sim sweep [--nodes 4,16,64] [--delays-ms 0.1,1,10,50,200] [--alphas 0,0.5,1,1.5]
    zmesh sim ship  [--bandwidths-mbit 100,1000,10000] [--delays-ms 1,10,50] [--alphas ...]
    zmesh sim scale [--nodes 1000] [--requests 1000000]
    zmesh sim plot out/sim/sweep-mmlu-cpu.json   # redraw a sweep's heatmaps

Every command is seeded and prints one line per finished run on stderr; ``--json``
prints one JSON object on stdout; results (JSON, PNG) go under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmesh.sim.cells import (
    Cell,
    cell_shape,
    jsonable,
    print_table,
    public_figures,
    ratios,
    run_cells,
    say,
    subjects_for,
)
from zmesh.sim.core import SIM_POLICIES
from zmesh.sim.shipsweep import add_ship_parser
from zmesh.sim.sweep import cmd_plot, cmd_sweep
from zmesh.workload import (
    WORKLOADS,
)
from zmesh.workload.report import plot_policy_bars

DEFAULT_OUT = Path("out/sim")


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


def _common(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--workload", default="mmlu", choices=WORKLOADS)
    ap.add_argument(
        "--requests",
        type=int,
        default=4000,
        help="requests per run (run 4000, sweep max(3000, 60 x nodes), ship 2000, scale 1e6)",
    )
    ap.add_argument("--slots", type=int, default=4, help="KV slots per node (default 4)")
    ap.add_argument(
        "--subjects",
        type=int,
        default=0,
        help="mmlu: subjects used (0: 3 per node, at most 57)",
    )
    ap.add_argument(
        "--subject-names",
        default="",
        help="mmlu: comma list of subjects to use (e.g. the cluster bench's), not a seeded draw",
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
    ap.add_argument(
        "--bandwidth-mbit",
        type=float,
        default=1000.0,
        help="every link's bandwidth for KV shipping (policy zmesh_ship), Mbit/s (default 1000)",
    )
    ap.add_argument(
        "--max-running",
        type=int,
        default=1,
        help="requests a node runs at once (continuous batching, each at the cost model's "
        "batched rate; a real node runs its n_slots); default 1: one at a time",
    )
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
            subjects=subjects_for(args, args.nodes),
            subject_names=tuple(x for x in args.subject_names.split(",") if x),
            groups=args.groups,
            loss=args.loss,
            jitter=args.jitter,
            failures=args.failures,
            concurrency=args.concurrency,
            pending_prefixes=args.pending_prefixes,
            diagnose=True,
            **cell_shape(args, args.nodes),
        )
        for p in args.policies
    ]
    say(
        f"zmesh sim run: {args.nodes} nodes, {args.workload} alpha {args.alpha}, "
        f"delay {args.delay_ms:g} ms, {args.requests} requests, policies {','.join(args.policies)}"
    )
    results = run_cells(cells, args.jobs)
    policies = {r["cell"]["policy"]: public_figures(r) for r in results}
    out = {"command": "sim run", "args": jsonable(vars(args)), "policies": policies}
    out["ratios"] = ratios(policies)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"run-{args.workload}-n{args.nodes}-a{args.alpha:g}-d{args.delay_ms:g}ms"
    if cells[0].arrivals != "poisson":
        stem += f"-{cells[0].arrivals}"
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(out, indent=1))
    plot_policy_bars(policies, args.out / f"{stem}.png", f"simulator: {stem}", say)
    print_table(policies)
    _print_diagnosis(policies)
    say(f"zmesh sim run: wrote {path}")
    if args.json:
        print(json.dumps(out))
    return 0


def _print_diagnosis(policies: dict[str, dict[str, Any]]) -> None:
    """Per policy and routing reason: requests served away from the node whose cache
    matched them best when they arrived, the prefill that cost; and bursts that sent
    several requests to one node the load picture called idle."""
    for name, f in policies.items():
        if "ship_pulls" in f:
            say(
                f"{name:<16}KV pulls {f['ship_pulls']} (imported {f['ship_imported']}, "
                f"nothing usable {f['ship_failed']}), {f['shipped_tokens']} tokens, "
                f"{f['shipped_bytes_per_request'] / 1e3:.1f} KB per request"
            )
        if "push_offers" in f:
            say(
                f"{name:<16}holder push: decisions on a hot prefix {f['push_decided']}, "
                f"offers {f['push_offers']} (accepted {f['push_accepted']}, refused "
                f"{f['push_refused']}), imported {f['push_imported']}, "
                f"{f['pushed_tokens']} tokens"
            )
        d = f.get("diagnosis")
        if not d:
            continue
        parts = [
            f"{reason} {r['requests']} (away {r['away_from_best_match']}, "
            f"{r['prefill_lost_s']:.0f}s prefill lost, ttft {r['ttft_mean_s']:.2f}s)"
            for reason, r in d["by_reason"].items()
        ]
        say(f"{name:<16}{'; '.join(parts)}")
        if d["idle_picks"]:
            say(
                f"{'':<16}sent to a node that looked idle: {d['idle_picks']}, of which it "
                f"already had work: {d['idle_picks_already_busy']}; herds (one instant, "
                f">= 2 to one such node): {d['herds']} ({d['herded_requests']} requests); "
                f"forwards queued behind their instant's requests from other entries: "
                f"{d.get('herd_queued', 0)}"
            )


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
    say(
        f"zmesh sim scale: {args.nodes} nodes, {args.requests} requests, "
        f"{cells[0].groups} system prompts (alpha {args.alpha}), policies {','.join(args.policies)}"
    )
    t0 = time.monotonic()
    results = run_cells(cells, 1 if len(cells) == 1 else args.jobs, progress_each=True)
    policies = {r["cell"]["policy"]: public_figures(r) for r in results}
    out = {
        "command": "sim scale",
        "args": jsonable(vars(args)),
        "wall_s": round(time.monotonic() - t0, 1),
        "policies": policies,
        "ratios": ratios(policies),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"scale-n{args.nodes}-r{args.requests}.json"
    path.write_text(json.dumps(out, indent=1))
    print_table(policies)
    say(f"zmesh sim scale: {out['wall_s']}s wall; wrote {path}")
    if args.json:
        print(json.dumps(out))
    return 0


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

    add_ship_parser(sub, _common, _floats, _ints)

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
