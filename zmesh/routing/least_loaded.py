"""The ``least_loaded`` policy: the node with the shortest queue.

Algorithm: the lowest advertised ``queue_depth``; ties keep the local node, then the
smallest node id. Blind to caches. No parameters.
"""

from __future__ import annotations

from zmesh.routing.base import (
    REASON_LEAST_LOADED,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    baseline_decision,
)


def decide_least_loaded(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    best = local
    for p in peers:
        if p.queue_depth < best.queue_depth or (
            p.queue_depth == best.queue_depth and not best.is_local and p.node_id < best.node_id
        ):
            best = p
    return baseline_decision(best.node_id, REASON_LEAST_LOADED, local, scores)
