"""Seeded, reproducible workloads for the cluster benchmark and the simulator.

Three request mixes, each a `Workload` (a list of `Request`s in issue order):

- `mmlu_workload`: MMLU 5-shot in the standard prompt format. Every question of a
  subject shares that subject's few-shot prefix; subject popularity is Zipf(alpha).
- `shared_prefix_workload`: K generated long system prompts x many questions each.
- `chat_workload`: multi-turn sessions; each turn's prompt extends the previous
  turn's prompt and (scripted) answer, so every policy sees the same token stream.
- `bursty_workload`: long conversations (prompts of thousands of tokens, answers of
  hundreds), message and answer lengths heavy-tailed, many sessions interleaved; meant
  for ``bursts`` arrivals.

Arrivals are separate (`Arrivals`): Poisson at a rate, a closed loop at a given
concurrency, or bursts (several requests due at the same instant, then quiet).
Requests of one chat session form a *stream* that runs in order.
The same seed always gives the same requests, prompts and arrival times.
"""

from __future__ import annotations

import bisect
import csv
import itertools
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "MMLU_ENV",
    "Arrivals",
    "MmluQuestion",
    "Request",
    "Workload",
    "ZipfSampler",
    "burst_arrivals",
    "bursty_workload",
    "chat_workload",
    "load_mmlu",
    "make_workload",
    "mmlu_dir",
    "mmlu_prefix",
    "mmlu_question",
    "mmlu_workload",
    "poisson_arrivals",
    "shared_prefix_workload",
    "zipf_weights",
]

MMLU_ENV = "ZMESH_MMLU_DIR"
_PACKAGED_MMLU = Path(__file__).resolve().parent.parent / "data" / "mmlu"
_LETTERS = "ABCD"


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


# ---- popularity and arrivals ------------------------------------------------------


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


# ---- MMLU -------------------------------------------------------------------------


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


# ---- generated text ----------------------------------------------------------------

_SYLLABLES = [a + b for a in "bcdfgklmnprstvz" for b in ("a", "e", "i", "o", "u", "ar", "en")]


def _words(rng: random.Random, n: int) -> str:
    """``n`` pseudo-words: stable for a seed, cheap, and not shared by accident."""
    out = []
    for _ in range(n):
        out.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))))
    return " ".join(out)


