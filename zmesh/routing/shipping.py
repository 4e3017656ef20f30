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

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, replace
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


# ---- holder push --------------------------------------------------------------------
#
# A pull needs a request at the peer first; a holder whose queue is long on one prefix
# sees the demand before any peer does. `push_decision` (the holder) and `push_accept`
# (the offered peer) are the whole policy; node (`zmesh/kvpush.py`) and simulator
# (`zmesh/sim/push.py`) call them, and each log line carries `PushDecision.log_fields`.
#
#     tokens  = min(held, ship_max_tokens)               # what a state can carry
#     ship_s  = ship_fixed_s(p) + tokens * ship_s_per_token(p)
#     peer_s  = link_delay(p) + max(wait(p), ship_s)     # a request sent there once it
#               + (held - tokens) * prefill(p)           # holds it: the rest prefilled
#     gain    = wait_here - peer_s                       # what each later request saves
#
# Offer ``tokens`` (the hot prefix, ``held`` tokens cached here) to the peer with the
# lowest ``peer_s`` among those that can be pulled to, do not hold it already, and
# beat the wait here by the routing gain threshold (`RoutingSettings.min_gain_s`,
# `min_gain_frac`); only while no offer is in flight and ``ship_push_interval_s`` has
# passed since the last. The peer accepts only into a free slot (nothing evicted:
# a push is speculative, unlike a pull a request waits for) and a prefix it does not
# hold.

PUSH_OFF = "off"
PUSH_IN_FLIGHT = "in_flight"
PUSH_RATE_LIMITED = "rate_limited"
PUSH_NOT_HOT = "not_hot"
PUSH_TOO_SHORT = "too_short"
PUSH_NO_PEER = "no_peer"
PUSH_NO_GAIN = "no_gain"
PUSH_OFFER = "offer"
ACCEPT = "accepted"
REFUSE_OFF = "push_off"
REFUSE_HELD = "already_held"
REFUSE_NO_FREE_SLOT = "no_free_slot"
REFUSE_PULLING = "pulling"  # a pushed prefix is on its way here already: one at a time


@dataclass(frozen=True, slots=True)
class PushDecision:
    """Offer ``tokens`` of the hot prefix to ``to`` (None: no offer), and why."""

    why: str
    to: str | None = None
    tokens: int = 0
    queued: int = 0  # requests waiting here on the prefix
    wait_here_s: float = 0.0
    ship_s: float = 0.0  # to ``to`` (or the best peer seen, when no offer)
    peer_s: float = 0.0  # a request's start there once it holds the prefix
    bar_s: float = 0.0  # the gain an offer must beat

    def log_fields(self) -> dict[str, object]:
        return {
            "why": self.why,
            "to": self.to,
            "tokens": self.tokens,
            "queued": self.queued,
            "wait_here_s": round(self.wait_here_s, 6),
            "ship_s": round(self.ship_s, 6),
            "peer_s": round(self.peer_s, 6),
            "bar_s": round(self.bar_s, 6),
        }


