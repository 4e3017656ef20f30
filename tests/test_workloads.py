"""Workload generators: seeded, reproducible, the right shapes (pure: no model, no sockets)."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from zmesh.workload import (
    Arrivals,
    ZipfSampler,
    burst_arrivals,
    bursty_workload,
    chat_workload,
    load_mmlu,
    make_workload,
    mmlu_dir,
    mmlu_prefix,
    mmlu_workload,
    poisson_arrivals,
    shared_prefix_workload,
    zipf_weights,
)


def test_zipf_weights_shape() -> None:
    w = zipf_weights(10, 1.0)
    assert math.isclose(sum(w), 1.0)
    assert all(a > b for a, b in itertools.pairwise(w))
    assert math.isclose(w[0] / w[1], 2.0)  # 1/1 : 1/2
    assert math.isclose(w[0] / w[9], 10.0)
    uniform = zipf_weights(7, 0.0)
    assert all(math.isclose(x, 1 / 7) for x in uniform)
    steep = zipf_weights(10, 1.5)
    assert steep[0] > w[0]  # more skew puts more mass on the head
    with pytest.raises(ValueError):
        zipf_weights(0, 1.0)
    with pytest.raises(ValueError):
        zipf_weights(3, -0.5)


def test_zipf_sampler_matches_weights() -> None:
    n, alpha, draws = 8, 1.0, 40_000
    sample = ZipfSampler(n, alpha, random.Random(3))
    counts = Counter(sample() for _ in range(draws))
    assert set(counts) <= set(range(n))
    for k, w in enumerate(zipf_weights(n, alpha)):
        assert abs(counts[k] / draws - w) < 0.01
    a = ZipfSampler(n, alpha, random.Random(5))
    b = ZipfSampler(n, alpha, random.Random(5))
    assert [a() for _ in range(100)] == [b() for _ in range(100)]


def test_mmlu_subset_is_shipped_and_readable() -> None:
    root = mmlu_dir()
    data = load_mmlu()
    assert len(data) == 57
    assert (root / "README.md").exists()  # license and source note
    for dev, test in data.values():
        assert len(dev) == 5
        assert 1 <= len(test) <= 50
        assert all(0 <= q.answer <= 3 for q in dev + test)


def test_mmlu_prompt_is_the_standard_5_shot_format() -> None:
    dev, _ = load_mmlu()["anatomy"]
    head = mmlu_prefix("anatomy", dev)
    assert head.startswith(
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
    )
    assert head.count("\nAnswer: ") == 5
    assert head.endswith("\n\n")
    wl = mmlu_workload(20, alpha=1.0, subjects=["anatomy"], seed=1)
    for i in range(len(wl)):
        p = wl.prompt(i)
        assert p.startswith(head)  # every question shares its subject's few-shot prefix
        tail = p[len(head) :]
        assert tail.endswith("\nAnswer:")
        assert "\nA. " in tail and "\nD. " in tail


def test_mmlu_workload_is_reproducible_and_skewed() -> None:
    a = mmlu_workload(600, alpha=1.2, subjects=10, seed=7)
    b = mmlu_workload(600, alpha=1.2, subjects=10, seed=7)
    c = mmlu_workload(600, alpha=1.2, subjects=10, seed=8)
    assert [a.prompt(i) for i in range(len(a))] == [b.prompt(i) for i in range(len(b))]
    assert [r.group for r in a.requests] != [r.group for r in c.requests]
    counts = sorted(a.group_counts().values(), reverse=True)
    assert len(counts) <= 10
    assert counts[0] > 3 * counts[-1]  # Zipf: the head dominates the tail
    flat = mmlu_workload(2000, alpha=0.0, subjects=10, seed=7).group_counts().values()
    assert max(flat) < 1.5 * min(flat)


def test_mmlu_questions_cycle_without_repeats_first() -> None:
    wl = mmlu_workload(50, alpha=0.0, subjects=["virology"], seed=2)
    suffixes = [r.suffix for r in wl.requests]
    assert len(set(suffixes)) == 50  # 50 shipped test rows: none repeats before all are used


def test_mmlu_loads_from_a_path(tmp_path, monkeypatch) -> None:
    (tmp_path / "dev").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "dev" / "toy_dev.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\n" + "Q?,a,b,c,d,2\n" * 5
    )
    (tmp_path / "test" / "toy_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nWhat?,w,x,y,z,0\n"
    )
    wl = mmlu_workload(3, alpha=1.0, seed=0, path=tmp_path)
    assert {r.group for r in wl.requests} == {"toy"}
    monkeypatch.setenv("ZMESH_MMLU_DIR", str(tmp_path))
    assert mmlu_dir() == tmp_path
    with pytest.raises(FileNotFoundError):
        mmlu_dir(tmp_path / "missing")


def test_shared_prefix_workload() -> None:
    wl = shared_prefix_workload(300, groups=5, alpha=1.0, prefix_words=50, seed=3)
    assert len(wl) == 300
    assert len(wl.group_counts()) <= 5
    heads = {r.group: r.prefix for r in wl.requests}
    for r in wl.requests:
        assert wl.prompt(r.index).startswith(heads[r.group])
    assert len({r.suffix for r in wl.requests}) == 300  # a question of its own each
    pooled = shared_prefix_workload(300, groups=5, seed=3, questions=10)
    assert len({r.suffix for r in pooled.requests}) <= 10
    again = shared_prefix_workload(300, groups=5, alpha=1.0, prefix_words=50, seed=3)
    assert [again.prompt(i) for i in range(300)] == [wl.prompt(i) for i in range(300)]


def test_chat_turns_extend_the_previous_prompt_and_answer() -> None:
    wl = chat_workload(6, turns=4, system_prompts=2, seed=1)
    assert len(wl) == 24
    streams = wl.streams()
    assert len(streams) == 6 and all(len(s) == 4 for s in streams)
    for s in streams:
        for a, b in itertools.pairwise(s):
            assert wl.requests[b].parent == a
            assert wl.prompt(b).startswith(wl.prompt(a))
            assert len(wl.prompt(b)) > len(wl.prompt(a)) + 20  # the answer and a new message
    # Independent requests are streams of one.
    assert all(len(s) == 1 for s in mmlu_workload(5, seed=0).streams())


def test_make_workload_dispatch() -> None:
    assert make_workload("mmlu", 10, 1.0, 0, subjects=3).name == "mmlu"
    assert make_workload("shared", 10, 1.0, 0).name == "shared"
    assert len(make_workload("chat", 12, 1.0, 0, turns=3)) == 12
    with pytest.raises(ValueError):
        make_workload("nope", 10, 1.0, 0)


def test_poisson_arrivals() -> None:
    times = poisson_arrivals(20_000, rate=5.0, seed=4)
    assert times == sorted(times)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert abs(sum(gaps) / len(gaps) - 0.2) < 0.01  # mean gap 1/rate
    assert poisson_arrivals(10, 5.0, seed=4) == times[:10]
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0)


def test_arrivals_validate() -> None:
    assert "closed" in Arrivals("closed", concurrency=2).describe()
    assert "Poisson" in Arrivals("poisson", rate=3).describe()
    for bad in ({"mode": "burst"}, {"concurrency": 0}, {"rate": 0.0}, {"think_s": -1.0}):
        with pytest.raises(ValueError):
            Arrivals(**bad)  # type: ignore[arg-type]


# ---- bursty long conversations --------------------------------------------------------------


def test_bursty_workload_is_seeded_long_chained_and_heavy_tailed() -> None:
    wl = bursty_workload(600, sessions=12, seed=3)
    again = bursty_workload(600, sessions=12, seed=3)
    assert wl.requests == again.requests
    assert bursty_workload(600, sessions=12, seed=4).requests != wl.requests
    assert len(wl) == 600 and wl.name == "bursty"
    children = [r for r in wl.requests if r.parent >= 0]
    assert len(children) > 300  # mostly later turns
    for r in children[:50]:
        parent = wl.requests[r.parent]
        assert parent.session == r.session and parent.index < r.index
        assert wl.prompt(r.index).startswith(wl.prompt(r.parent))  # a turn extends the last
    # Long prompts (thousands of tokens: ~1.5 stand-in tokens per word), long answers.
    words = sorted(len(wl.prompt(i).split()) for i in range(len(wl)))
    assert 1000 < words[len(words) // 2] < 3400
    assert max(words) <= 3000 + 4 * 600 + 300
    answers = sorted(r.max_tokens for r in wl.requests)
    median = answers[len(answers) // 2]
    assert 100 <= median <= 220 and answers[0] >= 16 and answers[-1] <= 1024
    assert answers[int(0.99 * len(answers))] > 3 * median  # a heavy tail
    # Sessions are interleaved: a session's next turn is several requests later.
    gaps = [r.index - r.parent for r in children]
    assert sorted(gaps)[len(gaps) // 2] >= 6
    assert len({r.session for r in wl.requests}) > 12  # ended sessions are replaced
    with pytest.raises(ValueError):
        bursty_workload(10, sessions=0)


def test_make_workload_knows_bursty_and_scales_it() -> None:
    full = make_workload("bursty", 200, 1.0, 0, sessions=8)
    small = make_workload("bursty", 200, 1.0, 0, sessions=8, scale=0.25)
    assert full.params["sessions"] == 8
    n_full = sum(len(full.prompt(i)) for i in range(200))
    n_small = sum(len(small.prompt(i)) for i in range(200))
    assert n_small < 0.4 * n_full
    with pytest.raises(ValueError, match="bursty"):
        make_workload("nope", 10, 1.0, 0)


def test_burst_arrivals_bunch_and_spread_keeps_the_load() -> None:
    n, rate, burst = 20_000, 2.0, 8.0
    due = burst_arrivals(n, rate, burst, seed=1)
    assert len(due) == n and due == sorted(due)
    assert burst_arrivals(n, rate, burst, seed=1) == due
    groups = Counter(due)
    assert abs(n / len(groups) - burst) < 0.5  # mean burst size
    assert max(groups.values()) > 3 * burst  # geometric sizes: some large bursts
    assert abs(n / due[-1] - rate) < 0.1 * rate  # the offered rate
    spread = burst_arrivals(n, rate, burst, seed=1, spread=True)
    assert spread == sorted(spread) and len(set(spread)) == n  # no two at one instant
    starts = sorted(groups)
    assert set(starts) <= set(spread)  # each burst still starts where it did
    assert abs(spread[-1] - due[-1]) < 60 / rate
    arr = Arrivals("bursts", rate=rate, burst=burst)
    assert arr.due(50, seed=1) == due[:50]
    assert "bursts of 8" in arr.describe()
    assert Arrivals("poisson").due(5) == []
    for bad in ({"burst": 0.5}, {"rate": -1.0}):
        with pytest.raises(ValueError):
            Arrivals("bursts", **bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        burst_arrivals(5, 1.0, 0.0)
