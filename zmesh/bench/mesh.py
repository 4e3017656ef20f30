"""Mesh figures on a real local lab: convergence time and forwarding overhead per hop.

- startup convergence: from starting N node processes (model load included) until
  every node's estimate of every peer equals that peer's own (epoch, seq, blocks);
- update convergence: from a request changing one node's cache until every peer's
  estimate matches again (gossip delta latency);
- forwarding overhead: the same cached prompt sent to the node holding it directly
  (hops 0) and through another node that forwards it (hops 1), interleaved; the
  paired latency difference is what one hop costs on loopback (`hop_overhead_*`),
  and the same difference with each latency less its engine compute (`prefill_s`
  in the reply: the slot's prefill and first token) is the hop without the engine's
  noise (`hop_net_*`);
  split into the holder's part (`hop_holder_*`: the paired difference of the
  holder's own time to the token, the Done's ttft_s, less prefill_s) and the rest
  (`hop_outside_*`: the forwarder, both wires and the client's wake-ups);
- with `--background k`, the same while k answers stream from the holder all along
  (its engine thread busy between decodes: where the GIL switch interval matters);
- decode tokens/s of answers streamed from the holder (`--stream-tokens`), to show
  that the node's [runtime] settings cost no throughput;
- with `--null`, each pair also sends the prompt's third variant straight to the
  holder, in a shuffled order: `null_net_*` is the same paired difference between two
  direct requests, i.e. what the method reads for no hop at all on this machine (the
  scheduler's and the processes' own jitter): the ceiling under the `hop_net` figures;
- client failover: the entry node (the client's first endpoint) is killed (kill -9)
  while it streams an answer; the time from the kill to the next event the caller
  gets (the retry on another node, past the text already delivered) and to the answer.

`--variants` runs a fresh lab per variant of the nodes' [runtime] settings, in turn,
`--rounds` times (interleaved, so a change of the machine's load hits all of them),
each with the load average beside its figures; `--floor` adds, per round, the same
hop measured on bare pyzmq processes (zmesh/bench/hopfloor.py). Variants:
py (Python's defaults: 5 ms GIL switch interval, no gc.freeze), switch (0.5 ms),
freeze (gc.freeze only), both (0.5 ms and gc.freeze), defaults (the node's).

    python -m zmesh.bench.mesh [--nodes 3] [--pairs 50] [--variants py,defaults]
                               [--rounds 2] [--floor] [--null] [--no-failover] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

from zmesh import protocol as P
from zmesh.bench import hopfloor
from zmesh.client import AsyncClient
from zmesh.lab import Lab

# [runtime] settings per variant ({} = the node's defaults).
VARIANTS: dict[str, dict[str, object]] = {
    "py": {"switch_interval_ms": 0.0, "gc_freeze": False},
    "switch": {"switch_interval_ms": 0.5, "gc_freeze": False},
    "freeze": {"switch_interval_ms": 0.0, "gc_freeze": True},
    "both": {"switch_interval_ms": 0.5, "gc_freeze": True},
    "defaults": {},
}

PREFIX = "The following are multiple choice questions (with answers) about optics.\n\n" + "".join(
    f"Question {i}: What bends light number {i}? A. A lens B. A stone C. Sand D. Wood\n"
    "Answer: A\n\n"
    for i in range(12)
)


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def _p50_p99(name: str, xs: list[float]) -> dict[str, float]:
    return {f"{name}_p50": round(statistics.median(xs), 2), f"{name}_p99": round(_pct(xs, 0.99), 2)}


async def _measure(
    lab: Lab,
    pairs: int,
    stream_tokens: int,
    failover: bool,
    background: int = 0,
    null: bool = False,
) -> dict[str, float | None]:
    startup = await lab.wait_converged(timeout=180)
    async with AsyncClient(lab.endpoints, timeout=60) as client:
        # Placement may put a new prefix on any node: the one that served it holds it.
        first = await client.generate(
            PREFIX + "Question: prime\nAnswer:", max_tokens=1, endpoint=lab.nodes[0].serve
        )
        b = next(n for n in lab.nodes if n.name == first.served_by)
        a = next(n for n in lab.nodes if n.name != first.served_by)
        served = time.monotonic()
        await lab.wait_converged(timeout=30)
        update = time.monotonic() - served
        direct, forwarded, diffs = [], [], []
        # Optional: answers streamed from the holder all along, so its engine thread
        # runs Python between decodes while the pairs' requests reach its loop.
        stop = asyncio.Event()

        async def busy(k: int) -> None:
            while not stop.is_set():
                story = f"Write a long story about lighthouse keeper number {k}."
                async for _ in client.stream(story, max_tokens=200, endpoint=b.serve):
                    pass

        streams = [asyncio.create_task(busy(k)) for k in range(background)]
        # Each latency less the serving engine's compute up to its first token (the
        # Done's prefill_s, from its slot to the token): what is left is tokenizing,
        # routing, queues and sockets, and the paired difference of that is the hop
        # without the engine's own noise.
        net_diffs, holder_diffs, outside_diffs, null_diffs = [], [], [], []
        shuffle = random.Random(0).shuffle
        for i in range(pairs):
            # Same cached prefix and equally long new suffixes, order alternating, so
            # the pair differs only by the hop. With `null`, a second direct request
            # too (order shuffled): the pair of directs differs by nothing, and its
            # spread is what the paired difference reads on this machine for no hop.
            kinds = {
                "direct": (b.serve, PREFIX + f"Question: {i:03d} alpha\nAnswer:"),
                "forwarded": (a.serve, PREFIX + f"Question: {i:03d} gamma\nAnswer:"),
            }
            if null:
                kinds["direct2"] = (b.serve, PREFIX + f"Question: {i:03d} omega\nAnswer:")
            order = list(kinds)
            if null:
                shuffle(order)
            elif i % 2:
                order.reverse()
            timing: dict[str, float] = {}
            net: dict[str, float] = {}
            holder: dict[str, float] = {}  # the holder's own time to the token, less compute
            outside: dict[str, float] = {}  # the rest: client, wires, the forwarder
            for kind in order:
                endpoint, prompt = kinds[kind]
                s = time.perf_counter()
                r = await client.generate(prompt, max_tokens=1, endpoint=endpoint)
                timing[kind] = (time.perf_counter() - s) * 1000
                net[kind] = timing[kind] - r.prefill_s * 1000
                holder[kind] = (r.ttft_s - r.prefill_s) * 1000
                outside[kind] = timing[kind] - r.ttft_s * 1000
                if r.served_by != b.name:
                    raise RuntimeError(
                        f"expected {b.name} to serve, got {r.served_by} "
                        f"(hops {r.hops}, {r.route_reason})"
                    )
            direct.append(timing["direct"])
            forwarded.append(timing["forwarded"])
            diffs.append(forwarded[-1] - direct[-1])
            net_diffs.append(net["forwarded"] - net["direct"])
            holder_diffs.append(holder["forwarded"] - holder["direct"])
            outside_diffs.append(outside["forwarded"] - outside["direct"])
            if null:
                null_diffs.append(net["direct2"] - net["direct"])
            if (i + 1) % 10 == 0:
                print(f"  [{i + 1}/{pairs}] pairs measured", file=sys.stderr)
        stop.set()
        await asyncio.gather(*streams)
        tps = []
        for i in range(3 if stream_tokens else 0):
            async for ev in client.stream(
                f"Count from {i} to 300: {i}, {i + 1}, {i + 2},",
                max_tokens=stream_tokens,
                endpoint=b.serve,
            ):
                if isinstance(ev, P.Done):
                    tps.append(ev.decode_tps)
    next_event_s, answer_s = await _failover(lab) if failover else (None, None)
    return {
        "nodes": lab.n_nodes,
        "startup_convergence_s": round(startup, 2),
        "update_convergence_ms": round(update * 1000, 1),
        "direct_ms_p50": round(statistics.median(direct), 2),
        "direct_ms_p99": round(_pct(direct, 0.99), 2),
        "forwarded_ms_p50": round(statistics.median(forwarded), 2),
        "forwarded_ms_p99": round(_pct(forwarded, 0.99), 2),
        "hop_overhead_ms_p50": round(statistics.median(diffs), 2),
        "hop_overhead_ms_p99": round(_pct(diffs, 0.99), 2),
        "hop_net_ms_p50": round(statistics.median(net_diffs), 2),
        "hop_net_ms_p99": round(_pct(net_diffs, 0.99), 2),
        **_p50_p99("hop_holder_ms", holder_diffs),
        **_p50_p99("hop_outside_ms", outside_diffs),
        **(_p50_p99("null_net_ms", null_diffs) if null_diffs else {}),
        "decode_tps": round(statistics.median(tps), 1) if tps else None,
        "failover_next_event_ms": round(next_event_s * 1000, 1) if next_event_s else None,
        "failover_answer_ms": round(answer_s * 1000, 1) if answer_s else None,
    }


async def _failover(lab: Lab, chunks_before: int = 5) -> tuple[float, float]:
    """Kill node 0 while it streams through a client that lists every node (last: it
    leaves the lab a node short). Seconds from the kill to the next event and to Done."""
    killed_at = next_event = 0.0
    async with AsyncClient(lab.endpoints, timeout=120) as client:
        chunks = 0
        async for ev in client.stream("Count from 1 to 300: 1, 2, 3, 4, 5,", max_tokens=120):
            now = time.monotonic()
            if killed_at and not next_event:
                next_event = now - killed_at
            chunks += isinstance(ev, P.Chunk)
            if chunks == chunks_before and not killed_at:
                lab.kill_node(0)
                killed_at = time.monotonic()
        if not killed_at:
            raise RuntimeError("the answer ended before the entry node was killed")
        return next_event, time.monotonic() - killed_at


def _run(args: argparse.Namespace, variant: str) -> dict[str, object]:
    """One fresh lab with the variant's [runtime] settings, measured."""
    lab = Lab(
        n_nodes=args.nodes,
        engine={"n_slots": 4, "slot_ctx": 1024, "n_threads": 1},
        extra_config={"runtime": VARIANTS[variant]} if VARIANTS[variant] else {},
    )
    print(f"mesh benchmark ({variant}): {args.nodes} nodes, logs in {lab.workdir}", file=sys.stderr)
    load_before = os.getloadavg()[0]
    lab.start()
    try:
        res = asyncio.run(
            _measure(
                lab,
                args.pairs,
                args.stream_tokens,
                not args.no_failover,
                args.background,
                args.null,
            )
        )
    finally:
        lab.stop()
    return {
        "variant": variant,
        "background_streams": args.background,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "affinity": sorted(os.sched_getaffinity(0)),
        **res,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zmesh bench mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=50, help="direct/forwarded request pairs")
    ap.add_argument(
        "--variants", default="defaults", help=f"comma list of {', '.join(VARIANTS)} (a lab each)"
    )
    ap.add_argument("--rounds", type=int, default=1, help="run the variants this many times")
    ap.add_argument("--floor", action="store_true", help="bare pyzmq hop too, once a round")
    ap.add_argument("--stream-tokens", type=int, default=0, help="decode tokens/s: answer length")
    ap.add_argument(
        "--background", type=int, default=0, help="answers streamed from the holder meanwhile"
    )
    ap.add_argument("--no-failover", action="store_true", help="skip the failover figure")
    ap.add_argument(
        "--null",
        action="store_true",
        help="a second direct request per pair: the paired difference for no hop",
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object per run")
    args = ap.parse_args(argv)
    if args.nodes < 2:
        ap.error("forwarding needs at least 2 nodes")
    variants = args.variants.split(",")
    if bad := [v for v in variants if v not in VARIANTS]:
        ap.error(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    for _ in range(args.rounds):
        runs: list[dict[str, object]] = [_run(args, v) for v in variants]
        if args.floor:
            load = os.getloadavg()[0]
            floor = hopfloor.measure(args.pairs)
            runs.append({"variant": "floor", "load_avg_1m": [round(load, 2)], **floor})
        for res in runs:
            if args.json:
                print(json.dumps(res), flush=True)
            else:
                for k, v in res.items():
                    print(f"{k:<24} {v}")
                print(flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
