"""Routing: which node serves a request. One file per policy, each opening with a header
that explains its algorithm and parameters (as SGLang's model gateway does):

- `base.py`: candidates, the request, settings, the decision, reason codes, the estimate;
- `registry.py`: `decide`, the one entry point, and the name -> policy table;
- `zmesh.py`: lowest expected TTFT with balance thresholds (the default);
- `placement.py`: cache-affine placement inside the zmesh policy;
- `shipping.py`: pulling a peer's cached KV prefix inside the zmesh policy;
- `admission.py`: a peer refuses a forward its burst made late; the runner-up after it;
- `random.py`, `round_robin.py`, `consistent_hash.py`, `least_loaded.py`: baselines;
- `paper.py`: the P2P paper's design (longest estimated prefix, blind to load);
- `oracle.py`: lowest estimate, no thresholds (its exact inputs: `zmesh.oracle`).

A node may be configured with the five of `POLICIES`; `ALL_POLICIES` adds ``paper``
and ``oracle``, which the simulator and the cluster bench run.
"""

from zmesh.routing.base import (
    ALL_POLICIES,
    CONSISTENT_HASH,
    LEAST_LOADED,
    ORACLE,
    PAPER,
    POLICIES,
    RANDOM,
    REASON_CONSISTENT_HASH,
    REASON_HOP_LIMIT,
    REASON_LEAST_LOADED,
    REASON_LOAD,
    REASON_LOCAL_BEST,
    REASON_NO_PEERS,
    REASON_PLACEMENT,
    REASON_PREFIX,
    REASON_RANDOM,
    REASON_REFUSED,
    REASON_ROUND_ROBIN,
    REASON_SHIPPED,
    REASONS,
    ROUND_ROBIN,
    ZMESH,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    SettingError,
    charged_s,
    estimate_s,
    evicts_tokens,
    gain_threshold,
    is_overloaded,
    near_best,
)
from zmesh.routing.consistent_hash import ring_position
from zmesh.routing.placement import placement_rank
from zmesh.routing.registry import POLICY_FNS, decide

__all__ = [
    "ALL_POLICIES",
    "CONSISTENT_HASH",
    "LEAST_LOADED",
    "ORACLE",
    "PAPER",
    "POLICIES",
    "POLICY_FNS",
    "RANDOM",
    "REASONS",
    "REASON_CONSISTENT_HASH",
    "REASON_HOP_LIMIT",
    "REASON_LEAST_LOADED",
    "REASON_LOAD",
    "REASON_LOCAL_BEST",
    "REASON_NO_PEERS",
    "REASON_PLACEMENT",
    "REASON_PREFIX",
    "REASON_RANDOM",
    "REASON_REFUSED",
    "REASON_ROUND_ROBIN",
    "REASON_SHIPPED",
    "ROUND_ROBIN",
    "ZMESH",
    "Candidate",
    "Decision",
    "PolicyState",
    "RouteRequest",
    "RoutingSettings",
    "SettingError",
    "charged_s",
    "decide",
    "estimate_s",
    "evicts_tokens",
    "gain_threshold",
    "is_overloaded",
    "near_best",
    "placement_rank",
    "ring_position",
]
