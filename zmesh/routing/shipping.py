"""KV shipping inside the ``zmesh`` policy: pull a peer's cached prefix, then serve here.

Algorithm: for every alive peer that holds at least ``ship_min_tokens`` more of the
prompt than this node and whose KV can be pulled (``ship_s_per_token`` set), predict::

    ship_s = ship_fixed_s + matched_peer * ship_s_per_token
    est    = max(wait_here, ship_s) + (prompt_tokens - matched_peer) * prefill_here
             + evicted_here * prefill_here

The fetch runs while the request waits in this node's queue, hence the max. The
import lands in a slot (a free one, else the least recently used): ``evicted_here``
(the local candidate's ``ship_evict_tokens``) is what it overwrites, prefilled again
by whoever needs it next, as the oracle charges evictions; without that charge the
simulator's MMLU runs (4 slots per node) lost more to evicted subjects than the pulls
saved (docs/evaluation.md, "Simulator: KV shipping"). The
per-token cost is bytes per token / the link's measured bandwidth plus the measured
import seconds per token (`zmesh.kvtransfer.ShipCosts`); the fixed part is the round
trip plus the holder's pause between decode steps. The lowest ``est`` is the pull
candidate; `zmesh.py` takes it only when it beats serving here and forwarding by the
gain threshold. On a slow link ``ship_s_per_token`` is large and a pull never wins.

Parameters (`RoutingSettings`): ``ship`` (off), ``ship_min_tokens`` (64),
``ship_max_tokens`` (the engine's sliding window for models that have one: llama.cpp
exports no cell older than the window, so a longer prefix cannot travel whole; the
rest of the prompt is prefilled after the import).
"""

from __future__ import annotations

from zmesh.routing.base import Candidate, RouteRequest, RoutingSettings, estimate_s


def best_pull(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    settings: RoutingSettings,
) -> tuple[Candidate, int, float, float] | None:
    """(holder, tokens to pull, predicted TTFT, predicted ship seconds), or None."""
    prompt = max(request.prompt_tokens, 0)
    here = min(max(local.matched_tokens, 0), prompt)
    # The local estimate without its prefill: the wait (and link delay, 0 here).
    wait_here = estimate_s(local, prompt) - (prompt - here) * local.prefill_s_per_token
    # What the import evicts must be prefilled again by whoever needs it next.
    evict_s = max(local.ship_evict_tokens, 0) * local.prefill_s_per_token
    best: tuple[Candidate, int, float, float] | None = None
    for p in peers:
        if p.ship_s_per_token is None or not p.alive:
            continue
        # Keep one prompt token to decode: its logits start the answer.
        tokens = min(max(p.matched_tokens, 0), prompt - 1)
        if settings.ship_max_tokens:
            tokens = min(tokens, settings.ship_max_tokens)
        if tokens - here < settings.ship_min_tokens:
            continue
        ship_s = p.ship_fixed_s + tokens * p.ship_s_per_token
        est = max(wait_here, ship_s) + (prompt - tokens) * local.prefill_s_per_token + evict_s
        if best is None or est < best[2] or (est == best[2] and p.node_id < best[0].node_id):
            best = (p, tokens, est, ship_s)
    return best
