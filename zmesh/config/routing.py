"""The [routing] section: the policy knobs (defaults and checks from zmesh.routing)
plus what the node itself needs to forward, keep requests alive and ship KV state."""

from __future__ import annotations

from typing import Any

import msgspec

from zmesh.candidates import DEFAULT_HASH_PREFIX_TOKENS
from zmesh.config.checks import _check_positive, _fail
from zmesh.protocol import MAX_PROGRESS_INTERVAL_S
from zmesh.routing import POLICIES, RoutingSettings, SettingError

_ROUTING = RoutingSettings()  # the one source of the policy knobs' defaults


class RoutingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # The policy knobs (zmesh.routing.RoutingSettings: defaults and checks live there).
    policy: str = _ROUTING.policy
    max_hops: int = _ROUTING.max_hops
    min_gain_s: float = _ROUTING.min_gain_s  # forward only if the peer is this much sooner
    min_gain_frac: float = _ROUTING.min_gain_frac  # ...and by this fraction of local's estimate
    place_slack_frac: float = _ROUTING.place_slack_frac  # this close to the best: placed by hash
    balance_abs: int = _ROUTING.balance_abs
    balance_rel: float = _ROUTING.balance_rel
    # KV shipping (zmesh policy; routing/shipping.py): pull a peer's cached prefix and
    # serve here when that is predicted sooner than prefilling here or forwarding.
    ship: bool = _ROUTING.ship
    ship_min_tokens: int = _ROUTING.ship_min_tokens  # smaller gains are not worth a transfer
    # Evicted tokens a peer holds are charged as a pull back (routing/shipping.py).
    ship_evict_pull_back: bool = _ROUTING.ship_evict_pull_back
    # Holder push (routing/shipping.py, push_decision): a busy holder offers a hot
    # prefix to an idle peer, which pulls it into a free slot; at most one offer in
    # flight, one per ship_push_interval_s.
    ship_push: bool = _ROUTING.ship_push
    ship_push_min_queued: int = _ROUTING.ship_push_min_queued
    ship_push_interval_s: float = _ROUTING.ship_push_interval_s
    # The node's own.
    # To a peer's first reply (then serve locally); after a Progress frame, as long as
    # the peer keeps sending them (and stays alive), up to the request's deadline.
    forward_timeout_s: float = 5.0
    # Period of the Progress keep-alives this node sends for a forwarded request it
    # holds (queued or running); at most protocol.MAX_PROGRESS_INTERVAL_S.
    progress_interval_s: float = 1.0
    hash_prefix_tokens: int = DEFAULT_HASH_PREFIX_TOKENS  # consistent_hash: prompt head hashed
    ship_timeout_s: float = 5.0  # a fetch not complete by then is prefilled locally
    ship_max_mb: float = 64.0  # largest KV state this node fetches or serves
    # Start values until the first measurement replaces them (kvtransfer.ShipCosts).
    ship_bandwidth_mbps: float = 1000.0  # a link never measured, megabits per second
    ship_bytes_per_token: float = 20_000.0  # gemma-3-270m: 18.5 KB per token measured
    ship_import_s_per_mb: float = 0.002  # loading state into llama.cpp (1.7 ms/MB measured)
    # Holder-side admission (routing/admission.py): a forward carries the latest first
    # token its forwarder still prefers; a peer predicting a later one refuses it (busy)
    # and the forwarder asks the runner-up, up to admit_retries times, then serves it.
    admission: bool = _ROUTING.admission
    admit_retries: int = _ROUTING.admit_retries
    admit_slack_frac: float = _ROUTING.admit_slack_frac  # the bar is raised by this fraction
    admit_slack_s: float = _ROUTING.admit_slack_s  # of itself, and by these seconds
    # Both sides count the prefill of what serving the request would evict.
    admit_evictions: bool = _ROUTING.admit_evictions
    # The eviction charge: this share of the prefill of what a choice would overwrite
    # counts against it (0: off).
    evict_charge: float = _ROUTING.evict_charge

    def settings(self, **node: Any) -> RoutingSettings:
        """The policy knobs as `decide` takes them; ``node``: what the node adds
        (``ship_max_tokens`` from its engine, ``give_up_s``)."""
        return RoutingSettings(
            policy=self.policy,
            max_hops=self.max_hops,
            min_gain_s=self.min_gain_s,
            min_gain_frac=self.min_gain_frac,
            place_slack_frac=self.place_slack_frac,
            balance_abs=self.balance_abs,
            balance_rel=self.balance_rel,
            ship=self.ship,
            ship_min_tokens=self.ship_min_tokens,
            ship_evict_pull_back=self.ship_evict_pull_back,
            ship_push=self.ship_push,
            ship_push_min_queued=self.ship_push_min_queued,
            ship_push_interval_s=self.ship_push_interval_s,
            admission=self.admission,
            admit_retries=self.admit_retries,
            admit_slack_frac=self.admit_slack_frac,
            admit_slack_s=self.admit_slack_s,
            admit_evictions=self.admit_evictions,
            evict_charge=self.evict_charge,
            **node,
        )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            _fail("policy", f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        try:
            self.settings()
        except SettingError as exc:
            _fail(exc.name, exc.reason)
        _check_positive(self, "forward_timeout_s", "progress_interval_s")
        if self.progress_interval_s > MAX_PROGRESS_INTERVAL_S:
            _fail(
                "progress_interval_s",
                f"must be at most {MAX_PROGRESS_INTERVAL_S}, got {self.progress_interval_s}",
            )
        if self.hash_prefix_tokens < 1:
            _fail("hash_prefix_tokens", f"must be >= 1, got {self.hash_prefix_tokens}")
        _check_positive(
            self,
            "ship_timeout_s",
            "ship_max_mb",
            "ship_bandwidth_mbps",
            "ship_bytes_per_token",
            "ship_import_s_per_mb",
        )
