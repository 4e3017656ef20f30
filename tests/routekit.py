"""Routing candidates with the tests' round figures, shared by the routing, admission
and shipping tests. Times are powers of two where they can be, so threshold edges
compare exactly in floating point."""

from __future__ import annotations

from zmesh.routing import Candidate

PREFILL = 1 / 1024  # s per token: 1024 unmatched tokens cost exactly 1 s
SERVICE = 0.25  # s per queued request
SHIP = 1 / 20_000  # 20k tokens shipped per second: 1024 tokens in ~0.05 s


def candidate(
    node_id: str,
    *,
    local: bool = False,
    matched: int = 0,
    queue: int = 0,
    link: float = 0.0,
    prefill: float = PREFILL,
    service: float = SERVICE,
    alive: bool = True,
    wait: float | None = None,
    ship: float | None = None,
    ship_fixed: float = 0.0,
) -> Candidate:
    """A candidate as a node sees it; ``ship`` (a peer's pull rate) is dropped for the
    local node, whose cache is not pulled."""
    return Candidate(
        node_id,
        local,
        matched,
        queue,
        link,
        prefill,
        service,
        alive,
        wait_s=wait,
        ship_s_per_token=None if local else ship,
        ship_fixed_s=ship_fixed,
    )


def shipping_node(
    name: str,
    *,
    local: bool = False,
    matched: int = 0,
    wait: float = 0.0,
    ship: float | None = SHIP,
    link: float = 0.0,
) -> Candidate:
    """A node of the KV shipping tests: peers' prefixes pullable at SHIP (plus 2 ms),
    0.1 s a request."""
    return candidate(
        name,
        local=local,
        matched=matched,
        link=link,
        service=0.1,
        wait=wait,
        ship=ship,
        ship_fixed=0.002,
    )
