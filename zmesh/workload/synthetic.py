"""Generated workloads: shared system prompts, multi-turn chat, bursty long conversations.

- `shared_prefix_workload`: K generated long system prompts x many questions each.
- `chat_workload`: multi-turn sessions; each turn's prompt extends the previous
  turn's prompt and (scripted) answer, so every policy sees the same token stream.
- `bursty_workload`: long conversations (prompts of thousands of tokens, answers of
  hundreds), message and answer lengths heavy-tailed, many sessions interleaved; meant
  for ``bursts`` arrivals.
"""

from __future__ import annotations

import random
from typing import Any

from zmesh.workload.base import Request, Workload, ZipfSampler

__all__ = ["bursty_workload", "chat_workload", "shared_prefix_workload"]


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
