"""The ``consistent_hash`` policy: a hash ring keyed by the prompt's head.

Algorithm: every node of the sorted pool gets ``vnodes`` points on a 64-bit ring
(blake2b of ``"node#i"``, the same in every process); the request goes to the first
point clockwise from its ``head_key`` (the hash of the prompt's first block),
wrapping past the top. Deterministic and cache-affine for whole-prefix repeats, but
blind to load and to partial overlaps (the "cache-routing" proof of concept).

Parameters (`RoutingSettings`): ``vnodes`` (64), points per node on the ring.
"""

from __future__ import annotations

import bisect
import hashlib
from functools import lru_cache

from zmesh.routing.base import (
    MASK64,
    REASON_CONSISTENT_HASH,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    baseline_decision,
    pool_ids,
)


def ring_position(node_id: str, i: int) -> int:
    """Stable 64-bit ring position of virtual node i (same in every process)."""
    digest = hashlib.blake2b(f"{node_id}#{i}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@lru_cache(maxsize=64)
def _ring(node_ids: tuple[str, ...], vnodes: int) -> tuple[list[int], list[str]]:
    """Sorted ring positions and their owners, built once per (sorted node set, vnodes)."""
    points = sorted((ring_position(n, i), n) for n in node_ids for i in range(vnodes))
    return [p for p, _ in points], [n for _, n in points]


def decide_consistent_hash(
    request: RouteRequest,
    local: Candidate,
    peers: list[Candidate],
    scores: list[tuple[str, float]],
    settings: RoutingSettings,
    state: PolicyState,
) -> Decision:
    positions, owners = _ring(tuple(pool_ids(local, peers)), settings.vnodes)
    i = bisect.bisect_left(positions, request.head_key & MASK64)
    target = owners[i % len(owners)]  # first point clockwise, wrapping past the top
    return baseline_decision(target, REASON_CONSISTENT_HASH, local, scores)
