"""The ``paper`` policy: the P2P paper's design, the longest estimated prefix wins.

Algorithm (arXiv 2606.17059, "Towards Distributed Inference of LLMs on a P2P
Network"): every candidate's estimate is the prefill it would still need::

    est = (prompt_tokens - matched_tokens) * prefill_s_per_token

blind to link delay, queues and backlog. The lowest estimate wins (ties among peers:
the smallest node id); a peer is chosen only when strictly better than this node, so
ties stay here. No balance rule, no placement, no give-up, no gain threshold.

Parameters: none (the `RoutingSettings` knobs of the ``zmesh`` policy are ignored).
The simulator runs it as the comparison the study is built on (``zmesh sim``).

Reasons: ``local_best``, ``prefix`` (the peer holds more of the prompt), ``load``
(the same match at a faster-measured peer).
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


def decide_paper(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    prompt = max(request.prompt_tokens, 0)

    def cached(c: Candidate) -> int:
        return min(max(c.matched_tokens, 0), prompt)

    est_local = (prompt - cached(local)) * local.prefill_s_per_token
    best: Candidate | None = None
    best_est = 0.0
    for p in peers:
        est = (prompt - cached(p)) * p.prefill_s_per_token
        if best is None or est < best_est or (est == best_est and p.node_id < best.node_id):
            best, best_est = p, est
    if best is None or not est_local - best_est > 0.0:
        return serve_local(local, REASON_LOCAL_BEST, scores, est_local)
    reason = REASON_PREFIX if cached(best) > cached(local) else REASON_LOAD
    return Decision(best.node_id, True, reason, tuple(scores), est_local, best_est)
