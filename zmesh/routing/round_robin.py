"""The ``round_robin`` policy: each node of the sorted pool in turn.

Algorithm: ``pool[rr_counter % len(pool)]``, then the counter (in `PolicyState`)
advances. Spreads load evenly, blind to caches. No parameters.
"""

from __future__ import annotations

from zmesh.routing.base import (
    REASON_ROUND_ROBIN,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    baseline_decision,
    pool_ids,
)


def decide_round_robin(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    ids = pool_ids(local, peers)
    target = ids[state.rr_counter % len(ids)]
    state.rr_counter += 1
    return baseline_decision(target, REASON_ROUND_ROBIN, local, scores)
