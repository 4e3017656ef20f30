"""Discrete-event simulator of a zmesh cluster, on the real routing, gossip and cache code.

What is real (imported, not copied): `RadixTree` and `BlockHasher` (each node's cache
and the block ids it advertises), `LocalAdvert` (sequenced deltas, digest, snapshot
parts), `PeerTable` / `PeerEstimate` (estimates, gap/epoch/digest repair, failure
detection) and `routing.decide` (every policy). What is modelled: time (a cost model
calibrated from the engine benchmark), the engine's slot policy (`cache.py`), links
(per-message delay with jitter, FIFO per link, loss of gossip messages), node crashes.

A node here behaves like `node.py`: an entry node routes the request (candidates
built by `zmesh.candidates`, as a node builds them: local tree match, each alive
peer's estimated match, heard queue + our in-flight forwards, heard backlog +
forwards the peer has not reported yet, measured link delay), forwards at most once,
serves FIFO, flushes its cache deltas every ``delta_s`` and heartbeats every
``heartbeat_s`` and at the next tick after its load changed. A failed or timed-out
forward is served by the entry.

Scale (1,000 nodes): ``estimates="shared"`` keeps one estimate per node that every
peer reads (each message delivered once, with a sampled delay) instead of one per
(receiver, sender) pair; ``max_candidates`` routes among the peers with the longest
estimated matches (found through an index of the shared estimates) plus a random
sample, instead of all peers. Both are documented approximations; below 64 nodes
the defaults are exact (per-receiver estimates for up to 8 nodes, all peers as
candidates).

Policies: every one of `routing.ALL_POLICIES`: the five a node runs, ``paper``
(the P2P paper's design: the longest estimated prefix wins, blind to delay and load)
and ``oracle`` (`zmesh.oracle`: a client-side router with exact, instant knowledge
of every node's cache - including what queued requests will leave in it - and of
every queue); and ``zmesh_ship``: zmesh with KV shipping on (`shipping`).

Layout: this module holds the event loop (`Simulator.run`); `base` the set-up and
state every mixin shares; `arrivals`, `routing`, `serving`, `shipping` (KV pulls,
policy ``zmesh_ship``), `push` (holder push, ``--set ship_push=true``), `gossip`,
`mirror` and `results` one job each (see their headers).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

from zmesh.sim.arrivals import ArrivalsMixin
from zmesh.sim.batch import BatchMixin
from zmesh.sim.config import (
    HB,
    SIM_POLICIES,
    TICK,
    SimConfig,
    SimResult,
)
from zmesh.sim.gossip import GossipMixin
from zmesh.sim.mirror import MirrorMixin
from zmesh.sim.push import PushMixin
from zmesh.sim.results import ResultsMixin
from zmesh.sim.routing import RoutingMixin
from zmesh.sim.serving import ServingMixin
from zmesh.sim.shipping import ShippingMixin
from zmesh.workload import Arrivals, Workload

__all__ = ["SIM_POLICIES", "SimConfig", "SimResult", "Simulator", "simulate"]


class Simulator(
    ArrivalsMixin,
    RoutingMixin,
    ServingMixin,
    BatchMixin,
    ShippingMixin,
    PushMixin,
    GossipMixin,
    MirrorMixin,
    ResultsMixin,
):
    """One simulated cluster: `run` pops events off the heap until every request is done."""

    def run(self) -> SimResult:
        import time

        t0 = time.perf_counter()
        cfg = self.cfg
        for node in self.nodes:
            self._push(node.phase + cfg.heartbeat_s * self.rng.random(), HB, node.idx, 0)
        for v, _ in enumerate(self.views):
            self._push(cfg.heartbeat_s, TICK, v)
        self._start_arrivals()
        handlers: list[Callable[[Any, Any], None]] = [
            self._on_arrive,
            self._on_fwd,
            self._on_done,
            self._on_flush,
            self._on_hb,
            self._on_deliver,
            self._on_snapreq,
            self._on_snapparts,
            self._on_tick,
            self._on_fail,
            self._on_recover,
            self._on_fwd_timeout,
            self._on_stream,
            self._on_open,
            self._on_kv_fetch,
            self._on_kv_ready,
            self._on_refused,
            self._on_kv_offer,
            self._on_kv_offer_reply,
            self._on_kv_push_fetch,
            self._on_kv_push_ready,
        ]
        heap = self._heap
        pop = heapq.heappop
        total = len(self.workload.requests)
        report_every = max(total // 20, 1)
        next_report = report_every
        events = 0
        while heap and self.done < total:
            t, _, kind, a, b = pop(heap)
            self.now = t
            handlers[kind](a, b)
            events += 1
            if self.progress is not None and self.done >= next_report:
                next_report += report_every
                self.progress(
                    f"{self.done}/{total} requests, sim {t:.1f}s, "
                    f"wall {time.perf_counter() - t0:.1f}s"
                )
        self.events = events
        return self._result(time.perf_counter() - t0)


def simulate(
    config: SimConfig,
    workload: Workload,
    arrivals: Arrivals,
    progress: Callable[[str], None] | None = None,
) -> SimResult:
    return Simulator(config, workload, arrivals, progress).run()
