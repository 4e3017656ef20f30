"""What every routing policy shares: the inputs, the decision, reason codes, the estimate.

Policies are pure, deterministic functions (one file each in this package). They do no
I/O and read no clock; the only mutable input is the caller's `PolicyState`
(round-robin counter and a seeded RNG), so a decision can be replayed in tests and in
the simulator. Block matching, load and link-delay measurement happen elsewhere:
candidates arrive with their numbers already estimated.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
REASON_SHIPPED = "shipped"
REASON_REFUSED = "refused"  # a forward the peer refused as busy, served here (admission.py)
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
    REASON_SHIPPED,
    REASON_REFUSED,
)

ZMESH = "zmesh"
RANDOM = "random"
ROUND_ROBIN = "round_robin"
CONSISTENT_HASH = "consistent_hash"
LEAST_LOADED = "least_loaded"
PAPER = "paper"
ORACLE = "oracle"
# What a node may be configured with.
POLICIES = (ZMESH, RANDOM, ROUND_ROBIN, CONSISTENT_HASH, LEAST_LOADED)
# Every registered policy: the node's, plus two that model others' designs (the P2P
# paper's, and a router with exact knowledge whose candidates a node cannot build).
ALL_POLICIES = (*POLICIES, PAPER, ORACLE)

MASK64 = (1 << 64) - 1


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
    # KV shipping (peers only): seconds per token to bring this peer's cached prefix
    # here and load it (wire + import), and the fixed part (round trip, the holder's
    # pause between its decode steps). None: this peer's KV cannot be pulled.
    ship_s_per_token: float | None = None
    ship_fixed_s: float = 0.0
    # KV shipping (local only): cached tokens that importing a pulled prefix here would
    # overwrite (the slot it lands in); their prefill is charged to the pull, as the
    # oracle charges evictions. 0: a free slot, or not known.
    ship_evict_tokens: int = 0
    # KV shipping (local only): alive peers that also hold a leading part of those
    # evicted tokens, (node_id, tokens): what they hold can be pulled back rather than
    # prefilled (`shipping.evict_charge_s`). Empty: no peer holds any, or not known.
    ship_evict_held: tuple[tuple[str, int], ...] = ()
    # Cached tokens a request this node holds little of would overwrite here: the slot
    # its slot policy takes for a miss (0: a slot is free; a peer that did not say).
    # The ``zmesh`` policy charges their prefill with ``evict_charge`` (`charged_s`),
    # only when the local candidate says (None: this caller does not know its own, and
    # charging only the peers would keep every miss here).
    evict_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What routing needs to know about a request (not its tokens)."""

    prompt_tokens: int
    hops: int
    head_key: int  # 64-bit key of the prompt head, for consistent_hash
    # The prompt's chained block ids (zmesh placement); empty: no placement.
    block_ids: Sequence[int] = ()
    block_size: int = 16


