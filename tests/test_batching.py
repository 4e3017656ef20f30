"""Continuous batching on the real model: every running request advances in one
llama_decode step, a long prompt is prefilled in chunks between the decoders' tokens,
and nothing one request does (arriving, sharing a prefix, being cancelled) changes
another's answer. Steps are counted through `Engine.on_step`, never timed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from test_engine import FEW_SHOT

from zmesh.config import EngineConfig
from zmesh.engine import Engine, GenerationResult, Handle, Request, StepReport
from zmesh.protocol import SamplingParams

CHUNK = 64
# Greedy paths with a clear margin (measured on the packaged model, cold, one at a
# time): every step's winner beats the runner-up by at least the figure given, over
# the first N tokens. llama.cpp's sums change with the batch shape (up to ~0.6 logits
# measured), so a flip here is a batching bug, not rounding.
COUNT = "1, 2, 3, 4, 5, 6, 7, 8,"  # 2.7 logits over 16 tokens
LETTERS = "A B C D E F G H I"  # 2.1 logits over 16 tokens
QUESTION = FEW_SHOT + (  # 3.5 logits over 12 tokens (tests/test_engine.py); ~420 tokens
    "Question 14: Which body is closest to the Earth? A. Sirius B. The Moon "
    "C. Proxima Centauri D. Vega\nAnswer:"
)
SHORT = SamplingParams(max_tokens=16, temperature=0.0)
LONG = SamplingParams(max_tokens=12, temperature=0.0)
PARAMS = {COUNT: SHORT, LETTERS: SHORT, QUESTION: LONG}


@pytest.fixture(scope="module")
def eng() -> Iterator[Engine]:
    with Engine(EngineConfig(n_slots=3, slot_ctx=1024, prefill_chunk=CHUNK)) as e:
        yield e


@pytest.fixture(scope="module")
def sequential(eng: Engine) -> dict[str, str]:
    """Each prompt's answer served alone, cold (its own namespace)."""
    return {
        p: eng.generate(p, params=PARAMS[p], namespace=f"alone-{i}").text
        for i, p in enumerate(PARAMS)
    }


@pytest.fixture
def steps(eng: Engine) -> Iterator[list[StepReport]]:
    """The steps a test makes; the engine must be consistent after it."""
    reports: list[StepReport] = []
    eng.on_step = reports.append
    yield reports
    eng.on_step = None
    assert eng.running() == 0 and eng.waiting() == 0
    assert eng.check_consistency() == []
    eng.clear()


def _submit_together(eng: Engine, requests: list[Request]) -> list[Handle]:
    """Queue all of them between two steps, so the first step admits them all."""
    return eng.call_soon(lambda: [eng.submit(r) for r in requests]).result()


def test_concurrent_greedy_equals_sequential(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    handles = _submit_together(
        eng,
        [
            Request(prompt=p, params=PARAMS[p], namespace=f"together-{i}")
            for i, p in enumerate(PARAMS)
        ],
    )
    results = [h.result() for h in handles]
    for p, r in zip(PARAMS, results, strict=True):
        assert r.text == sequential[p], p
        assert r.completion_tokens == PARAMS[p].max_tokens
    assert len({r.slot for r in results}) == 3
    # They really ran together: some steps decoded all three.
    assert max(len(s.decoded) for s in steps) == 3


def test_seeded_sampling_is_reproducible_per_request() -> None:
    """Same requests on fresh engines (same KV layout): each one samples its own
    stream, whatever else shares its steps."""
    seeded = [
        Request(
            prompt=p,
            params=SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=seed),
            namespace=f"s{seed}",
        )
        for p, seed in [("Once upon a time", 1), ("Once upon a time", 2), ("The river", 3)]
    ]
    texts = []
    for _ in range(2):
        with Engine(EngineConfig(n_slots=3, slot_ctx=256, prefill_chunk=CHUNK)) as fresh:
            texts.append([h.result().text for h in _submit_together(fresh, seeded)])
            assert fresh.check_consistency() == []
    assert texts[0] == texts[1]
    assert all(texts[0])


