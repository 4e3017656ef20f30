"""Real-cluster benchmark: one workload against a local lab of N real nodes, per policy.

For each policy a fresh lab starts (so every policy begins with empty caches), the
same requests go to the same entry nodes in the same order, and the lab stops.
Each node's slot budget is small: the workload's prefixes fit in the cluster's slots
but not in one node's. Prompts are tokenized here (the model's own tokenizer,
vocabulary only) and sent as token ids, so every policy serves identical tokens.

Policies: the node policies (`zmesh`, `random`, `round_robin`, `consistent_hash`,
`least_loaded`: the lab runs with that policy), `zmesh_ship` (zmesh with KV shipping
on: a node may pull a busy peer's cached prefix), and `oracle`: a client-side router
with exact, instant knowledge of every node. It mirrors each node's slots by
replaying, in order, every request it sent there through the engine's slot policy
(`zmesh.sim.cache.SlotCache`), so it knows the cache each request will find; it
knows every queue because it is the only sender; it sends each request straight to
its choice with ``hops`` at the limit, so that node serves it locally. It decides
with `zmesh.oracle` (the simulator's oracle too) on those exact figures
(`zmesh.bench.mirror`).

This module runs the policies; `vocab` tokenizes, `sender` is the client, `mirror`
the oracle's mirror of the nodes, `figures` the figures per policy.

    zmesh bench cluster --quick                  # 3 nodes, 6 subjects, ~3 minutes
    zmesh bench cluster --requests 150 --json    # the measured run of docs/evaluation.md
    zmesh bench cluster --workload bursty --arrivals bursts --rate 0.4 --burst 4 \
        --scale 0.25 --sessions 6 --slot-ctx 2048 --requests 40   # conversations in bursts

Writes ``<out>/cluster-<stamp>.json`` (figures per policy and every request) and
PNG plots; ``--json`` prints one JSON object whose ``policies`` maps each policy to
its figures (``ttft_mean_s``, ``ttft_p99_s``, ``hit_rate``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zmesh import protocol as P
from zmesh.bench.figures import (
    ORACLE,
    ZMESH_SHIP,
    figures,
    loadavg,
    machine,
    ratios,
    say,
    steady,
)
from zmesh.bench.mirror import Oracle
from zmesh.bench.sender import Record, Sender
from zmesh.bench.vocab import Tokenizer, fitting_subjects, tokenize_workload
from zmesh.lab import Lab
from zmesh.workload import (
    WORKLOADS,
    Arrivals,
    Workload,
    make_workload,
    poisson_arrivals,
)
from zmesh.workload.report import plot_policy_bars, plot_ttft_cdf

POLICIES = (
    "zmesh",
    ZMESH_SHIP,
    "random",
    "round_robin",
    "consistent_hash",
    "least_loaded",
    ORACLE,
)
DEFAULT_OUT = Path("out/bench")


@dataclass
class Plan:
    workload: Workload
    tokens: list[list[int]]
    entries: list[int]  # entry node index per request: the same for every policy
    arrivals: Arrivals
    starts: list[float]  # poisson: start time of each stream
    due: list[float] = field(default_factory=list)  # bursts: due time of each request


async def drive(plan: Plan, one: Callable[[int], Awaitable[None]], t0: float) -> None:
    """Issue the plan's requests through ``one(index)``: a closed loop of
    ``concurrency`` workers over the streams, or each stream at its Poisson start
    (``t0``: the run's perf_counter origin), or in bursts when each is due. Chat
    turns of one stream run in order."""

    async def stream(indices: list[int]) -> None:
        for k, i in enumerate(indices):
            if k and plan.arrivals.think_s:
                await asyncio.sleep(plan.arrivals.think_s)
            if plan.due:  # bursts: not before the request is due
                await asyncio.sleep(max(plan.due[i] - (time.perf_counter() - t0), 0.0))
            await one(i)

    streams = plan.workload.streams()
    if plan.arrivals.mode == "closed":
        queue: asyncio.Queue[list[int]] = asyncio.Queue()
        for s in streams:
            queue.put_nowait(s)

        async def worker() -> None:
            while not queue.empty():
                await stream(queue.get_nowait())

        await asyncio.gather(*(worker() for _ in range(plan.arrivals.concurrency)))
    else:

        async def timed(s: list[int], at: float) -> None:
            await asyncio.sleep(max(at - (time.perf_counter() - t0), 0.0))
            await stream(s)

        starts = plan.starts or [plan.due[s[0]] for s in streams]
        await asyncio.gather(*(timed(s, starts[k]) for k, s in enumerate(streams)))


async def run_policy(
    policy: str, plan: Plan, lab: Lab, progress: bool = True
) -> tuple[list[Record], float, list[P.Status]]:
    names = [n.name for n in lab.nodes]
    endpoints = lab.endpoints
    wl = plan.workload
    records = [Record(r.index, policy, names[plan.entries[r.index]]) for r in wl.requests]
    n_slots = lab.engine.get("n_slots", 8)
    oracle = (
        Oracle(
            names,
            n_slots,
            max(r.max_tokens for r in wl.requests),
            # The nodes batch: every slot runs (max_running 0), unless the lab says less.
            places=min(lab.engine.get("max_running", 0) or n_slots, n_slots),
        )
        if policy == ORACLE
        else None
    )
    max_hops = lab.routing.get("max_hops", 1)
    sender = Sender(endpoints)
    await asyncio.sleep(0.3)  # let the DEALERs connect
    t0 = time.perf_counter()
    done_count = 0
    total = len(wl.requests)
    step = max(total // 10, 1)

    async def one(i: int) -> None:
        nonlocal done_count
        r = wl.requests[i]
        rec = records[i]
        if oracle is not None:
            rid_hint = f"o{i}"
            target, rec.predicted_cached = oracle.choose(
                rid_hint, plan.tokens[i], time.perf_counter() - t0, r.max_tokens
            )
            rec.entry = target
            ep = endpoints[names.index(target)]
            done = await sender.generate(ep, plan.tokens[i], r.max_tokens, max_hops, rec, t0)
            oracle.finished(target, rid_hint, done, time.perf_counter() - t0)
        else:
            ep = endpoints[plan.entries[i]]
            done = await sender.generate(ep, plan.tokens[i], r.max_tokens, 0, rec, t0)
        if done is not None:
            rec.served_by = done.served_by
            rec.route_reason = done.route_reason
            rec.hops = done.hops if oracle is None else 0
            rec.prompt_tokens = done.prompt_tokens
            rec.cached_tokens = done.cached_tokens
            rec.shipped_tokens = done.shipped_tokens
            rec.completion_tokens = done.completion_tokens
            rec.server_ttft_s = done.ttft_s
            rec.queue_s = done.queue_s
        done_count += 1
        if progress and (done_count % step == 0 or done_count == total):
            ok = [x.ttft_s for x in records if not math.isnan(x.ttft_s)]
            say(
                f"    {policy}: {done_count}/{total} done, "
                f"mean ttft so far {statistics.fmean(ok) if ok else math.nan:.3f}s, "
                f"{time.perf_counter() - t0:.0f}s"
            )

    try:
        await drive(plan, one, t0)
        wall = time.perf_counter() - t0
        statuses = await lab.statuses(timeout=5.0)
    finally:
        await sender.close()
    return records, wall, statuses


def build_plan(args: argparse.Namespace, tok: Tokenizer) -> Plan:
    max_prompt = args.slot_ctx - args.max_tokens - 2
    subjects: list[str] | int | None = None
    if args.workload == "mmlu":
        fitting = fitting_subjects(tok, max_prompt, args.max_prefix_tokens, args.mmlu_dir)
        rng = random.Random(args.seed)
        rng.shuffle(fitting)
        subjects = sorted(fitting[: args.subjects])
        if len(subjects) < args.subjects:
            raise SystemExit(f"only {len(subjects)} MMLU subjects fit {max_prompt} tokens")
    wl = make_workload(
        args.workload,
        args.requests,
        args.alpha,
        args.seed,
        args.max_tokens,
        subjects=subjects,
        groups=args.groups,
        mmlu_path=args.mmlu_dir,
        sessions=args.sessions,
        scale=args.scale,
    )
    tokens = tokenize_workload(wl, tok)
    too_long = [i for i, t in enumerate(tokens) if len(t) > max_prompt]
    if too_long:
        raise SystemExit(f"{len(too_long)} prompts exceed {max_prompt} tokens; raise --slot-ctx")
    rng = random.Random(args.seed ^ 0xE47)
    entries = [rng.randrange(args.nodes) for _ in wl.requests]
    due: list[float] = []
    if args.arrivals in ("bursts", "spread"):
        if args.rate <= 0:
            raise SystemExit("--arrivals bursts needs --rate (requests per second)")
        arrivals = Arrivals(
            "bursts", rate=args.rate, burst=args.burst, spread=args.arrivals == "spread"
        )
        starts, due = [], arrivals.due(len(wl), args.seed)
    elif args.rate > 0:
        arrivals = Arrivals("poisson", rate=args.rate)
        starts = poisson_arrivals(len(wl.streams()), args.rate, args.seed)
    else:
        arrivals = Arrivals("closed", concurrency=args.concurrency)
        starts = []
    return Plan(wl, tokens, entries, arrivals, starts, due)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with Tokenizer() as tok:
        plan = build_plan(args, tok)
    wl = plan.workload
    n_prompt = statistics.fmean(len(t) for t in plan.tokens)
    say(
        f"zmesh bench cluster: {args.nodes} nodes x {args.slots} slots, {wl.name} "
        f"alpha {args.alpha}, {len(wl)} requests ({len(wl.group_counts())} prefix groups, "
        f"mean prompt {n_prompt:.0f} tokens), {plan.arrivals.describe()}, "
        f"policies {','.join(args.policies)}"
    )
    say(f"  requests per group: {dict(sorted(wl.group_counts().items(), key=lambda kv: -kv[1]))}")
    results: dict[str, Any] = {}
    all_records: dict[str, list[Record]] = {p: [] for p in args.policies}
    walls: dict[str, float] = dict.fromkeys(args.policies, 0.0)
    loads: dict[str, list[float]] = {p: [] for p in args.policies}
    statuses_by: dict[str, list[P.Status]] = {p: [] for p in args.policies}
    run_dir = args.out / "labs"
    for rnd in range(args.repeats):
        # Later rounds rotate the order, so a noisy neighbour does not always hit one policy.
        order = (
            args.policies[rnd % len(args.policies) :] + args.policies[: rnd % len(args.policies)]
        )
        for policy in order:
            tag = policy if args.repeats == 1 else f"{policy} round {rnd + 1}/{args.repeats}"
            lab = Lab(
                n_nodes=args.nodes,
                policy="zmesh" if policy in (ORACLE, ZMESH_SHIP) else policy,
                routing={"ship": True} if policy == ZMESH_SHIP else {},
                engine={
                    "n_slots": args.slots,
                    "slot_ctx": args.slot_ctx,
                    "n_threads": args.threads,
                },
                workdir=run_dir / f"{policy}-{rnd + 1}",
            )
            say(f"  [{tag}] starting {args.nodes} nodes (logs in {lab.workdir})")
            lab.start()
            try:
                t = await lab.wait_converged(timeout=180)
                say(f"  [{tag}] converged in {t:.1f}s; sending {len(wl)} requests")
                records, wall, statuses = await run_policy(policy, plan, lab, progress=True)
            finally:
                lab.stop()
            loads[policy].append(loadavg())
            all_records[policy].extend(records)
            walls[policy] += wall
            statuses_by[policy].extend(statuses)
            f = figures(records, wall, [n.name for n in lab.nodes], statuses)
            say(
                f"  [{tag}] ttft mean {f['ttft_mean_s']:.3f}s p99 {f['ttft_p99_s']:.3f}s, "
                f"hit {f['hit_rate']:.3f}, spread {f['load_spread']:.2f}, "
                f"forwards {f['forwards']}, fallbacks {f['fallbacks']}, errors {f['errors']}, "
                f"{wall:.1f}s, load average {loads[policy][-1]:.2f}"
            )
    names = [n.name for n in lab.nodes]
    ttfts: dict[str, list[float]] = {}
    for policy in args.policies:
        recs = all_records[policy]
        f = figures(recs, walls[policy], names, statuses_by[policy])
        f["steady"] = steady(recs, args.warmup)
        f["load_average"] = [round(x, 2) for x in loads[policy]]
        results[policy] = f
        ttfts[policy] = [r.ttft_s for r in recs if not r.error]
    return {
        "command": "bench cluster",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "workload": wl.params | {"name": wl.name},
        "arrivals": asdict(plan.arrivals),
        "machine": machine(),
        "policies": results,
        "ratios": ratios(results),
        "records": {p: [asdict(r) for r in recs] for p, recs in all_records.items()},
        "_ttfts": ttfts,
    }


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="zmesh bench cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="small run: 6 subjects, 36 requests")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--slots", type=int, default=3, help="KV slots per node (default 3)")
    ap.add_argument("--slot-ctx", type=int, default=1024, help="tokens per slot (default 1024)")
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads per node")
    ap.add_argument("--workload", default="mmlu", choices=WORKLOADS)
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf skew of prefix popularity")
    ap.add_argument("--requests", type=int, default=150)
    ap.add_argument("--subjects", type=int, default=8, help="mmlu: subjects used (default 8)")
    ap.add_argument(
        "--max-prefix-tokens",
        type=int,
        default=640,
        help="mmlu: only subjects whose 5-shot prefix is at most this long",
    )
    ap.add_argument("--groups", type=int, default=8, help="shared/chat: system prompts")
    ap.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    ap.add_argument("--concurrency", type=int, default=3, help="closed loop: requests in flight")
    ap.add_argument("--rate", type=float, default=0.0, help="> 0: Poisson arrivals (req/s)")
    ap.add_argument(
        "--arrivals",
        choices=["closed", "bursts", "spread"],
        default="closed",
        help="closed (or Poisson with --rate); bursts (with --rate): requests due in groups "
        "at one instant; spread: the same, evenly spaced",
    )
    ap.add_argument("--burst", type=float, default=8.0, help="bursts: mean requests per burst")
    ap.add_argument("--sessions", type=int, default=6, help="bursty: conversations at once")
    ap.add_argument(
        "--scale", type=float, default=1.0, help="bursty: length scale (fit --slot-ctx)"
    )
    ap.add_argument(
        "--warmup", type=int, default=0, help="also report figures without the first N requests"
    )
    ap.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help=f"comma list (default {','.join(POLICIES)})",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="rounds over all policies, order rotated"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mmlu-dir", default=None, help="a full MMLU copy (default: shipped subset)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    ap.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.quick:
        defaults = ap.parse_args([])
        for key, value in (("requests", 36), ("subjects", 6), ("max_prefix_tokens", 420)):
            if getattr(args, key) == getattr(defaults, key):
                setattr(args, key, value)
        if args.warmup == 0:
            args.warmup = 6
    args.policies = [p.strip() for p in str(args.policies).split(",") if p.strip()]
    bad = [p for p in args.policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; known: {', '.join(POLICIES)}")
    t0 = time.monotonic()
    out = asyncio.run(bench(args))
    ttfts = out.pop("_ttfts")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"cluster-{out['workload']['name']}-a{args.alpha:g}-" + time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(out, indent=1))
    title = (
        f"{args.nodes} real nodes x {args.slots} slots, {out['workload']['name']} "
        f"alpha {args.alpha:g}, {args.requests} requests"
    )
    plot_policy_bars(out["policies"], args.out / f"{stem}.png", title, say)
    plot_ttft_cdf(ttfts, args.out / f"{stem}-ttft-cdf.png", title)
    say(f"zmesh bench cluster: done in {time.monotonic() - t0:.0f}s; wrote {path} (+ PNG plots)")
    say(f"  ratios (mean TTFT): {out['ratios']}")
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "records"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