class SettingError(ValueError):
    """A routing setting out of range: ``name`` and ``reason`` (the config names the key)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"{name} {reason}")
        self.name = name
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RoutingSettings:
    """Policy knobs. Validated on construction so a bad config fails at load time.

    The one source of routing defaults: a node's ``[routing]`` config takes its
    defaults from here (`zmesh.config.RoutingConfig`), and so does the simulator.
    """

    policy: str = ZMESH
    max_hops: int = 1
    min_gain_s: float = 0.005
    # Relative bar too: a gain within measurement noise of the local estimate (e.g.
    # two identical nodes whose measured prefill rates differ by a few %) must not
    # pull cold traffic onto whichever node measured fastest.
    min_gain_frac: float = 0.1
    # Nodes whose estimate is within this fraction of the best one count as equally
    # good; among those holding the longest match the placement hash chooses.
    place_slack_frac: float = 0.1
    # The forwarder's give-up (node: routing.forward_timeout_s to the peer's first
    # reply): a peer expected to answer later than this is no target, since the forward
    # would be served here anyway, after that wait (docs/evaluation.md, "Bursts").
    # 0: no limit.
    give_up_s: float = 0.0
    balance_abs: int = 8
    balance_rel: float = 1.5
    vnodes: int = 64
    # KV shipping (zmesh policy): pull a peer's cached prefix when moving it is
    # predicted to beat both prefilling here and forwarding; off unless switched on.
    ship: bool = False
    ship_min_tokens: int = 64  # smaller gains are not worth a transfer
    ship_max_tokens: int = 0  # the most a state can carry (the engine's window); 0: no cap
    # Charge evicted tokens a pullable peer also holds as a pull back, not a prefill
    # (`shipping.evict_charge_s`); off: the whole evicted slot is charged as a prefill.
    ship_evict_pull_back: bool = False
    # Holder push (`shipping.push_decision`): a busy holder of a hot prefix offers it to
    # an idle peer, which pulls it into a free slot; off unless switched on.
    ship_push: bool = False
    ship_push_min_queued: int = 2  # requests waiting here on one prefix make it hot
    ship_push_interval_s: float = 1.0  # at most one offer per this many seconds
    # Holder-side admission (admission.py): a forward carries the latest first token its
    # forwarder still prefers to serving it itself; a peer past that refuses it as busy.
    admission: bool = True
    admit_retries: int = 1  # refusals after which the forwarder serves it itself
    admit_slack_frac: float = 0.0  # the bar is raised by this fraction of itself...
    admit_slack_s: float = 0.0  # ...and by these seconds
    # Both sides also count the prefill of what serving the request would evict, as
    # the oracle does (off: it helps long-lived prefixes, hurts conversations; see
    # admission.py and docs/evaluation.md, "Bursts").
    admit_evictions: bool = False
    # The eviction charge (zmesh policy): a choice costs, beside its first token, this
    # share of the prefill of the cached tokens it would overwrite (`charged_s`; the
    # oracle charges all of it: what is overwritten is not always asked for again);
    # 0: off (docs/evaluation.md, "Three requests in flight").
    evict_charge: float = 0.25

    def __post_init__(self) -> None:
        if self.policy not in ALL_POLICIES:
            raise ValueError(unknown_policy(self.policy))
        for name, ok, reason in (
            ("max_hops", self.max_hops >= 0, ">= 0"),
            ("min_gain_s", 0.0 <= self.min_gain_s < math.inf, ">= 0"),
            ("min_gain_frac", 0.0 <= self.min_gain_frac < 1.0, "in [0, 1)"),
            ("place_slack_frac", 0.0 <= self.place_slack_frac < 1.0, "in [0, 1)"),
            ("give_up_s", 0.0 <= self.give_up_s < math.inf, ">= 0 and finite"),
            ("balance_abs", self.balance_abs >= 0, ">= 0"),
            ("balance_rel", 1.0 <= self.balance_rel < math.inf, ">= 1.0"),
            ("vnodes", self.vnodes >= 1, ">= 1"),
            ("ship_min_tokens", self.ship_min_tokens >= 1, ">= 1"),
            ("ship_push_min_queued", self.ship_push_min_queued >= 1, ">= 1"),
            (
                "ship_push_interval_s",
                0.0 < self.ship_push_interval_s < math.inf,
                "> 0 and finite",
            ),
            ("admit_retries", self.admit_retries >= 0, ">= 0"),
            ("admit_slack_frac", 0.0 <= self.admit_slack_frac < math.inf, ">= 0"),
            ("admit_slack_s", 0.0 <= self.admit_slack_s < math.inf, ">= 0"),
            ("evict_charge", 0.0 <= self.evict_charge <= 1.0, "in [0, 1]"),
        ):
            if not ok:
                raise SettingError(name, f"must be {reason}, got {getattr(self, name)}")


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
    # Reason "shipped": serve here after pulling pull_tokens of KV from pull_from.
    pull_from: str | None = None
    pull_tokens: int = 0
    est_ship_s: float = 0.0  # predicted seconds to move and load that KV
    # With ``evict_charge``: (node_id, cached tokens serving there overwrites), as
    # charged in ``scores``; empty when the charge is off.
    evicts: tuple[tuple[str, int], ...] = ()

    def log_fields(self) -> dict[str, object]:
        pull: dict[str, object] = {}
        if self.pull_from is not None:
            pull = {
                "pull_from": self.pull_from,
                "pull_tokens": self.pull_tokens,
                "est_ship_s": round(self.est_ship_s, 6),
            }
        if self.evicts:
            pull["evicts"] = {node: n for node, n in self.evicts if n}
        return {
            **pull,
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


# A node holding at least this share of the prompt is taken to continue that slot in
# place (nothing evicted). The slot policy does when the match is at least half of what
# the slot holds, which routing cannot see; a conversation's slot holds little beyond
# its match, a subject's prefix is most of a question's prompt, while a header every
# prompt shares (a miss) is a few blocks. Measured: 0.5 charged conversations' holders
# for new turns with long messages (docs/evaluation.md, "Three requests in flight").
IN_PLACE_MIN_FRAC = 0.1


def evicts_tokens(c: Candidate, prompt_tokens: int) -> int:
    """The cached tokens serving a prompt of ``prompt_tokens`` on ``c`` overwrites, as
    routing can tell (`miss_evicts`); 0 when ``c`` did not say."""
    return miss_evicts(c.matched_tokens, prompt_tokens, c.evict_tokens or 0)


def miss_evicts(matched_tokens: int, prompt_tokens: int, evict_tokens: int) -> int:
    """What serving a prompt overwrites on a node that holds ``matched_tokens`` of it and
    whose slot policy takes a slot of ``evict_tokens`` for a miss: nothing when it holds
    `IN_PLACE_MIN_FRAC` of the prompt (in place), else that slot."""
    matched = min(max(matched_tokens, 0), prompt_tokens)
    if matched > 0 and matched >= IN_PLACE_MIN_FRAC * prompt_tokens:
        return 0
    return max(evict_tokens, 0)


def charged_s(c: Candidate, prompt_tokens: int, settings: RoutingSettings) -> float:
    """`estimate_s`, plus ``evict_charge`` x the prefill of what serving there overwrites
    (`evicts_tokens`): a later request for it pays that prefill again."""
    est = estimate_s(c, prompt_tokens)
    if settings.evict_charge > 0.0 and c.evict_tokens:
        est += settings.evict_charge * evicts_tokens(c, prompt_tokens) * c.prefill_s_per_token
    return est


def gain_threshold(est_local: float, settings: RoutingSettings) -> float:
    """How much sooner a peer must be expected to answer before we forward to it."""
    return max(settings.min_gain_s, settings.min_gain_frac * est_local)


def is_overloaded(queue: int, min_queue: int, settings: RoutingSettings) -> bool:
    """SGLang router's rule: both the absolute and the relative imbalance must be exceeded."""
    return queue - min_queue > settings.balance_abs and queue > settings.balance_rel * min_queue


