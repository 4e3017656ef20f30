"""Routing decision time: 8 peers, each advertising 100k blocks, a ~600-token prompt.

Times the parts the node runs per request, on the real code: block ids of the prompt
(`BlockHasher`), the local tree match (`RadixTree`), each peer's estimated match
(`PeerEstimate.match_blocks`) and the policy (`routing.decide`).

    python -m zmesh.bench.routing [--peers 8] [--blocks 100000] [--iterations 2000] [--json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from zmesh.bench.output import print_result
from zmesh.blocks import BlockHasher
from zmesh.peers import PeerEstimate
from zmesh.radix import RadixTree
from zmesh.routing import Candidate, PolicyState, RouteRequest, RoutingSettings, decide


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


def run(n_peers: int, n_blocks: int, iterations: int, prompt_tokens: int) -> dict[str, float]:
    rng = random.Random(1)
    hasher = BlockHasher(b"bench-model", "default", 16)
    prompts = [[rng.randrange(256_000) for _ in range(prompt_tokens)] for _ in range(64)]
    tree = RadixTree(hasher)
    for slot, p in enumerate(prompts[:8]):
        tree.set_sequence(slot, p)
    peers = []
    for i in range(n_peers):
        est = PeerEstimate(f"peer-{i}", now=0.0)
        blocks = {rng.getrandbits(64): 0 for _ in range(n_blocks)}
        for p in prompts[i::n_peers]:  # each peer really holds some of the prompts
            blocks.update({b: 0 for b in hasher.block_ids(p)})
        est.blocks = blocks
        est.queue_depth = rng.randrange(4)
        peers.append(est)
    settings, state = RoutingSettings(), PolicyState.seeded(0)
    hash_us, match_us, decide_us, total_us = [], [], [], []
    for it in range(iterations):
        tokens = prompts[it % len(prompts)]
        t0 = time.perf_counter()
        ids = hasher.block_ids(tokens)
        t1 = time.perf_counter()
        local = tree.match(tokens).length
        cands = [Candidate("self", True, local, 1, 0.0, 0.002, 0.5)]
        cands += [
            Candidate(p.node_id, False, p.match_blocks(ids) * 16, p.queue_depth, 0.001, 0.002, 0.5)
            for p in peers
        ]
        t2 = time.perf_counter()
        decide(RouteRequest(len(tokens), 0, ids[3]), cands, settings, state)
        t3 = time.perf_counter()
        hash_us.append((t1 - t0) * 1e6)
        match_us.append((t2 - t1) * 1e6)
        decide_us.append((t3 - t2) * 1e6)
        total_us.append((t3 - t0) * 1e6)
    return {
        "peers": n_peers,
        "blocks_per_peer": n_blocks,
        "prompt_tokens": prompt_tokens,
        "iterations": iterations,
        "hash_us_p50": round(statistics.median(hash_us), 1),
        "match_us_p50": round(statistics.median(match_us), 1),
        "decide_us_p50": round(statistics.median(decide_us), 1),
        "total_us_p50": round(statistics.median(total_us), 1),
        "total_us_p99": round(_pct(total_us, 0.99), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zmesh bench routing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--peers", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=100_000, help="blocks advertised per peer")
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    res = run(args.peers, args.blocks, args.iterations, args.prompt_tokens)
    print_result(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
