"""One entry point for the CLIs: a workload by name (`make_workload`, `WORKLOADS`)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from zmesh.workload.base import Workload
from zmesh.workload.mmlu import mmlu_workload
from zmesh.workload.synthetic import bursty_workload, chat_workload, shared_prefix_workload

__all__ = ["WORKLOADS", "make_workload"]

WORKLOADS = ("mmlu", "shared", "chat", "bursty")


def make_workload(
    name: str,
    n_requests: int,
    alpha: float,
    seed: int,
    max_tokens: int = 4,
    subjects: int | Sequence[str] | None = None,
    groups: int = 16,
    turns: int = 4,
    mmlu_path: str | os.PathLike[str] | None = None,
    sessions: int = 24,
    scale: float = 1.0,
) -> Workload:
    """One entry point for the CLIs: ``mmlu``, ``shared``, ``chat`` (sessions x turns) or
    ``bursty`` (``sessions`` going on at once; ``scale`` shrinks its lengths, e.g. to fit
    a real node's slots)."""
    if name == "mmlu":
        return mmlu_workload(n_requests, alpha, subjects, seed, mmlu_path, max_tokens)
    if name == "shared":
        return shared_prefix_workload(n_requests, groups, alpha, seed=seed, max_tokens=max_tokens)
    if name == "chat":
        return chat_workload(
            max(1, n_requests // turns), turns, groups, alpha, seed=seed, max_tokens=max_tokens
        )
    if name == "bursty":
        return bursty_workload(
            n_requests,
            sessions,
            groups,
            alpha,
            system_words=max(1, round(200 * scale)),
            first_words=max(1, round(600 * scale)),
            user_words=max(1, round(60 * scale)),
            answer_tokens=max(16, round(150 * scale)),
            max_answer_tokens=max(16, round(1024 * scale)),
            max_prompt_words=max(8, round(3000 * scale)),
            seed=seed,
        )
    raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