def unknown_policy(policy: str) -> str:
    return f"unknown routing policy {policy!r}; known: {', '.join(ALL_POLICIES)}"


def near_best(lowest: float, settings: RoutingSettings) -> float:
    """The highest estimate placement counts as good as ``lowest`` (``place_slack_frac``)."""
    return lowest + settings.place_slack_frac * lowest


def pool_ids(local: Candidate, peers: list[Candidate]) -> list[str]:
    """Local + alive peers, sorted so the caller's ordering never changes the outcome."""
    return sorted([local.node_id, *(p.node_id for p in peers)])


def serve_local(
    local: Candidate,
    reason: str,
    scores: list[tuple[str, float]],
    est_local: float,
    overloaded: tuple[str, ...] = (),
) -> Decision:
    """Serve on the local node for ``reason``."""
    return Decision(local.node_id, False, reason, tuple(scores), est_local, est_local, overloaded)


def baseline_decision(
    target: str, reason: str, local: Candidate, scores: list[tuple[str, float]]
) -> Decision:
    """A baseline policy's choice: no threshold, the target as given."""
    est_target = next(est for node, est in scores if node == target)
    return Decision(
        target, target != local.node_id, reason, tuple(scores), scores[0][1], est_target
    )


Scores = list[tuple[str, float]]
PolicyFn = Callable[
    [RouteRequest, Candidate, list[Candidate], Scores, RoutingSettings, PolicyState], Decision
]
