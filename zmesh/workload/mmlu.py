"""MMLU 5-shot requests in the standard prompt format.

Every question of a subject shares that subject's few-shot prefix; subject popularity
is Zipf(alpha). The data is the subset shipped in ``zmesh/data/mmlu``, or a full copy
named by ``path`` or $ZMESH_MMLU_DIR.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from zmesh.workload.base import Request, Workload, ZipfSampler

__all__ = [
    "MMLU_ENV",
    "MmluQuestion",
    "load_mmlu",
    "mmlu_dir",
    "mmlu_prefix",
    "mmlu_question",
    "mmlu_workload",
]

MMLU_ENV = "ZMESH_MMLU_DIR"
_PACKAGED_MMLU = Path(__file__).resolve().parent.parent / "data" / "mmlu"
_LETTERS = "ABCD"


@dataclass(frozen=True, slots=True)
class MmluQuestion:
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0..3


def mmlu_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Where MMLU lives: ``path``, else $ZMESH_MMLU_DIR, else the subset shipped with zmesh."""
    chosen = Path(path) if path else Path(os.environ.get(MMLU_ENV) or _PACKAGED_MMLU)
    if not (chosen / "dev").is_dir() or not (chosen / "test").is_dir():
        raise FileNotFoundError(f"{chosen} has no dev/ and test/ MMLU folders")
    return chosen


def _read_rows(path: Path) -> list[MmluQuestion]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    out = []
    for row in rows[1:] if rows and rows[0][:1] == ["question"] else rows:
        if len(row) != 6:
            raise ValueError(f"{path}: expected 6 columns, got {len(row)}")
        out.append(MmluQuestion(row[0], (row[1], row[2], row[3], row[4]), int(row[5])))
    return out


@lru_cache(maxsize=4)
def _load_mmlu_cached(root: str) -> dict[str, tuple[list[MmluQuestion], list[MmluQuestion]]]:
    base = Path(root)
    out = {}
    for dev in sorted((base / "dev").glob("*_dev.csv")):
        subject = dev.name[: -len("_dev.csv")]
        test = base / "test" / f"{subject}_test.csv"
        if test.exists():
            out[subject] = (_read_rows(dev), _read_rows(test))
    if not out:
        raise FileNotFoundError(f"no MMLU subjects under {base}")
    return out


def load_mmlu(
    path: str | os.PathLike[str] | None = None,
) -> dict[str, tuple[list[MmluQuestion], list[MmluQuestion]]]:
    """``subject -> (dev rows, test rows)``; see `mmlu_dir` for where it reads from."""
    return _load_mmlu_cached(str(mmlu_dir(path)))


def _format_example(q: MmluQuestion, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{_LETTERS[i]}. {c}" for i, c in enumerate(q.choices))
    return text + (f"\nAnswer: {_LETTERS[q.answer]}\n\n" if with_answer else "\nAnswer:")


def mmlu_prefix(subject: str, dev: Sequence[MmluQuestion]) -> str:
    """The standard 5-shot head shared by every question of ``subject``."""
    head = (
        "The following are multiple choice questions (with answers) about "
        f"{subject.replace('_', ' ')}.\n\n"
    )
    return head + "".join(_format_example(q, True) for q in dev)


def mmlu_question(q: MmluQuestion) -> str:
    return _format_example(q, False)


def mmlu_workload(
    n_requests: int,
    alpha: float = 1.0,
    subjects: int | Sequence[str] | None = None,
    seed: int = 0,
    path: str | os.PathLike[str] | None = None,
    max_tokens: int = 4,
) -> Workload:
    """MMLU 5-shot requests; subject popularity is Zipf(alpha) over a seeded ranking.

    ``subjects``: a list of subject names, a count (the first N of a seeded shuffle),
    or None for all. Each subject's questions are drawn without replacement in a
    seeded order, cycling when exhausted.
    """
    data = load_mmlu(path)
    rng = random.Random(seed)
    names = sorted(data)
    if isinstance(subjects, int):
        rng.shuffle(names)
        names = names[:subjects]
    elif subjects is not None:
        missing = [s for s in subjects if s not in data]
        if missing:
            raise ValueError(f"unknown MMLU subjects: {missing}")
        names = list(subjects)
    if not names:
        raise ValueError("no subjects chosen")
    rng.shuffle(names)  # the popularity ranking: names[0] is the hottest
    prefixes = {s: mmlu_prefix(s, data[s][0]) for s in names}
    orders = {s: rng.sample(range(len(data[s][1])), len(data[s][1])) for s in names}
    taken = dict.fromkeys(names, 0)
    pick = ZipfSampler(len(names), alpha, rng)
    reqs = []
    for i in range(n_requests):
        s = names[pick()]
        order = orders[s]
        q = data[s][1][order[taken[s] % len(order)]]
        taken[s] += 1
        reqs.append(Request(i, s, prefixes[s], mmlu_question(q), max_tokens=max_tokens))
    params = {
        "n_requests": n_requests,
        "alpha": alpha,
        "subjects": names,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    return Workload("mmlu", reqs, params)
