"""The ``oracle`` policy: the lowest estimate wins, with nothing held back.

Algorithm: the candidate with the lowest `estimate_s` (link + wait + prefill of
what it lacks) is chosen, with no gain threshold, no balance rule, no placement and
no give-up; ties keep this node, then the smallest node id.

It is an oracle only through its inputs: a router with exact, instant knowledge of
every node (`zmesh.oracle`) builds candidates whose ``matched_tokens`` is what each
node's cache will hold when the request gets there and whose ``wait_s`` is its exact
backlog plus what the request's evictions will cost later, and puts the best first
as the "local" candidate. On a node's own estimates it would be a thresholdless
``zmesh``; nodes cannot be configured with it.

Parameters: none (the `RoutingSettings` knobs of the ``zmesh`` policy are ignored).

Reasons: ``local_best``, ``prefix`` (the peer holds more of the prompt), ``load``.
"""

from __future__ import annotations

from zmesh.routing.base import (
    REASON_LOAD,
    REASON_LOCAL_BEST,
    REASON_PREFIX,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    serve_local,
)


def decide_oracle(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    est_local = scores[0][1]
    best: Candidate | None = None
    best_est = 0.0
    # scores[1:] is aligned with peers.
    for p, (_, est) in zip(peers, scores[1:], strict=True):
        if best is None or est < best_est or (est == best_est and p.node_id < best.node_id):
            best, best_est = p, est
    if best is None or not best_est < est_local:
        return serve_local(local, REASON_LOCAL_BEST, scores, est_local)
    prompt = max(request.prompt_tokens, 0)
    gained = min(max(best.matched_tokens, 0), prompt) > min(max(local.matched_tokens, 0), prompt)
    reason = REASON_PREFIX if gained else REASON_LOAD
    return Decision(best.node_id, True, reason, tuple(scores), est_local, best_est)
