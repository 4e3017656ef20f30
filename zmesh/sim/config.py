"""The simulator's configuration (`SimConfig`) and result (`SimResult`), and its constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zmesh.routing import (
    ALL_POLICIES,
)
from zmesh.sim.costmodel import PRESETS, CostModel

__all__ = ["SIM_POLICIES", "ZMESH_SHIP", "SimConfig", "SimResult"]

# ``zmesh_ship``: the zmesh policy with KV shipping on (routing ``ship``), as in
# `zmesh bench cluster`; the other names are `routing.ALL_POLICIES`.
ZMESH_SHIP = "zmesh_ship"
SIM_POLICIES = (*ALL_POLICIES, ZMESH_SHIP)
FINGERPRINT = b"zmesh-sim-model"
NO_BALANCE = 10**9  # balance_abs that never triggers (paper policy)

# Event kinds (ints: heap tuples compare them only on time ties).
ARRIVE, FWD, DONE, FLUSH, HB, DELIVER, SNAPREQ, SNAPPARTS = range(8)
TICK, FAIL, RECOVER, FWD_TIMEOUT, STREAM, OPEN = range(8, 14)
KV_FETCH, KV_READY = range(14, 16)
REFUSED = 16  # a peer's "busy" reaches the forwarder (routing/admission.py)
# Holder push (push.py): an offer reaches the peer, its answer the holder, the peer's
# fetch the holder, the state the peer.
KV_OFFER, KV_OFFER_REPLY, KV_PUSH_FETCH, KV_PUSH_READY = range(17, 21)

# Job states.
WAIT, QUEUED, RUNNING, FINISHED, DROPPED = range(5)


@dataclass
class SimConfig:
    nodes: int = 8
    policy: str = "zmesh"
    n_slots: int = 8
    cache: str = "slots"  # "slots": the engine's slot pool; "tokens": radix LRU, token budget
    cache_tokens: int = 16384
    block_size: int = 16
    delay_s: float = 0.001  # one-way inter-node delay (mean of the base)
    jitter: float = 0.2  # extra delay per message: delay * jitter * Exp(1)
    delay_spread: float = 0.0  # per-link base delay = delay_s * lognormal(0, spread)
    loss: float = 0.0  # probability that a gossip message (heartbeat, delta) is lost
    heartbeat_s: float = 0.2
    delta_s: float = 0.03
    suspect_after_s: float = 1.0
    dead_after_s: float = 3.0
    snapshot_timeout_s: float = 2.0
    forward_timeout_s: float = 5.0
    # Nodes send Progress keep-alives for forwarded work, so a forward to a live peer
    # is waited for; False models nodes before that: a forward whose first token has
    # not reached its entry within forward_timeout_s is served again there.
    forward_keepalive: bool = True
    hash_prefix_tokens: int = 64
    max_queue: int = 64
    # Requests a node runs at once (continuous batching: the engine's max_running,
    # n_slots by default on a real node), each at the cost model's batched rate;
    # 1: one at a time, the model the sweeps of docs/evaluation.md were run with.
    max_running: int = 1
    prefill_chunk: int = 128  # batched: prompt tokens read per step while others decode
    routing: dict[str, Any] = field(default_factory=dict)  # RoutingSettings overrides
    estimates: str = "auto"  # "per_node" | "shared" | "auto" (per_node up to 8 nodes)
    max_candidates: int = 0  # peers considered per decision; 0: all up to 64 nodes, else 16
    cost: CostModel = field(default_factory=lambda: PRESETS["cpu"])
    service_noise: float = 0.0  # service time *= lognormal(0, noise)
    failures: int = 0  # node crashes, spread evenly over the requests
    downtime_s: float = 5.0
    seed: int = 0
    # KV shipping (policy zmesh_ship; `shipping.py`). Every link's bandwidth; the
    # state's size and the engine's export and import times were measured on this
    # project's machine (2 CPU cores, gemma-3-270m Q4_K_M, llama.cpp state calls): a
    # 512-token prefix is 9.4 MB (18.4 KB per token), exported in 28 ms and imported
    # in 22 ms. ship_max_tokens: the model's sliding window (Engine.max_ship_tokens).
    bandwidth_mbit: float = 1000.0  # a LAN
    ship_bytes_per_token: float = 9.4e6 / 512
    ship_export_s_per_token: float = 0.028 / 512
    ship_import_s_per_token: float = 0.022 / 512
    ship_max_tokens: int = 512
    ship_timeout_s: float = 5.0  # a pull from a holder that died is given up then
    # Tests: decide every request on the full candidate list too, and keep both
    # decisions (`Simulator.checked`) for the test to compare.
    verify: bool = False
    # A proposed change, not what node.py does: count the prefixes of requests already
    # queued here, or forwarded by us to a peer, as matched (they will be cached by then).
    pending_prefixes: bool = False
    # Diagnosis (`sim run`): per request, which nodes' real caches matched it best when
    # it arrived, and whether the chosen node looked idle; costs a match per node.
    diagnose: bool = False
    # "one": every request enters at node 0, which then sees all its own decisions
    # (what the picture lacks when a burst enters at several nodes at once).
    entry: str = "random"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        if not 1 <= self.max_running <= self.n_slots:
            raise ValueError(f"max_running must be in 1..n_slots ({self.n_slots})")
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(SIM_POLICIES)}")
        if self.cache not in ("slots", "tokens"):
            raise ValueError("cache must be slots or tokens")
        if self.entry not in ("random", "one"):
            raise ValueError("entry must be random or one")
        if self.estimates not in ("auto", "shared", "per_node"):
            raise ValueError("estimates must be auto, shared or per_node")
        if self.delay_s < 0 or self.jitter < 0 or not 0 <= self.loss < 1:
            raise ValueError("delay_s and jitter must be >= 0, loss in [0, 1)")
        if self.bandwidth_mbit <= 0 or self.ship_bytes_per_token <= 0:
            raise ValueError("bandwidth_mbit and ship_bytes_per_token must be > 0")

    def shared_estimates(self) -> bool:
        return self.estimates == "shared" or (self.estimates == "auto" and self.nodes > 8)

    def candidate_limit(self) -> int:
        if self.max_candidates > 0:
            return self.max_candidates
        return 0 if self.nodes <= 64 else 16


@dataclass
class SimResult:
    config: dict[str, Any]
    figures: dict[str, Any]
    ttft_s: list[float]
    e2e_s: list[float]
    served_by: list[int]
    wall_s: float
    events: int
