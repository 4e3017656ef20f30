"""The ``random`` policy: a uniformly random node among this one and the alive peers.

Algorithm: sort the pool (so the caller's ordering never matters) and draw an index
from the caller's seeded `PolicyState.rng`. Blind to caches and load: the floor every
other policy is measured against. No parameters.
"""

from __future__ import annotations

from zmesh.routing.base import (
    REASON_RANDOM,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    baseline_decision,
    pool_ids,
)


def decide_random(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    ids = pool_ids(local, peers)
    return baseline_decision(ids[state.rng.randrange(len(ids))], REASON_RANDOM, local, scores)
