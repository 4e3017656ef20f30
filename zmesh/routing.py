"""Routing policies as pure, deterministic functions.

`decide(request, candidates, settings, state)` picks the node that serves one request.
It does no I/O and reads no clock; the only mutable input is the caller's
`PolicyState` (round-robin counter and a seeded RNG), so a decision can be replayed
in tests and in the simulator. Block matching, load and link-delay measurement happen
elsewhere: candidates arrive with their numbers already estimated.

The `zmesh` policy scores each candidate by its expected time to first token::

    est = link_delay_s + queue_depth * service_s + (prompt_tokens - matched) * prefill_s_per_token

A prefix every node already holds (a global system prompt) adds the same saving to
every estimate, so it cancels out and load decides: no affinity hotspot.

Placement: when several of the nodes holding the longest match are about equally
good (within `place_slack_frac` of the best estimate), the request goes to the one
that wins a rendezvous hash of the first block past that match. So a prefix nobody
holds yet is cached on one node whichever node it entered by, distinct new prefixes
spread over every node's cache instead of piling up where they entered, and requests
for a prefix several nodes hold spread over those copies. When the longest holders
are all busy, the estimates decide (docs/evaluation.md, "Placement").
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

__all__ = [
    "CONSISTENT_HASH",
    "LEAST_LOADED",
    "POLICIES",
    "RANDOM",
    "REASONS",
    "REASON_CONSISTENT_HASH",
    "REASON_HOP_LIMIT",
    "REASON_LEAST_LOADED",
    "REASON_LOAD",
    "REASON_LOCAL_BEST",
    "REASON_NO_PEERS",
    "REASON_PLACEMENT",
    "REASON_PREFIX",
    "REASON_RANDOM",
    "REASON_ROUND_ROBIN",
    "ROUND_ROBIN",
    "ZMESH",
    "Candidate",
    "Decision",
    "PolicyState",
    "RouteRequest",
    "RoutingSettings",
    "decide",
    "estimate_s",
    "is_overloaded",
    "placement_rank",
    "ring_position",
]

# Reason codes: stable strings, they appear in logs and in every reply's provenance.
REASON_HOP_LIMIT = "hop_limit"
REASON_NO_PEERS = "no_peers"
REASON_LOCAL_BEST = "local_best"
REASON_PREFIX = "prefix"
REASON_LOAD = "load"
REASON_PLACEMENT = "placement"
REASON_RANDOM = "random"
REASON_ROUND_ROBIN = "round_robin"
REASON_CONSISTENT_HASH = "consistent_hash"
REASON_LEAST_LOADED = "least_loaded"
REASONS = (
    REASON_HOP_LIMIT,
    REASON_NO_PEERS,
    REASON_LOCAL_BEST,
    REASON_PREFIX,
    REASON_LOAD,
    REASON_PLACEMENT,
    REASON_RANDOM,
    REASON_ROUND_ROBIN,
    REASON_CONSISTENT_HASH,
    REASON_LEAST_LOADED,
)

ZMESH = "zmesh"
RANDOM = "random"
ROUND_ROBIN = "round_robin"
CONSISTENT_HASH = "consistent_hash"
LEAST_LOADED = "least_loaded"
POLICIES = (ZMESH, RANDOM, ROUND_ROBIN, CONSISTENT_HASH, LEAST_LOADED)

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Candidate:
    """One node that could serve the request, as this node currently sees it."""

    node_id: str
    is_local: bool
    matched_tokens: int
    queue_depth: int
    link_delay_s: float
    prefill_s_per_token: float
    service_s: float
    alive: bool = True
    wait_s: float | None = None  # predicted queueing delay; None: queue_depth * service_s


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know about a request (not its tokens)."""

    prompt_tokens: int
    hops: int
    head_key: int  # 64-bit key of the prompt head, for consistent_hash
    # The prompt's chained block ids (zmesh placement); empty: no placement.
    block_ids: Sequence[int] = ()
    block_size: int = 16


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Policy knobs. Validated on construction so a bad config fails at load time."""

    policy: str = ZMESH
    max_hops: int = 1
    min_gain_s: float = 0.005
    # Relative bar too: a gain within measurement noise of the local estimate (e.g.
    # two identical nodes whose measured prefill rates differ by a few %) must not
    # pull cold traffic onto whichever node measured fastest.
    min_gain_frac: float = 0.0
    # Nodes whose estimate is within this fraction of the best one count as equally
    # good; among those holding the longest match the placement hash chooses.
    place_slack_frac: float = 0.1
    balance_abs: int = 8
    balance_rel: float = 1.5
    vnodes: int = 64

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(_unknown_policy(self.policy))
        if self.max_hops < 0:
            raise ValueError(f"max_hops must be >= 0, got {self.max_hops}")
        if self.min_gain_s < 0:
            raise ValueError(f"min_gain_s must be >= 0, got {self.min_gain_s}")
        if not 0.0 <= self.min_gain_frac < 1.0:
            raise ValueError(f"min_gain_frac must be in [0, 1), got {self.min_gain_frac}")
        if not 0.0 <= self.place_slack_frac < 1.0:
            raise ValueError(f"place_slack_frac must be in [0, 1), got {self.place_slack_frac}")
        if self.balance_abs < 0:
            raise ValueError(f"balance_abs must be >= 0, got {self.balance_abs}")
        if self.balance_rel < 1.0:
            raise ValueError(f"balance_rel must be >= 1.0, got {self.balance_rel}")
        if self.vnodes < 1:
            raise ValueError(f"vnodes must be >= 1, got {self.vnodes}")


@dataclass(slots=True)
class PolicyState:
    """The only mutable input of `decide`: owned by one node, passed in each call."""

    rng: random.Random = field(default_factory=lambda: random.Random(0))
    rr_counter: int = 0

    @classmethod
    def seeded(cls, seed: int) -> PolicyState:
        return cls(rng=random.Random(seed))


@dataclass(frozen=True, slots=True)
class Decision:
    """Where the request goes and why; `log_fields()` feeds the "route.decided" line."""

    target: str
    forward: bool
    reason: str
    scores: tuple[tuple[str, float], ...]  # (node_id, estimate_s): local first, then peers
    est_local_s: float
    est_target_s: float
    overloaded: tuple[str, ...] = ()  # peers excluded by the balance thresholds (zmesh)

    def log_fields(self) -> dict[str, object]:
        return {
            "target": self.target,
            "forward": self.forward,
            "reason": self.reason,
            "est_local_s": round(self.est_local_s, 6),
            "est_target_s": round(self.est_target_s, 6),
            "scores": {node: round(est, 6) for node, est in self.scores},
            "overloaded": list(self.overloaded),
        }


def estimate_s(c: Candidate, prompt_tokens: int) -> float:
    """Expected time to first token on `c`; matches are clamped to [0, prompt_tokens]."""
    matched = min(max(c.matched_tokens, 0), prompt_tokens)
    wait = max(c.queue_depth, 0) * c.service_s if c.wait_s is None else max(c.wait_s, 0.0)
    return c.link_delay_s + wait + (prompt_tokens - matched) * c.prefill_s_per_token


def gain_threshold(est_local: float, settings: RoutingSettings) -> float:
    """How much sooner a peer must be expected to answer before we forward to it."""
    return max(settings.min_gain_s, settings.min_gain_frac * est_local)


def is_overloaded(queue: int, min_queue: int, settings: RoutingSettings) -> bool:
    """SGLang router's rule: both the absolute and the relative imbalance must be exceeded."""
    return queue - min_queue > settings.balance_abs and queue > settings.balance_rel * min_queue


