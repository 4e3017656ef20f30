"""Cache-affine placement: where a prefix should live when several nodes are equally good.

Algorithm: among the eligible nodes (local first, then peers not excluded by the
balance rule), take those holding the most whole blocks of the prompt whose estimate
is within ``place_slack_frac`` of the lowest estimate. If two or more remain, the one
with the highest rendezvous (highest-random-weight) rank for the id of the first block
past that match wins. So a prefix nobody holds yet is cached on one node whichever node
it entered by, distinct new prefixes spread over every node's cache instead of piling
up where they entered, and requests for a prefix several nodes hold spread over those
copies. When fewer than two of the longest holders are near the best, placement
abstains and the estimates decide (a busy holder must not make the hash copy its
prefix onto another node; docs/evaluation.md, "Placement").

Parameters (`RoutingSettings`):
- ``place_slack_frac`` (0.1): how close to the best estimate counts as "as good";
  0 switches placement off.
- ``block_size`` and ``block_ids`` of the `RouteRequest`: the prompt's chained ids;
  an empty list switches placement off for that request.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from zmesh.routing.base import MASK64, Candidate, RouteRequest, RoutingSettings, near_best


def placement_rank(key: int, node_id: str) -> int:
    """Rendezvous (highest random weight) score of ``node_id`` for a placement key."""
    x = (key ^ _node_hash(node_id)) & MASK64
    # splitmix64's finalizer: cheap, and every input bit moves every output bit.
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


@lru_cache(maxsize=4096)
def _node_hash(node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(node_id.encode(), digest_size=8).digest(), "little")


def place(
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
    bar = near_best(lowest, settings)
    tied = [ce for ce, b in zip(eligible, blocks, strict=True) if b == longest and ce[1] <= bar]
    if len(tied) < 2:
        return None
    key = ids[longest]
    return max(tied, key=lambda ce: (placement_rank(key, ce[0].node_id), ce[0].node_id))
