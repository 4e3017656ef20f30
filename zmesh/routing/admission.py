"""Holder-side admission of forwards: a peer taken by a burst says "busy" instead of queueing.

Why: an entry node routes on a load picture that gossip refreshes once per heartbeat,
plus the forwards it sent itself. When a burst of requests for conversations held by
one node arrives at the same instant at different entry nodes, every entry sees that
holder as free and forwards to it; only the holder sees the herd, and each long decode
makes the next member of it wait (docs/evaluation.md, "Bursts").

Algorithm:

1. The forwarder attaches a bar to each forward (`admission_bar`): the latest first
   token it still prefers to the peer's, in seconds from its decision. That is its own
   estimate of serving the request itself (``est_local_s`` of the decision), or the
   estimate it had for the peer when that was higher (placement may choose a node a
   little slower than this one), plus the slack below.
2. The peer, on receipt, estimates its own first token with what only it knows exactly:
   its current backlog and its real cached prefix (`estimate_s` of its local
   candidate; no link delay, which both sides pay alike). `admit` refuses when that
   exceeds the bar. The refusal is one short reply ("busy", before any token).
3. The forwarder decides again without the peers that refused the request
   (`after_refusal`: the runner-up, with a bar of its own), up to ``admit_retries``
   refusals; then, or when no peer is worth a forward any more, it serves the request
   itself (reason ``refused``). The request never executes twice: a peer refuses
   before queueing it, so at most one forward of it is ever held by a peer, and a
   refusal the forwarder no longer waits for is ignored. A stale bar costs a round
   trip and, at worst, a cache miss, never a lost or duplicate answer.

Forwarder and peer compare first tokens as seen by the forwarder: serving at the peer
costs link + wait + prefill + link back; a refusal costs link + link back + the local
estimate. The links cancel, so the comparison is of the two estimates alone.

With ``admit_evictions`` both estimates also count the prefill of the cached tokens
that serving the request there would overwrite (the slot the engine's policy would
take: `Engine.evict_tokens`, the simulator's `SlotCache.evicted_tokens`), as the
oracle charges evictions: the forwarder adds its own to the bar, the peer its own to
its estimate. It is off by default: on MMLU (prefixes that stay hot) it moves cold
copies to where they evict less (16 nodes: 5-12 % lower mean TTFT over 8 seeds); on
conversations the slot a peer would evict mostly holds one that has ended, the charge
is noise of several seconds, and refusals that lose a held system prompt more than
double (docs/evaluation.md, "Bursts").

Parameters (`RoutingSettings`):
- ``admission`` (on): attach bars to forwards (zmesh policy only: the baselines make
  no estimates to hold a peer to), and refuse forwards past their bar. A forward
  without a bar (a node with admission off, or an older node) is always admitted.
- ``admit_retries`` (1): runner-ups the forwarder asks after refusals; one more refusal
  and it serves the request itself; 0: always serve a refused request here.
- ``admit_evictions`` (off): count evictions on both sides (above).
- ``admit_slack_frac`` (0.0) and ``admit_slack_s`` (0.0): the bar is raised by this
  fraction of itself plus these seconds. A refusal moves the request, and so a copy of
  its prefix, to the forwarder: cache affinity and the refusal's round trip argue for
  a margin; the measurements in docs/evaluation.md argue for how much.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace

from zmesh.routing.base import (
    REASON_REFUSED,
    ZMESH,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    estimate_s,
)
from zmesh.routing.registry import decide


def admission_bar(
    decision: Decision, settings: RoutingSettings, evict_s: float = 0.0
) -> float | None:
    """The bar to send with a forward: refuse it if your first token comes later than
    this many seconds after you receive it; None: no bar (admission off, or no forward).

    ``evict_s``: the prefill of what serving the request here would overwrite (this
    node's cached tokens that its slot choice would evict, times its prefill rate),
    counted with ``admit_evictions``.
    """
    if not settings.admission or settings.policy != ZMESH or not decision.forward:
        return None
    here = decision.est_local_s + (max(evict_s, 0.0) if settings.admit_evictions else 0.0)
    bar = max(here, decision.est_target_s, 0.0)
    return bar * (1.0 + settings.admit_slack_frac) + settings.admit_slack_s


def admit(
    local: Candidate,
    prompt_tokens: int,
    bar_s: float | None,
    settings: RoutingSettings,
    evict_tokens: int = 0,
) -> tuple[bool, float]:
    """(admitted, this node's estimate) for a forward carrying ``bar_s``.

    ``local`` is this node's own candidate, built as for routing: its backlog now as
    ``wait_s`` (or queue x service), its real match, its prefill rate.
    ``evict_tokens``: this node's cached tokens that serving the request would
    overwrite; with ``admit_evictions`` their prefill counts in the estimate. Without
    a bar the forward is admitted (the forwarder asked for no admission check).
    """
    est = estimate_s(local, max(prompt_tokens, 0)) - local.link_delay_s
    if settings.admit_evictions:
        est += max(evict_tokens, 0) * local.prefill_s_per_token
    if bar_s is None:
        return True, est
    return est <= bar_s, est


def after_refusal(
    request: RouteRequest,
    candidates: Sequence[Candidate],
    refused: Collection[str],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    """Where a forward goes once the peers in ``refused`` have refused it (in order).

    Past ``admit_retries`` refusals: serve here. Otherwise `decide` again with those
    peers left out (as if down): a forward to the runner-up keeps its own reason, and
    a decision to serve here becomes reason ``refused``.
    """
    rest = [replace(c, alive=False) if c.node_id in refused else c for c in candidates]
    decision = decide(request, rest, settings, state)  # validates the candidates too
    if decision.forward and len(refused) <= settings.admit_retries:
        return decision
    return _served_here(decision, next(c for c in candidates if c.is_local))


def _served_here(decision: Decision, local: Candidate) -> Decision:
    return Decision(
        local.node_id,
        False,
        REASON_REFUSED,
        decision.scores,
        decision.est_local_s,
        decision.est_local_s,
        decision.overloaded,
    )
