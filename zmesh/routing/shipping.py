"""KV shipping inside the ``zmesh`` policy: pull a peer's cached prefix, then serve here.

Algorithm: for every alive peer that holds at least ``ship_min_tokens`` more of the
prompt than this node and whose KV can be pulled (``ship_s_per_token`` set), predict::

    ship_s = ship_fixed_s + matched_peer * ship_s_per_token
    est    = max(wait_here, ship_s) + (prompt_tokens - matched_peer) * prefill_here
             + evict_charge_s

The fetch runs while the request waits in this node's queue, hence the max. The
import lands in a slot (a free one, else the least recently used): ``evicted_here``
(the local candidate's ``ship_evict_tokens``) is what it overwrites, prefilled again
by whoever needs it next, as the oracle charges evictions; without that charge the
simulator's MMLU runs (4 slots per node) lost more to evicted subjects than the pulls
saved (docs/evaluation.md, "Simulator: KV shipping"). With ``ship_evict_pull_back``,
evicted tokens a pullable peer also holds (``ship_evict_held``) are charged as
pulling them back from it instead,
where that is cheaper (`evict_charge_s`): the mesh still has them, so losing them
here costs at most a pull later, not a prefill; over a slow link the pull back costs
as much as the prefill and the charge stays whole. The
per-token cost is bytes per token / the link's measured bandwidth plus the measured
import seconds per token (`zmesh.kvtransfer.ShipCosts`); the fixed part is the round
trip plus the holder's pause between decode steps. The lowest ``est`` is the pull
candidate; `zmesh.py` takes it only when it beats serving here and forwarding by the
gain threshold. On a slow link ``ship_s_per_token`` is large and a pull never wins.

Parameters (`RoutingSettings`): ``ship`` (off), ``ship_min_tokens`` (64),
``ship_evict_pull_back`` (off: docs/evaluation.md, "the eviction charge"),
``ship_max_tokens`` (the engine's sliding window for models that have one: llama.cpp
exports no cell older than the window, so a longer prefix cannot travel whole; the
rest of the prompt is prefilled after the import).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from zmesh.routing.base import Candidate, RouteRequest, RoutingSettings, estimate_s


class BlockHolder(Protocol):
    """A peer as this node estimates it (`zmesh.peers.PeerEstimate`)."""

    @property
    def node_id(self) -> str: ...

    def match_blocks(self, block_ids: Sequence[int]) -> int: ...


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
    evict_s = evict_charge_s(local, peers, settings)
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


def evict_charge_s(local: Candidate, peers: list[Candidate], settings: RoutingSettings) -> float:
    """Seconds a pull's import costs later by what it evicts here.

    Without ``settings.ship_evict_pull_back``: a prefill of all of it.
    The evicted tokens (``local.ship_evict_tokens``) are prefilled again by whoever
    needs them next, unless a peer among ``peers`` that can be pulled from holds a
    leading part of them (``local.ship_evict_held``): then the cheapest of pulling that
    part back from it (at most ``ship_max_tokens``, the rest prefilled) and prefilling
    all. A holder absent from ``peers`` is not priced: it is charged as a prefill.
    """
    evicted = max(local.ship_evict_tokens, 0)
    prefill = local.prefill_s_per_token
    best = evicted * prefill
    if not evicted or not local.ship_evict_held or not settings.ship_evict_pull_back:
        return best
    pullable = {p.node_id: p for p in peers if p.alive and p.ship_s_per_token is not None}
    for node_id, held in local.ship_evict_held:
        p = pullable.get(node_id)
        if p is None or p.ship_s_per_token is None:
            continue
        back = min(max(held, 0), evicted)
        if settings.ship_max_tokens:
            back = min(back, settings.ship_max_tokens)
        cost = p.ship_fixed_s + back * p.ship_s_per_token + (evicted - back) * prefill
        best = min(best, cost)
    return best


def evict_held(
    peers: Iterable[BlockHolder], victim_ids: Sequence[int], block_size: int
) -> tuple[tuple[str, int], ...]:
    """``Candidate.ship_evict_held``: the peers whose estimates hold a leading part of
    what an import would evict here (``victim_ids``, its block ids), in tokens."""
    if not victim_ids:
        return ()
    held = ((p.node_id, p.match_blocks(victim_ids) * block_size) for p in peers)
    return tuple((node_id, n) for node_id, n in held if n > 0)


def evict_log_fields(local: Candidate) -> dict[str, object]:
    """The decision log's fields for the eviction charge (``route.decided``)."""
    return {"ship_evicts": local.ship_evict_tokens, "ship_held": dict(local.ship_evict_held)}