def push_decision(
    held_tokens: int,
    queued: int,
    wait_here_s: float,
    peers: Sequence[Candidate],
    settings: RoutingSettings,
    *,
    in_flight: bool = False,
    since_last_s: float = math.inf,
    exclude: Collection[str] = (),
    full: Collection[str] = (),
    block_size: int = 1,
) -> PushDecision:
    """Whether a holder offers its hot prefix to an idle peer (pure).

    ``held_tokens``: the prefix held here that ``queued`` waiting requests share (what
    of it is past ``ship_max_tokens`` the peer would prefill: charged to it);
    ``wait_here_s``: what a new request for it waits here (the node's backlog);
    ``peers``: peer candidates whose ``matched_tokens`` is their estimated match of
    that prefix and whose ``ship_*`` fields price moving it to them (None: cannot);
    ``exclude``: peers with an offer of it pending or just refused; ``full``: peers
    whose last heartbeat had no empty slot (they would refuse: `push_accept`);
    ``block_size``: the offer is whole blocks of the prefix."""
    if not settings.ship_push:
        return PushDecision(PUSH_OFF)
    if in_flight:
        return PushDecision(PUSH_IN_FLIGHT)
    if since_last_s < settings.ship_push_interval_s:
        return PushDecision(PUSH_RATE_LIMITED)
    tokens = max(held_tokens, 0)
    if settings.ship_max_tokens:
        tokens = min(tokens, settings.ship_max_tokens)
    tokens -= tokens % max(block_size, 1)  # whole blocks travel (`hot_prefix`)
    base = PushDecision(PUSH_NOT_HOT, tokens=tokens, queued=queued, wait_here_s=wait_here_s)
    if queued < settings.ship_push_min_queued:
        return base
    if tokens < settings.ship_min_tokens:
        return replace(base, why=PUSH_TOO_SHORT)
    bar = max(settings.min_gain_s, settings.min_gain_frac * wait_here_s)
    best: tuple[float, float, str] | None = None  # (peer_s, ship_s, node_id)
    for p in peers:
        if p.is_local or not p.alive or p.ship_s_per_token is None:
            continue
        if p.node_id in exclude or p.node_id in full:
            continue
        if tokens - max(p.matched_tokens, 0) < settings.ship_min_tokens:
            continue  # holds (about) as much already
        ship_s = p.ship_fixed_s + tokens * p.ship_s_per_token
        wait = p.wait_s if p.wait_s is not None else p.queue_depth * p.service_s
        rest = max(held_tokens - tokens, 0) * p.prefill_s_per_token
        peer_s = p.link_delay_s + max(wait, ship_s) + rest
        if best is None or (peer_s, p.node_id) < (best[0], best[2]):
            best = (peer_s, ship_s, p.node_id)
    if best is None:
        return replace(base, why=PUSH_NO_PEER, bar_s=bar)
    peer_s, ship_s, node_id = best
    out = replace(base, ship_s=ship_s, peer_s=peer_s, bar_s=bar)
    if wait_here_s - peer_s <= bar:
        return replace(out, why=PUSH_NO_GAIN)
    return replace(out, why=PUSH_OFFER, to=node_id)


def push_accept(
    offered_tokens: int,
    held_here: int,
    free_slots: int,
    settings: RoutingSettings,
    *,
    pulling: bool = False,
) -> str:
    """The offered peer's answer (pure): `ACCEPT`, or why it refuses. It takes the
    prefix only into a free slot (nothing evicted), only if it does not hold it, and
    only while no other pushed prefix is on its way (``pulling``)."""
    if not settings.ship_push:
        return REFUSE_OFF
    if pulling:
        return REFUSE_PULLING
    if offered_tokens - max(held_here, 0) < settings.ship_min_tokens:
        return REFUSE_HELD
    if free_slots < 1:
        return REFUSE_NO_FREE_SLOT
    return ACCEPT


def hot_prefix(
    waiting: Iterable[tuple[int, Sequence[int], int]], block_size: int, settings: RoutingSettings
) -> tuple[int, int, int, int] | None:
    """The hot prefix of a holder's queue (pure): ``waiting`` holds, per waiting request,
    (tokens of it cached here, its block ids, its prompt length). Each counts for the
    whole blocks of its cached part (at most ``ship_max_tokens``, one prompt token left
    to decode) if that reaches ``ship_min_tokens``; the prefix most requests share
    (then the longest) wins. Returns (index into ``waiting`` of a request holding it,
    its blocks, the requests sharing it, the fewest tokens one of them has cached here
    past the cap too: `push_decision`'s ``held_tokens``), or None."""
    groups: dict[int, list[int]] = {}  # last block id -> [i, blocks, count, least held]
    for i, (held, ids, prompt) in enumerate(waiting):
        full = min(max(held, 0), max(prompt - 1, 0))
        n = min(full, settings.ship_max_tokens) if settings.ship_max_tokens else full
        n = min(n // block_size, len(ids))
        if n * block_size < settings.ship_min_tokens:
            continue
        full = max(full, n * block_size)
        g = groups.get(ids[n - 1])
        if g is None:
            groups[ids[n - 1]] = [i, n, 1, full]
        else:
            g[2] += 1
            g[3] = min(g[3], full)
    best = max(groups.values(), key=lambda g: (g[2], g[1], -g[0]), default=None)
    return (best[0], best[1], best[2], best[3]) if best is not None else None
