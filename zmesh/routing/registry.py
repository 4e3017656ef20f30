"""The policy registry and `decide`, the one entry point every caller uses.

`decide(request, candidates, settings, state)` validates the candidate list, computes
every candidate's estimate, applies the rules common to all policies (a request out of
hops, or with no alive peer, is served here) and hands the rest to the policy named by
``settings.policy``. One signature for every policy: `PolicyFn` in `base.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

from zmesh.routing.base import (
    CONSISTENT_HASH,
    LEAST_LOADED,
    ORACLE,
    PAPER,
    RANDOM,
    REASON_HOP_LIMIT,
    REASON_NO_PEERS,
    ROUND_ROBIN,
    ZMESH,
    Candidate,
    Decision,
    PolicyFn,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    estimate_s,
    serve_local,
    unknown_policy,
)
from zmesh.routing.consistent_hash import decide_consistent_hash
from zmesh.routing.least_loaded import decide_least_loaded
from zmesh.routing.oracle import decide_oracle
from zmesh.routing.paper import decide_paper
from zmesh.routing.random import decide_random
from zmesh.routing.round_robin import decide_round_robin
from zmesh.routing.zmesh import decide_zmesh

POLICY_FNS: dict[str, PolicyFn] = {
    ZMESH: decide_zmesh,
    RANDOM: decide_random,
    ROUND_ROBIN: decide_round_robin,
    CONSISTENT_HASH: decide_consistent_hash,
    LEAST_LOADED: decide_least_loaded,
    PAPER: decide_paper,
    ORACLE: decide_oracle,
}


def decide(
    request: RouteRequest,
    candidates: Sequence[Candidate],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    """Choose the serving node. Raises ValueError on a bad candidate list or policy."""
    policy = POLICY_FNS.get(settings.policy)
    if policy is None:
        raise ValueError(unknown_policy(settings.policy))
    local: Candidate | None = None
    n_local = 0
    for c in candidates:
        if c.is_local:
            local = c
            n_local += 1
    if n_local != 1 or local is None:
        raise ValueError(f"exactly one candidate must be local, got {n_local}")
    if len({c.node_id for c in candidates}) != len(candidates):
        raise ValueError("candidate node ids must be unique")

    prompt = max(request.prompt_tokens, 0)
    peers = [c for c in candidates if not c.is_local and c.alive]
    est_local = estimate_s(local, prompt)
    scores = [(local.node_id, est_local)]
    scores.extend((p.node_id, estimate_s(p, prompt)) for p in peers)

    if request.hops >= settings.max_hops:
        return serve_local(local, REASON_HOP_LIMIT, scores, est_local)
    if not peers:
        return serve_local(local, REASON_NO_PEERS, scores, est_local)
    return policy(request, local, peers, scores, settings, state)
