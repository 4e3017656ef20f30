"""The ``zmesh`` policy: lowest expected time to first token, with placement and balance.

Algorithm: every candidate (this node and each alive peer) gets an estimate::

    est = link_delay_s + wait_s + (prompt_tokens - matched_tokens) * prefill_s_per_token

where ``wait_s`` is the node's predicted backlog (``queue_depth * service_s`` when the
candidate has none). A prefix every node already holds (a global system prompt) adds
the same saving to every estimate, so it cancels out and load decides: no affinity
hotspot. Peers whose queue passes the balance thresholds (SGLang router's rule: both
the absolute and the relative imbalance over the least-loaded node), or whose estimate
is past the forwarder's give-up, are excluded.
Then placement (`placement.py`) may choose among near-equal longest holders; otherwise
the best peer wins if it beats the local estimate by the gain threshold, else the
request is served here.

Parameters (`RoutingSettings`):
- ``min_gain_s`` (0.005 s) and ``min_gain_frac`` (0.0): a peer must be expected to
  answer this much sooner (absolute, and as a fraction of the local estimate) to be
  worth a forward; the fraction keeps measurement noise between identical nodes from
  pulling cold traffic onto whichever measured fastest.
- ``balance_abs`` (8) and ``balance_rel`` (1.5): a peer is overloaded when its queue
  exceeds the least-loaded node's by more than ``balance_abs`` and is more than
  ``balance_rel`` times it.
- ``place_slack_frac`` (0.1): see `placement.py`.
- ``ship`` (off) and ``ship_min_tokens`` (64): KV shipping, see `shipping.py`; a pull
  replaces the choice above when predicted sooner by more than the gain threshold.
- ``evict_charge`` (0.25): each estimate also carries this share of the prefill of
  the cached tokens serving there would overwrite (`base.charged_s`: a candidate's
  advertised ``evict_tokens``, the slot a miss takes, unless it holds a tenth of the
  prompt); the decision's scores show it and ``evicts`` names the tokens. Off when the
  local candidate does not say its own (charging only peers would keep misses here).
- ``give_up_s`` (0: none): a peer whose estimate exceeds it is excluded too. For a
  forwarder that gives a forward up before its first token and serves it again itself
  (the simulator's ``--no-keepalive``, nodes before Progress keep-alives): under
  bursts of long requests that fallback, not the wait, was what cost most. Nodes wait
  for a forward while the peer sends Progress, so they set none.

Reasons: ``local_best``, ``prefix`` (the peer holds more of the prompt), ``load`` (same
match, shorter wait), ``placement``, ``shipped``.
"""

from __future__ import annotations

from dataclasses import replace

from zmesh.routing.base import (
    REASON_LOAD,
    REASON_LOCAL_BEST,
    REASON_PLACEMENT,
    REASON_PREFIX,
    REASON_SHIPPED,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    charged_s,
    evicts_tokens,
    gain_threshold,
    is_overloaded,
    serve_local,
)
from zmesh.routing.placement import place
from zmesh.routing.shipping import best_pull


def decide_zmesh(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    """Serve here or forward (below); with shipping on, pulling a peer's prefix here
    replaces that choice when it is predicted sooner by more than the gain threshold.
    With ``evict_charge`` every estimate also carries the charge for what serving
    there overwrites (`charged_s`), and the decision names those evictions."""
    if settings.evict_charge > 0.0 and local.evict_tokens is not None:
        decision = _charged(request, local, peers, scores, settings)
    else:
        decision = _serve_or_forward(request, local, peers, scores, settings)
    if not settings.ship:
        return decision
    pull = best_pull(request, local, peers, settings)
    if pull is None:
        return decision
    holder, tokens, est_pull, ship_s = pull
    if not decision.est_target_s - est_pull > gain_threshold(decision.est_target_s, settings):
        return decision
    return Decision(
        local.node_id,
        False,
        REASON_SHIPPED,
        tuple(scores),
        decision.est_local_s,
        est_pull,
        decision.overloaded,
        pull_from=holder.node_id,
        pull_tokens=tokens,
        est_ship_s=ship_s,
    )


def _charged(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
) -> Decision:
    """Serve or forward on estimates that carry the eviction charge (`charged_s`); the
    decision's ``est_local_s`` / ``est_target_s`` stay first-token estimates (what an
    admission bar and a pull compare), its ``scores`` the charged ones, ``evicts`` the
    tokens each choice would overwrite."""
    prompt = max(request.prompt_tokens, 0)
    cands = [local, *peers]  # aligned with scores
    charged = [(c.node_id, charged_s(c, prompt, settings)) for c in cands]
    d = _serve_or_forward(request, local, peers, charged, settings)
    first = dict(scores)
    return replace(
        d,
        est_local_s=first[local.node_id],
        est_target_s=first[d.target],
        evicts=tuple((c.node_id, evicts_tokens(c, prompt)) for c in cands),
    )


def _serve_or_forward(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
) -> Decision:
    """Lowest estimated TTFT wins, if it beats local by min_gain_s and is not a hotspot;
    among the longest holders about as good as the best, the placement hash chooses."""
    min_queue = min(local.queue_depth, min(p.queue_depth for p in peers))
    est_local = scores[0][1]
    best: Candidate | None = None
    best_est = 0.0
    overloaded: list[str] = []
    eligible: list[tuple[Candidate, float]] = [(local, est_local)]
    # scores[1:] is aligned with peers.
    give_up = settings.give_up_s or float("inf")
    for p, (_, est) in zip(peers, scores[1:], strict=True):
        if is_overloaded(p.queue_depth, min_queue, settings) or est > give_up:
            overloaded.append(p.node_id)
            continue
        eligible.append((p, est))
        if best is None or est < best_est or (est == best_est and p.node_id < best.node_id):
            best, best_est = p, est
    placed = place(request, eligible, settings)
    if placed is not None:
        target, est_target = placed
        if target is local:
            return serve_local(local, REASON_LOCAL_BEST, scores, est_local, tuple(overloaded))
        return Decision(
            target.node_id,
            True,
            REASON_PLACEMENT,
            tuple(scores),
            est_local,
            est_target,
            tuple(overloaded),
        )
    if best is None or not est_local - best_est > gain_threshold(est_local, settings):
        return serve_local(local, REASON_LOCAL_BEST, scores, est_local, tuple(overloaded))
    prompt = max(request.prompt_tokens, 0)
    gained = min(max(best.matched_tokens, 0), prompt) > min(max(local.matched_tokens, 0), prompt)
    return Decision(
        best.node_id,
        True,
        REASON_PREFIX if gained else REASON_LOAD,
        tuple(scores),
        est_local,
        best_est,
        tuple(overloaded),
    )
