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
- client failover: the entry node (the client's first endpoint) is killed (kill -9)
  while it streams an answer; the time from the kill to the next event the caller
  gets (the retry on another node, past the text already delivered) and to the answer.

    python -m zmesh.bench.mesh [--nodes 3] [--pairs 50] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time

from zmesh import protocol as P
from zmesh.bench.output import print_result
from zmesh.client import AsyncClient
from zmesh.lab import Lab

PREFIX = "The following are multiple choice questions (with answers) about optics.\n\n" + "".join(
    f"Question {i}: What bends light number {i}? A. A lens B. A stone C. Sand D. Wood\n"
    "Answer: A\n\n"
    for i in range(12)
)


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def _measure(lab: Lab, pairs: int) -> dict[str, float]:
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
        # Each latency less the serving engine's compute up to its first token (the
        # Done's prefill_s, from its slot to the token): what is left is tokenizing,
        # routing, queues and sockets, and the paired difference of that is the hop
        # without the engine's own noise.
        net_diffs = []
        for i in range(pairs):
            # Same cached prefix and equally long new suffixes, order alternating, so
            # the pair differs only by the hop.
            p_direct = PREFIX + f"Question: {i:03d} alpha\nAnswer:"
            p_fwd = PREFIX + f"Question: {i:03d} gamma\nAnswer:"
            order = [(b.serve, p_direct), (a.serve, p_fwd)]
            timing: dict[str, float] = {}
            net: dict[str, float] = {}
            for endpoint, prompt in order if i % 2 == 0 else order[::-1]:
                s = time.perf_counter()
                r = await client.generate(prompt, max_tokens=1, endpoint=endpoint)
                timing[endpoint] = (time.perf_counter() - s) * 1000
                net[endpoint] = timing[endpoint] - r.prefill_s * 1000
                if r.served_by != b.name:
                    raise RuntimeError(
                        f"expected {b.name} to serve, got {r.served_by} "
                        f"(hops {r.hops}, {r.route_reason})"
                    )
            direct.append(timing[b.serve])
            forwarded.append(timing[a.serve])
            diffs.append(forwarded[-1] - direct[-1])
            net_diffs.append(net[a.serve] - net[b.serve])
            if (i + 1) % 10 == 0:
                print(f"  [{i + 1}/{pairs}] pairs measured", file=sys.stderr)
    next_event_s, answer_s = await _failover(lab)
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
        "failover_next_event_ms": round(next_event_s * 1000, 1),
        "failover_answer_ms": round(answer_s * 1000, 1),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zmesh bench mesh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--pairs", type=int, default=50, help="direct/forwarded request pairs")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.nodes < 2:
        ap.error("forwarding needs at least 2 nodes")
    lab = Lab(n_nodes=args.nodes, engine={"n_slots": 4, "slot_ctx": 1024, "n_threads": 1})
    print(f"mesh benchmark: {args.nodes} nodes, logs in {lab.workdir}", file=sys.stderr)
    lab.start()
    try:
        res = asyncio.run(_measure(lab, args.pairs))
    finally:
        lab.stop()
    print_result(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