def placement_rank(key: int, node_id: str) -> int:
    """Rendezvous (highest random weight) score of ``node_id`` for a placement key."""
    x = (key ^ _node_hash(node_id)) & _MASK64
    # splitmix64's finalizer: cheap, and every input bit moves every output bit.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=4096)
def _node_hash(node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(node_id.encode(), digest_size=8).digest(), "little")


def ring_position(node_id: str, i: int) -> int:
    """Stable 64-bit ring position of virtual node i (same in every process)."""
    digest = hashlib.blake2b(f"{node_id}#{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@lru_cache(maxsize=64)
def _ring(node_ids: tuple[str, ...], vnodes: int) -> tuple[list[int], list[str]]:
    """Sorted ring positions and their owners, built once per (sorted node set, vnodes)."""
    points = sorted((ring_position(n, i), n) for n in node_ids for i in range(vnodes))
    return [p for p, _ in points], [n for _, n in points]


def _unknown_policy(policy: str) -> str:
    return f"unknown routing policy {policy!r}; known: {', '.join(POLICIES)}"


def decide(
    request: RouteRequest,
    candidates: Sequence[Candidate],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    """Choose the serving node. Raises ValueError on a bad candidate list or policy."""
    policy = _POLICY_FNS.get(settings.policy)
    if policy is None:
        raise ValueError(_unknown_policy(settings.policy))
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
        return _local(local, REASON_HOP_LIMIT, scores, est_local)
    if not peers:
        return _local(local, REASON_NO_PEERS, scores, est_local)
    return policy(request, local, peers, scores, settings, state)


def _local(
    local: Candidate,
    reason: str,
    scores: list[tuple[str, float]],
    est_local: float,
    overloaded: tuple[str, ...] = (),
) -> Decision:
    return Decision(local.node_id, False, reason, tuple(scores), est_local, est_local, overloaded)


def _baseline(
    target: str, reason: str, local: Candidate, scores: list[tuple[str, float]]
) -> Decision:
    est_target = next(est for node, est in scores if node == target)
    return Decision(
        target, target != local.node_id, reason, tuple(scores), scores[0][1], est_target
    )


_Scores = list[tuple[str, float]]
_PolicyFn = Callable[
    [RouteRequest, Candidate, list[Candidate], _Scores, RoutingSettings, PolicyState], Decision
]


def _zmesh(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
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
    for p, (_, est) in zip(peers, scores[1:], strict=True):
        if is_overloaded(p.queue_depth, min_queue, settings):
            overloaded.append(p.node_id)
            continue
        eligible.append((p, est))
        if best is None or est < best_est or (est == best_est and p.node_id < best.node_id):
            best, best_est = p, est
    placed = _place(request, eligible, settings)
    if placed is not None:
        target, est_target = placed
        if target is local:
            return _local(local, REASON_LOCAL_BEST, scores, est_local, tuple(overloaded))
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
        return _local(local, REASON_LOCAL_BEST, scores, est_local, tuple(overloaded))
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


def _place(
    request: RouteRequest,
    eligible: list[tuple[Candidate, float]],
    settings: RoutingSettings,
) -> tuple[Candidate, float] | None:
    """The placement choice among ``eligible`` (local first), or None if it has none.

    The nodes holding the most whole blocks of the prompt (of all eligible ones) whose
    estimate is within ``place_slack_frac`` of the lowest: if two or more, the top
    rendezvous rank for the first block past that match, so requests that share it
    meet on one node wherever they entered. None when the prompt has no block there,
    or fewer than two of the longest holders are near the best: then the estimates
    decide (a busy holder must not make the hash copy its prefix onto another node).
    """
    ids, bs = request.block_ids, request.block_size
    if settings.place_slack_frac <= 0.0 or not ids or bs < 1:
        return None
    prompt = max(request.prompt_tokens, 0)
    blocks = [min(max(c.matched_tokens, 0), prompt) // bs for c, _ in eligible]
    longest = max(blocks)
    if longest >= len(ids):
        return None  # the whole prompt is cached there: nothing new to place
    lowest = min(est for _, est in eligible)
    bar = lowest + settings.place_slack_frac * lowest
    tied = [ce for ce, b in zip(eligible, blocks, strict=True) if b == longest and ce[1] <= bar]
    if len(tied) < 2:
        return None
    key = ids[longest]
    return max(tied, key=lambda ce: (placement_rank(key, ce[0].node_id), ce[0].node_id))


def _pool(local: Candidate, peers: list[Candidate]) -> list[str]:
    """Local + alive peers, sorted so the caller's ordering never changes the outcome."""
    return sorted([local.node_id, *(p.node_id for p in peers)])


def _random(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    ids = _pool(local, peers)
    return _baseline(ids[state.rng.randrange(len(ids))], REASON_RANDOM, local, scores)


def _round_robin(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    ids = _pool(local, peers)
    target = ids[state.rr_counter % len(ids)]
    state.rr_counter += 1
    return _baseline(target, REASON_ROUND_ROBIN, local, scores)


def _consistent_hash(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    positions, owners = _ring(tuple(_pool(local, peers)), settings.vnodes)
    i = bisect.bisect_left(positions, request.head_key & _MASK64)
    target = owners[i % len(owners)]  # first point clockwise, wrapping past the top
    return _baseline(target, REASON_CONSISTENT_HASH, local, scores)


def _least_loaded(
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
    return _baseline(best.node_id, REASON_LEAST_LOADED, local, scores)


_POLICY_FNS: dict[str, _PolicyFn] = {
    ZMESH: _zmesh,
    RANDOM: _random,
    ROUND_ROBIN: _round_robin,
    CONSISTENT_HASH: _consistent_hash,
    LEAST_LOADED: _least_loaded,
}
