"""Arrival processes: Poisson, closed loop, or bursts (several requests due at one instant).

`Arrivals` says how requests are issued; `poisson_arrivals` and `burst_arrivals` give
the seeded times. In every mode a stream's next request (the next chat turn) is issued
when the previous one is answered, after ``think_s``, and not before it is due.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Arrivals", "burst_arrivals", "poisson_arrivals"]


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """``n`` arrival times (seconds from 0) of a Poisson process of ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    rng = random.Random(seed ^ 0x5EED)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(t)
    return out


def burst_arrivals(
    n: int, rate: float, burst: float, seed: int = 0, spread: bool = False
) -> list[float]:
    """Due times of ``n`` requests (in order) arriving in bursts, ``rate`` per second overall.

    Bursts start at Poisson times (``rate / burst`` per second); each holds 1 +
    Geometric requests (mean ``burst``), all due at the same instant, as a trace whose
    timestamps group requests. ``spread`` gives each burst's requests evenly spaced
    times up to the next burst instead: the same load, without the bunching.
    """
    if rate <= 0 or burst < 1:
        raise ValueError(f"rate must be > 0 and burst >= 1, got {rate}, {burst}")
    rng = random.Random(seed ^ 0xB0257)
    p = 1.0 / burst  # P(a burst ends after each request): mean size 1/p
    t = rng.expovariate(rate / burst)
    out: list[float] = []
    while len(out) < n:
        k = 1
        while rng.random() > p:
            k += 1
        gap = rng.expovariate(rate / burst)  # to the next burst
        step = gap / k if spread else 0.0
        out.extend(t + j * step for j in range(k))
        t += gap
    return out[:n]


@dataclass(frozen=True, slots=True)
class Arrivals:
    """How requests are issued: ``closed`` (a fixed number in flight), ``poisson`` or
    ``bursts``.

    Poisson starts streams at a rate; ``bursts`` gives every request a due time from
    `burst_arrivals` (``burst`` requests per burst on average, ``spread``: evenly
    spaced instead). In every mode a stream's next request (the next chat turn) is
    issued when the previous one is answered, after ``think_s``, and not before it is
    due.
    """

    mode: str = "closed"
    concurrency: int = 3
    rate: float = 1.0  # poisson: streams per second; bursts: requests per second
    think_s: float = 0.0
    burst: float = 8.0  # bursts: mean requests per burst
    spread: bool = False  # bursts: spread each burst evenly up to the next one

    def __post_init__(self) -> None:
        if self.mode not in ("closed", "poisson", "bursts"):
            raise ValueError(f"arrival mode must be closed, poisson or bursts, got {self.mode!r}")
        if self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.think_s < 0:
            raise ValueError("think_s must be >= 0")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")

    def describe(self) -> str:
        if self.mode == "closed":
            return f"closed loop, {self.concurrency} in flight"
        if self.mode == "bursts":
            how = "spread evenly" if self.spread else "each at one instant"
            return f"bursts of {self.burst:g} on average ({how}), {self.rate:g} req/s"
        return f"Poisson, {self.rate:g} req/s"

    def due(self, n: int, seed: int = 0) -> list[float]:
        """bursts: each request's due time (workload order); other modes: none."""
        if self.mode != "bursts":
            return []
        return burst_arrivals(n, self.rate, self.burst, seed, self.spread)