def test_request_arriving_mid_decode_shares_the_busy_prefix_and_stalls_nothing(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    pieces: list[str] = []
    four = threading.Event()

    def on_piece(text: str) -> None:
        pieces.append(text)
        if len(pieces) >= 4:
            four.set()

    first = eng.submit(Request(prompt=QUESTION, params=LONG, namespace="mid"), on_piece)
    assert four.wait(600), "the first request never streamed"
    n_before = len(steps)
    # Same prompt, same namespace: its prefix is in the first one's busy slot.
    second = eng.submit(Request(prompt=QUESTION, params=LONG, namespace="mid"))
    a, b = first.result(), second.result()
    assert a.text == b.text == sequential[QUESTION]
    assert "".join(pieces) == a.text
    assert b.slot != a.slot  # a busy slot is shared from, never continued in
    assert b.cached_tokens == b.prompt_tokens - 1
    # The first request decoded a token in every step until it ended.
    after = steps[n_before:]
    ended = next(i for i, s in enumerate(after) if a.slot not in s.decoded)
    assert all(a.slot in s.decoded for s in after[:ended])
    assert a.completion_tokens == LONG.max_tokens


def test_cancelling_one_sequence_leaves_the_others_untouched(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    victim: list[Handle] = []
    seen: list[str] = []

    def cancel_after_three(text: str) -> None:
        seen.append(text)
        if len(seen) == 3:
            victim[0].cancel()

    requests = [
        Request(prompt=COUNT, params=SHORT, namespace="c-count"),
        Request(prompt=LETTERS, params=SHORT, namespace="c-letters"),
    ]
    keep = _submit_together(eng, requests)
    victim.append(
        eng.submit(
            Request(prompt="List the planets:", params=SHORT, namespace="c-gone"),
            cancel_after_three,
        )
    )
    gone = victim[0].result()
    assert gone.finish_reason == "cancelled"
    assert 3 <= gone.completion_tokens < SHORT.max_tokens
    assert [h.result().text for h in keep] == [sequential[COUNT], sequential[LETTERS]]
    # The cancelled slot is idle again and holds what it decoded.
    assert eng.running_slots() == 0
    held = dict(enumerate(eng.slot_tokens()))[gone.slot][1]
    assert len(held) == gone.prompt_tokens + gone.completion_tokens - 1


def test_a_request_past_its_deadline_ends_without_touching_the_others(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    late = Request(prompt=LETTERS, params=SHORT, namespace="late", deadline=time.time() - 1)
    ok, expired = _submit_together(eng, [Request(prompt=COUNT, params=SHORT, namespace="ok"), late])
    r = expired.result()
    assert r.finish_reason == "cancelled" and r.completion_tokens == 0
    assert ok.result().text == sequential[COUNT]


def test_a_long_prompt_is_prefilled_in_chunks_while_another_slot_decodes(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    started = threading.Event()
    decoder = eng.submit(
        Request(prompt=COUNT, params=SHORT, namespace="d"), lambda _t: started.set()
    )
    assert started.wait(600)
    long = eng.submit(Request(prompt=QUESTION, params=LONG, namespace="long"))
    d, q = decoder.result(), long.result()
    assert d.text == sequential[COUNT] and q.text == sequential[QUESTION]
    chunks = [s for s in steps if s.prefill is not None and s.prefill[0] == q.slot]
    assert sum(n for _, n in (s.prefill for s in chunks if s.prefill)) == q.prompt_tokens
    together = [s for s in chunks if d.slot in s.decoded]
    # Both progressed in the same steps: chunk after chunk of the prompt, each in a
    # step that also decoded a token of the running request.
    assert len(together) >= 3
    assert all(s.prefill is not None and s.prefill[1] <= CHUNK for s in together)
    assert q.prompt_tokens > 3 * CHUNK


def test_prompts_admitted_together_prefill_one_at_a_time_and_rate_their_own_steps(
    eng: Engine, steps: list[StepReport]
) -> None:
    # Two cold prompts in one step: every chunk of the first comes before the second's
    # (the load model, candidates.batch_wait_s, relies on it). The second's prefill
    # time since admission spans the first's steps too; its prefill rate, which routing
    # compares across nodes, must count only its own (prefill_work_s).
    a, b = (
        h.result()
        for h in _submit_together(
            eng,
            [Request(prompt=QUESTION, params=LONG, namespace=f"pair-{k}") for k in range(2)],
        )
    )
    order = [s.prefill[0] for s in steps if s.prefill is not None]
    assert order == [a.slot] * order.count(a.slot) + [b.slot] * order.count(b.slot)
    assert a.prompt_tokens == b.prompt_tokens and a.cached_tokens == b.cached_tokens <= 1
    assert 0.0 < a.prefill_work_s <= a.prefill_s
    # b waited through a's whole prefill (the same prompt's): about half its time.
    assert 0.0 < b.prefill_work_s < 0.8 * b.prefill_s


def test_generate_still_serves_one_request_with_streamed_text(
    eng: Engine, sequential: dict[str, str], steps: list[StepReport]
) -> None:
    pieces: list[str] = []
    r: GenerationResult = eng.generate(COUNT, params=SHORT, namespace="g", on_text=pieces.append)
    assert "".join(pieces) == r.text == sequential[COUNT]
