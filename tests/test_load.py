"""Load: 2,000 short requests, 64 in flight, against a real 3-node lab.

Counts every reply by request id on the wire (meshkit.RawClient): none may be lost or
answered twice; the only error allowed is `overloaded` (counted). Node queues stay
within max_queue, and node memory (VmRSS) within a generous bound. Prints p50/p99
latency and throughput (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import pytest
from meshkit import RawClient, Tally, generate, percentile, rss_mb

from zmesh import protocol as P
from zmesh.client import AsyncClient, ZmeshError
from zmesh.lab import Lab

pytestmark = pytest.mark.slow

# LOADTEST_REQUESTS: fewer for a quick look (not ZMESH_*: nodes read those as config).
N_REQUESTS = int(os.environ.get("LOADTEST_REQUESTS", "2000"))
CONCURRENCY = 64
# 8 clients with 8 requests in flight each: one client with 64 would meet the
# per-client limit (max_inflight_per_client, 32 per node) on a node that lags.
CLIENTS = 8
MAX_QUEUE = 32
N_SLOTS = 4  # requests a node runs at once (continuous batching)
DEADLINE_S = 60.0
RSS_GROWTH_MB = 300.0
PREFIXES = [
    "You are a terse assistant. Answer with one word.\n",
    "System: reply in French, briefly.\n",
    "Context: the user is planning a garden with tomatoes and basil.\n",
    "Translate the following English words into German, one per line.\n",
]


Peaks = dict[str, int]  # node id -> highest queue depth seen


def workload(n: int, seed: int = 7) -> list[tuple[str, int]]:
    """(prompt, max_tokens): a few shared prefixes, short distinct questions."""
    rng = random.Random(seed)
    return [
        (
            f"{rng.choice(PREFIXES)}Q{i}: name a colour number {rng.randrange(100)}.\nA:",
            rng.randint(1, 4),
        )
        for i in range(n)
    ]


async def watch_queues(lab: Lab, stop: asyncio.Event, peaks: dict[str, int]) -> tuple[int, int]:
    """Poll every node's queue depth until stopped: (polls answered, polls missed).

    A status waits behind nothing on the node, but under this load on 2 shared cores a
    node process can be off the CPU for seconds: a late status is a miss, not a failure.
    """
    polls = misses = 0
    async with AsyncClient(lab.endpoints, connect_timeout=5.0) as c:
        while not stop.is_set():
            for node in lab.nodes:
                try:
                    st = await c.status(node.serve, timeout=10.0)
                except ZmeshError:
                    misses += 1
                    continue
                peaks[st.node_id] = max(peaks.get(st.node_id, 0), st.queue_depth)
                polls += 1
            await asyncio.sleep(0.1)
    return polls, misses


async def drive(lab: Lab, requests: list[tuple[str, int]]) -> tuple[Tally, float]:
    """Send every request, CONCURRENCY at a time, from CLIENTS clients (connections)
    in turn; each client sends to every node in turn."""
    tally = Tally()
    clients = [RawClient(lab.endpoints, tally) for _ in range(CLIENTS)]
    gates = [asyncio.Semaphore(CONCURRENCY // CLIENTS) for _ in clients]
    for rc in clients:
        rc.start()

    async def one(i: int, prompt: str, max_tokens: int) -> None:
        k = i % CLIENTS
        async with gates[k]:
            msg = generate(f"load-{i}", prompt, max_tokens, DEADLINE_S)
            endpoint = lab.endpoints[(i // CLIENTS) % len(lab.endpoints)]
            await clients[k].ask(endpoint, msg, DEADLINE_S + 5)

    t0 = time.monotonic()
    try:
        await asyncio.gather(*(one(i, p, m) for i, (p, m) in enumerate(requests)))
        wall = time.monotonic() - t0
        for rc in clients:
            await rc.drain()  # a second answer to anything is counted by now
    finally:
        for rc in clients:
            await rc.close()
    return tally, wall


def test_two_thousand_short_requests_none_lost_none_twice(tmp_path: Path) -> None:
    lab = Lab(
        n_nodes=3,
        engine={"n_slots": N_SLOTS, "slot_ctx": 512, "n_threads": 1},
        extra_config={"max_queue": MAX_QUEUE},
        workdir=tmp_path,
    )
    lab.start()
    try:
        asyncio.run(lab.wait_converged(timeout=90))
        pids = {n.name: n.proc.pid for n in lab.nodes if n.proc is not None}
        rss_before = {name: rss_mb(pid) for name, pid in pids.items()}

        async def main() -> tuple[Tally, float, Peaks, tuple[int, int], list[P.Status]]:
            stop, peaks = asyncio.Event(), {}
            watcher = asyncio.create_task(watch_queues(lab, stop, peaks))
            try:
                tally, wall = await drive(lab, workload(N_REQUESTS))
            finally:
                stop.set()
                polls = await watcher
            # Idle again: nothing left queued or counted in flight anywhere.
            give_up = time.monotonic() + 15
            while True:
                after = await lab.statuses()
                if all(s.inflight == s.queue_depth == 0 for s in after):
                    break
                assert time.monotonic() < give_up, [(s.inflight, s.queue_depth) for s in after]
                await asyncio.sleep(0.1)
            return tally, wall, peaks, polls, after

        t, wall, peaks, polls, after = asyncio.run(main())
        rss_after = {name: rss_mb(pid) for name, pid in pids.items()}
    finally:
        lab.stop()

    done, errors = t.done(), t.errors()
    lat = sorted(t.latency_s[d.request_id] for d in done)
    # Time to first token: the first chunk, or the answer itself when it had no text.
    ttft = sorted(t.ttft_s.get(d.request_id, t.latency_s[d.request_id]) for d in done)
    growth = {k: round(rss_after[k] - rss_before[k], 1) for k in rss_before}
    served = {s.node_id: s.counters.get("requests_served", 0) for s in after}
    print(
        f"\nLOAD requests={len(t.sent)} done={len(done)} errors={dict(errors)} "
        f"lost={len(t.lost)} twice={len(t.twice)} concurrency={CONCURRENCY} clients={CLIENTS} "
        f"wall_s={wall:.1f} throughput_rps={len(done) / wall:.1f} "
        f"p50_ms={percentile(lat, 0.5) * 1000:.0f} p99_ms={percentile(lat, 0.99) * 1000:.0f} "
        f"ttft_p50_ms={percentile(ttft, 0.5) * 1000:.0f} "
        f"ttft_p99_ms={percentile(ttft, 0.99) * 1000:.0f} "
        f"forwarded={sum(d.hops > 0 for d in done)} served_by_node={served} "
        f"queue_peak={peaks} (max_queue={MAX_QUEUE}, polls answered/missed={polls}) "
        f"rss_before_mb={ {k: round(v) for k, v in rss_before.items()} } rss_growth_mb={growth}"
    )
    assert len(t.sent) == N_REQUESTS
    assert t.lost == [], f"{len(t.lost)} lost, e.g. {t.lost[:5]}"
    assert t.twice == [], f"{len(t.twice)} answered twice, e.g. {t.twice[:5]}"
    assert set(errors) <= {P.OVERLOADED}, errors
    assert len(done) + errors[P.OVERLOADED] == N_REQUESTS
    assert all(d.completion_tokens >= 1 for d in done)
    # queue_depth counts the running jobs too: the bound is the queue plus one per slot.
    assert polls[0] >= 10 and max(peaks.values()) <= MAX_QUEUE + N_SLOTS, (peaks, polls)
    assert max(growth.values()) < RSS_GROWTH_MB, growth