def shared_prefix_workload(
    n_requests: int,
    groups: int = 16,
    alpha: float = 1.0,
    prefix_words: int = 400,
    question_words: int = 24,
    seed: int = 0,
    max_tokens: int = 4,
    questions: int = 0,
) -> Workload:
    """``groups`` long system prompts; each request is one of them plus a question.

    ``questions`` > 0 draws each question from a pool of that many (cheap at a million
    requests); 0 gives every request a question of its own.
    """
    rng = random.Random(seed)
    prefixes = [
        f"System prompt {g}. You are assistant number {g}. {_words(rng, prefix_words)}\n\n"
        for g in range(groups)
    ]
    pool = [f"Question {k}: {_words(rng, question_words)}?\nAnswer:" for k in range(questions)]
    pick = ZipfSampler(groups, alpha, rng)
    names = [f"sys-{g}" for g in range(groups)]
    reqs = []
    for i in range(n_requests):
        g = pick()
        if pool:
            q = pool[int(rng.random() * len(pool))]
        else:
            q = f"Question {i}: {_words(rng, question_words)}?\nAnswer:"
        reqs.append(Request(i, names[g], prefixes[g], q, max_tokens=max_tokens))
    params = {
        "n_requests": n_requests,
        "groups": groups,
        "alpha": alpha,
        "prefix_words": prefix_words,
        "question_words": question_words,
        "questions": questions,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    return Workload("shared", reqs, params)


def chat_workload(
    n_sessions: int,
    turns: int = 4,
    system_prompts: int = 4,
    alpha: float = 1.0,
    system_words: int = 150,
    user_words: int = 30,
    answer_words: int = 40,
    seed: int = 0,
    max_tokens: int = 4,
) -> Workload:
    """Multi-turn sessions: turn t's prompt = turn t-1's prompt + its answer + a new message.

    Answers are scripted text (not what the model says), so every policy receives the
    same prompts; the cache reuse a turn can get is the previous turn's prompt.
    """
    rng = random.Random(seed)
    systems = [
        f"<system {k}> You are a helpful assistant for team {k}. {_words(rng, system_words)}\n"
        for k in range(system_prompts)
    ]
    pick = ZipfSampler(system_prompts, alpha, rng)
    reqs: list[Request] = []
    for s in range(n_sessions):
        k = pick()
        parent = -1
        answer = ""
        for t in range(turns):
            user = f"{answer}\nUser ({s}.{t}): {_words(rng, user_words)}\nAssistant:"
            i = len(reqs)
            if parent < 0:
                reqs.append(
                    Request(i, f"sys-{k}", systems[k], user, session=s, max_tokens=max_tokens)
                )
            else:
                reqs.append(Request(i, f"sys-{k}", "", user, parent, s, max_tokens))
            parent = i
            answer = " " + _words(rng, answer_words)
    params = {
        "n_sessions": n_sessions,
        "turns": turns,
        "system_prompts": system_prompts,
        "alpha": alpha,
        "seed": seed,
        "max_tokens": max_tokens,
    }
    return Workload("chat", reqs, params)


def _lognormal_int(rng: random.Random, median: float, sigma: float, lo: int, hi: int) -> int:
    """A heavy-tailed length: lognormal around ``median``, clipped to [lo, hi]."""
    return min(max(round(median * rng.lognormvariate(0.0, sigma)), lo), hi)


def bursty_workload(
    n_requests: int,
    sessions: int = 24,
    system_prompts: int = 8,
    alpha: float = 1.0,
    system_words: int = 200,
    first_words: int = 600,
    user_words: int = 60,
    answer_tokens: int = 150,
    max_answer_tokens: int = 1024,
    mean_turns: float = 6.0,
    max_prompt_words: int = 3000,
    seed: int = 0,
) -> Workload:
    """Long multi-turn conversations, ``sessions`` of them going on at once.

    Each session opens with one of ``system_prompts`` (Zipf ``alpha``) and a long first
    message (a pasted document: lognormal, median ``first_words``); each later turn's
    prompt is the previous prompt + a scripted answer + a new message (lognormal,
    median ``user_words``). Answers (``max_tokens``) are lognormal around
    ``answer_tokens``, clipped to [16, ``max_answer_tokens``]; turns per session are
    geometric with mean ``mean_turns``; a session also ends before its prompt passes
    ``max_prompt_words``, and a new one takes its place. Requests are issued round by
    round over the sessions going on (in a shuffled order each round), so one
    session's turns sit about ``sessions`` requests apart.
    """
    if sessions < 1 or n_requests < 0 or mean_turns < 1:
        raise ValueError("need sessions >= 1, n_requests >= 0 and mean_turns >= 1")
    rng = random.Random(seed)
    systems = [
        f"<system {k}> You are the assistant of desk {k}. {_words(rng, system_words)}\n"
        for k in range(system_prompts)
    ]
    pick = ZipfSampler(system_prompts, alpha, rng)
    # Per session: [id, system, turns left, words so far, last request, last answer]
    live: list[list[Any]] = []
    next_id = 0

    def new_session() -> list[Any]:
        nonlocal next_id
        turns = 1
        while rng.random() > 1.0 / mean_turns and turns < 64:
            turns += 1
        next_id += 1
        k = pick()
        return [next_id - 1, k, turns, system_words, -1, ""]

    reqs: list[Request] = []
    while len(reqs) < n_requests:
        while len(live) < sessions:
            live.append(new_session())
        order = list(range(len(live)))
        rng.shuffle(order)
        ended: set[int] = set()
        for j in order:
            if len(reqs) >= n_requests:
                break
            s = live[j]
            sid, k, left, words, parent, answer = s
            first = parent < 0
            n = _lognormal_int(rng, first_words if first else user_words, 1.0, 4, 4 * first_words)
            if not first and words + n > max_prompt_words:
                ended.add(j)
                continue
            mt = _lognormal_int(rng, answer_tokens, 0.7, 16, max_answer_tokens)
            turn = f"{answer}\nUser ({sid}.{len(reqs)}): {_words(rng, n)}\nAssistant:"
            i = len(reqs)
            if first:
                reqs.append(Request(i, f"sys-{k}", systems[k], turn, session=sid, max_tokens=mt))
            else:
                reqs.append(Request(i, f"sys-{k}", "", turn, parent, sid, mt))
            # About 1.5 pseudo-words per answer token (zmesh.sim.tokens' stand-in tokenizer).
            s[2:6] = [left - 1, words + n + mt * 2 // 3, i, " " + _words(rng, mt * 2 // 3)]
            if left <= 1:
                ended.add(j)
        live = [s for j, s in enumerate(live) if j not in ended]
    params = {
        "n_requests": n_requests,
        "sessions": sessions,
        "system_prompts": system_prompts,
        "alpha": alpha,
        "first_words": first_words,
        "user_words": user_words,
        "answer_tokens": answer_tokens,
        "mean_turns": mean_turns,
        "max_prompt_words": max_prompt_words,
        "seed": seed,
    }
    return Workload("bursty", reqs, params)


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


WORKLOADS = ("mmlu", "shared", "chat", "bursty")
