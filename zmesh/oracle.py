"""The oracle: a router with exact, instant knowledge of every node, as a yardstick.

It mirrors each node's cache by replaying, in order, every request it sends there
through the engine's slot policy (the simulator's `SlotCache`, or a `TokenCache`),
so it knows the cache each request will find, and it knows each node's exact wait.
For a request it scores every node by::

    est = wait + evicted * prefill + (prompt - matched) * prefill * factor

where ``evicted`` is the other cached content that serving the request there would
overwrite (one more prefill of it later: without that charge a greedy router evicts
a hot prefix to save a few tokens), and ``factor`` how much slower than alone the
node prefills it (a node that batches: the batch the request joins), and lets
`routing.decide` choose with the
``oracle`` policy (lowest estimate, no thresholds) among those candidates, the best
first as the "local" one. Then it replays the request on the chosen mirror.

Used by the simulator (``zmesh sim``, ``--policies oracle``) and by the cluster
benchmark (``zmesh bench cluster``), which differ only in how they know each node's
wait (the simulator's clock; the bench's own outstanding requests and measured rates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from zmesh.routing import ORACLE, Candidate, PolicyState, RouteRequest, RoutingSettings, decide

__all__ = ["ORACLE_SETTINGS", "Mirror", "OracleNode", "choose", "replay"]

ORACLE_SETTINGS = RoutingSettings(policy=ORACLE)


class Claimed(Protocol):
    slot: int
    reuse: int


class Mirror(Protocol):
    """A node's cache as the oracle replays it (`zmesh.sim.cache.SlotCache`, `TokenCache`)."""

    def match(self, tokens: Sequence[int]) -> int: ...

    def evicted_tokens(self, tokens: tuple[int, ...]) -> int: ...

    def claim(self, tokens: tuple[int, ...]) -> Claimed: ...

    def finish(
        self,
        slot: int,
        sequence: tuple[int, ...],
        ids: list[int] | None = None,
        now: float | None = None,
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class OracleNode:
    """One node as the oracle knows it."""

    node_id: str
    order: int  # ties between equal estimates go to the lowest
    mirror: Mirror
    queue_depth: int
    wait_s: float  # exact seconds until it would start a request sent now
    # How much slower than alone it prefills there: a node that batches serves a
    # request that joins k running ones at its batched rate (1.0: alone).
    prefill_factor: float = 1.0


def choose(
    nodes: Sequence[OracleNode],
    tokens: tuple[int, ...],
    prefill_s_per_token: float,
    state: PolicyState,
    settings: RoutingSettings = ORACLE_SETTINGS,
) -> tuple[OracleNode, int]:
    """The node to send ``tokens`` to (one of ``nodes``), and its mirror's match."""
    prefill = prefill_s_per_token
    prompt = len(tokens)
    rows = []
    for n in nodes:
        matched = n.mirror.match(tokens)
        rate = prefill * n.prefill_factor
        wait = n.wait_s + n.mirror.evicted_tokens(tokens) * prefill
        est = wait + (prompt - min(matched, prompt)) * rate
        rows.append((est, n.order, n, matched, wait))
    rows.sort(key=lambda r: (r[0], r[1]))  # decide() keeps ties local: best one first
    cands = [
        Candidate(
            node_id=n.node_id,
            is_local=k == 0,
            matched_tokens=matched,
            queue_depth=n.queue_depth,
            link_delay_s=0.0,
            prefill_s_per_token=prefill * n.prefill_factor,
            service_s=0.0,
            wait_s=wait,
        )
        for k, (_, _, n, matched, wait) in enumerate(rows)
    ]
    target = decide(RouteRequest(prompt, 0, 0), cands, settings, state).target
    for _, _, n, matched, _ in rows:
        if n.node_id == target:
            return n, matched
    raise AssertionError(f"decide chose {target!r}, not a candidate")  # pragma: no cover


def replay(mirror: Mirror, tokens: tuple[int, ...], answer: tuple[int, ...], now: float) -> Claimed:
    """Replay a request on its node's mirror now (that is the cache it will find):
    the slot it claims, then the prompt and ``answer`` (stand-in tokens) held there."""
    claim = mirror.claim(tokens)
    mirror.finish(claim.slot, tokens + answer, None, now)
    return claim
