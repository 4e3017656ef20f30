"""Requests and workloads: what a benchmark or simulation sends, and popularity draws.

A `Workload` is a list of `Request`s in issue order; requests of one chat session
form a *stream* that runs in order. `ZipfSampler` draws the popularity ranks every
generator uses. Seeded: the same seed gives the same requests.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Request", "Workload", "ZipfSampler", "zipf_weights"]

# ---- requests ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    """One request. Its prompt is ``prefix + suffix``, or ``prompt(parent) + suffix``."""

    index: int
    group: str  # what it shares a prefix with: MMLU subject, system prompt
    prefix: str  # the shared head (few-shot block, system prompt); "" when parent >= 0
    suffix: str  # the part of the prompt that is this request's own
    parent: int = -1  # index of the request whose prompt this one extends (chat turns)
    session: int = -1  # requests of one session run one after the other; -1: independent
    max_tokens: int = 4


@dataclass
class Workload:
    name: str
    requests: list[Request]
    params: dict[str, Any] = field(default_factory=dict)
    _prompts: dict[int, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.requests)

    def prompt(self, i: int) -> str:
        """The full prompt text of request ``i`` (chains through chat parents)."""
        cached = self._prompts.get(i)
        if cached is not None:
            return cached
        r = self.requests[i]
        text = (self.prompt(r.parent) if r.parent >= 0 else r.prefix) + r.suffix
        self._prompts[i] = text
        return text

    def streams(self) -> list[list[int]]:
        """Request indices grouped into streams that must run in order (chat sessions).

        An independent request is a stream of one. Streams are ordered by their first
        request, so a closed loop over streams issues requests in workload order.
        """
        out: list[list[int]] = []
        by_session: dict[int, list[int]] = {}
        for r in self.requests:
            if r.session < 0:
                out.append([r.index])
            elif r.session in by_session:
                by_session[r.session].append(r.index)
            else:
                by_session[r.session] = [r.index]
                out.append(by_session[r.session])
        return out

    def group_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.requests:
            counts[r.group] = counts.get(r.group, 0) + 1
        return counts


# ---- popularity ------------------------------------------------------


def zipf_weights(n: int, alpha: float) -> list[float]:
    """P(rank k) proportional to 1 / k**alpha, k = 1..n (alpha 0: uniform)."""
    if n < 1:
        raise ValueError("zipf needs at least one item")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    raw = [1.0 / (k**alpha) for k in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ZipfSampler:
    """Draws ranks 0..n-1 with Zipf(alpha) probabilities from a seeded RNG."""

    __slots__ = ("_cum", "rng", "weights")

    def __init__(self, n: int, alpha: float, rng: random.Random) -> None:
        self.weights = zipf_weights(n, alpha)
        self._cum = list(itertools.accumulate(self.weights))
        self._cum[-1] = 1.0  # no rank past the end from rounding
        self.rng = rng

    def __call__(self) -> int:
        return bisect.bisect_left(self._cum, self.rng.random())
