"""The engine's error paths on the real model, with faults injected: a step that raises
(in llama_decode, in sampling, while admitting), a ``deliver`` that drops or raises, a
cancel that lands as a request finishes, and `Engine.close` with work still pending.

Each fault is a monkeypatched llama.cpp call (or callback) that raises once, armed on
the engine thread at a known step, so which step fails is a fact, not a timing. After
every test the engine runs nothing, waits for nothing and agrees with llama.cpp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp as ll
import pytest
from test_batching import COUNT, LETTERS

import zmesh.engine.sequence as sequence_mod
from zmesh.config import EngineConfig
from zmesh.engine import Engine, EngineError, GenerationResult, Handle, Request, run_calls
from zmesh.engine.delivery import Call
from zmesh.kvstate import KvState
from zmesh.protocol import SamplingParams

WAIT_S = 60.0  # bound on every wait for a fact (2 shared cores, a loaded machine)
SHORT = SamplingParams(max_tokens=16, temperature=0.0)
ENDS_IN_6 = SamplingParams(max_tokens=6, temperature=0.0)


class Fault:
    """Stands in for a llama.cpp function: calls through until armed, then raises
    once (and calls through again)."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.armed = False
        self.fired = 0

    def __call__(self, *args: Any) -> Any:
        if self.armed:
            self.armed = False
            self.fired += 1
            raise RuntimeError("injected fault")
        return self.real(*args)


class Ends:
    """Every ``on_done`` call per request, and whether it came through `deliver`."""

    def __init__(self, eng: Engine) -> None:
        self.calls: dict[str, list[tuple[GenerationResult | None, BaseException | None]]] = {}
        self.via_deliver: dict[str, bool] = {}
        self._inside = threading.local()

        def deliver(calls: list[Call]) -> None:
            self._inside.on = True
            try:
                run_calls(calls)
            finally:
                self._inside.on = False

        eng.deliver = deliver

    def on_done(self, name: str) -> Callable[[GenerationResult | None, BaseException | None], None]:
        self.calls[name] = []

        def done(result: GenerationResult | None, error: BaseException | None) -> None:
            self.calls[name].append((result, error))
            self.via_deliver[name] = getattr(self._inside, "on", False)

        return done


@pytest.fixture(scope="module")
def eng() -> Iterator[Engine]:
    with Engine(EngineConfig(n_slots=3, slot_ctx=256, prefill_chunk=32)) as e:
        yield e


@pytest.fixture(scope="module")
def alone(eng: Engine) -> dict[str, str]:
    """Each prompt's greedy answer, served alone before any fault."""
    return {p: eng.generate(p, params=SHORT, namespace=f"alone-{p[:3]}").text for p in (COUNT,)}


@pytest.fixture(autouse=True)
def clean(eng: Engine) -> Iterator[None]:
    yield
    eng.deliver = run_calls
    eng.on_step = None
    assert eng.running() == 0 and eng.waiting() == 0
    assert eng.running_slots() == 0
    assert eng.check_consistency() == []
    eng.clear()


def _submit_together(eng: Engine, requests: list[tuple[Request, Any]]) -> list[Handle]:
    """Queue all of them between two steps (the engine thread submits them), so the
    first step admits them all and the handles exist before any step runs."""
    return eng.call_soon(lambda: [eng.submit(r, None, done) for r, done in requests]).result(WAIT_S)


def _on_both_decoding(eng: Engine, then: Callable[[], None]) -> threading.Event:
    """Run ``then`` on the engine thread right after the first step in which two
    sequences both decoded a token and at least two steps ran: the next step decodes
    both again (16 tokens each, far from their end)."""
    fired = threading.Event()
    seen = [0]

    def on_step(report: Any) -> None:
        if len(report.decoded) == 2 and not fired.is_set():
            seen[0] += 1
            if seen[0] == 2:
                then()
                fired.set()

    eng.on_step = on_step
    return fired


def _serves_on(eng: Engine, alone: dict[str, str]) -> None:
    """The engine thread survived: it serves the next requests as before the fault."""
    assert eng.generate(COUNT, params=SHORT, namespace="after").text == alone[COUNT]
    h = eng.submit(Request(prompt=COUNT, params=SHORT, namespace="after-2"))
    assert h.result(WAIT_S).text == alone[COUNT]


# ---- F2: a step that raises -------------------------------------------------------


@pytest.mark.parametrize("where", ["llama_decode", "llama_sampler_sample"])
def test_a_step_that_raises_fails_every_sequence_of_its_batch_and_the_engine_serves_on(
    eng: Engine, alone: dict[str, str], monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    fault = Fault(getattr(ll, where))
    monkeypatch.setattr(ll, where, fault)
    ends = Ends(eng)
    fired = _on_both_decoding(eng, lambda: setattr(fault, "armed", True))
    handles = _submit_together(
        eng,
        [
            (Request(prompt=COUNT, params=SHORT, namespace="f-a"), ends.on_done("a")),
            (Request(prompt=LETTERS, params=SHORT, namespace="f-b"), ends.on_done("b")),
        ],
    )
    for h in handles:
        with pytest.raises(EngineError, match="engine step failed: injected fault") as err:
            h.result(WAIT_S)
        assert err.value.code == "internal"
    assert fired.is_set() and fault.fired == 1
    for name in ("a", "b"):
        (result, error), *more = ends.calls[name]
        assert more == [] and result is None and isinstance(error, EngineError), name
        # A failed step's ends go out like any end: through deliver (review F2).
        assert ends.via_deliver[name], name
    eng.deliver = run_calls
    _serves_on(eng, alone)


def test_ends_made_before_a_step_raises_are_still_delivered(
    eng: Engine, alone: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled request leaves the engine's lists at the start of a step; if that
    step's decode then raises, its end must still go out (review F2): it ends
    "cancelled", once, and only the request that was in the failed batch fails."""
    fault = Fault(ll.llama_decode)
    monkeypatch.setattr(ll, "llama_decode", fault)
    ends = Ends(eng)
    handles: list[Handle] = []

    def cancel_a_and_arm() -> None:
        handles[0].cancel()  # ended by the next step's admission, before its decode
        fault.armed = True

    _on_both_decoding(eng, cancel_a_and_arm)
    handles += _submit_together(
        eng,
        [
            (Request(prompt=COUNT, params=SHORT, namespace="g-a"), ends.on_done("a")),
            (Request(prompt=LETTERS, params=SHORT, namespace="g-b"), ends.on_done("b")),
        ],
    )
    a, b = handles
    assert a.result(WAIT_S).finish_reason == "cancelled"
    with pytest.raises(EngineError, match="injected fault"):
        b.result(WAIT_S)
    assert fault.fired == 1
    assert [r.finish_reason for r, _ in ends.calls["a"] if r is not None] == ["cancelled"]
    assert len(ends.calls["a"]) == 1 and len(ends.calls["b"]) == 1
    eng.deliver = run_calls
    _serves_on(eng, alone)


def test_a_request_whose_admission_raises_frees_its_slot(
    eng: Engine, alone: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admitting pins a slot, then builds the sampler; if that raises the request is
    already on the running list, so the failure path ends it and frees the slot
    (review F5) instead of leaving it pinned and the caller waiting forever."""
    fault = Fault(sequence_mod.make_sampler)
    fault.armed = True
    monkeypatch.setattr(sequence_mod, "make_sampler", fault)
    h = eng.submit(Request(prompt=COUNT, params=SHORT, namespace="adm"))
    with pytest.raises(EngineError, match="injected fault"):
        h.result(WAIT_S)
    assert fault.fired == 1
    assert eng.running_slots() == 0
    _serves_on(eng, alone)


# ---- deliver that never runs the calls, or raises ----------------------------------


@pytest.mark.parametrize("how", ["drops", "raises"])
def test_a_handle_ends_even_if_deliver_never_runs_its_callbacks(
    eng: Engine, alone: dict[str, str], how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node hands each step's calls to its loop; a loop that closed never runs them.
    The Handle still ends (its future is settled on the engine thread), and a deliver
    that raises costs its callbacks, not the engine thread."""
    handed: list[int] = []

    def deliver(calls: list[Call]) -> None:
        handed.append(len(calls))
        if how == "raises":
            raise RuntimeError("deliver broke")

    eng.deliver = deliver
    pieces: list[str] = []
    h = eng.submit(Request(prompt=COUNT, params=SHORT, namespace=f"d-{how}"), pieces.append)
    with caplog.at_level(logging.ERROR, logger="zmesh.engine"):
        r = h.result(WAIT_S)
    assert r.text == alone[COUNT] and r.finish_reason == "length"
    assert pieces == [] and handed  # every step's pieces went to deliver, none ran
    if how == "raises":
        assert "engine deliver failed" in caplog.text
    eng.deliver = run_calls
    _serves_on(eng, alone)


# ---- a cancel that lands as the request finishes -------------------------------------


def _cancel_after(
    eng: Engine, k: int, params: SamplingParams, from_on_done: bool
) -> tuple[GenerationResult, list[tuple[GenerationResult | None, BaseException | None]]]:
    """Serve COUNT, cancelling it when its k-th piece is delivered (or from on_done);
    its result and every on_done call it got."""
    ends = Ends(eng)
    holder: list[Handle] = []
    seen: list[str] = []
    done = ends.on_done("r")

    def on_piece(text: str) -> None:
        seen.append(text)
        if len(seen) == k and not from_on_done:
            holder[0].cancel()

    def on_done(r: GenerationResult | None, e: BaseException | None) -> None:
        done(r, e)
        if from_on_done:
            holder[0].cancel()

    request = Request(prompt=COUNT, params=params, namespace=f"k{k}-{from_on_done}")
    # Submitted on the engine thread: the handle is known before the first piece.
    holder += eng.call_soon(lambda: [eng.submit(request, on_piece, on_done)]).result(WAIT_S)
    result = holder[0].result(WAIT_S)
    give_up = time.monotonic() + WAIT_S
    while not ends.calls["r"]:  # on_done runs in the same deliver, before the future
        assert time.monotonic() < give_up, "no on_done"
        time.sleep(0.01)
    eng.deliver = run_calls
    return result, ends.calls["r"]


def test_a_cancel_at_any_step_ends_the_request_exactly_once(
    eng: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Cancel after the k-th piece, for every k up to the last (delivered with the
    end, so that cancel comes after it finished), and from on_done itself: each
    request ends once, cancelled iff the cancel came before its last token, and its
    future and on_done agree."""
    n = ENDS_IN_6.max_tokens
    full = eng.generate(COUNT, params=ENDS_IN_6, namespace="k-ref")
    assert full.completion_tokens == n and full.finish_reason == "length"
    cases = [(k, False) for k in range(1, n + 1)] + [(n, True)]
    with caplog.at_level(logging.ERROR, logger="zmesh.engine"):
        for k, from_on_done in cases:
            r, calls = _cancel_after(eng, k, ENDS_IN_6, from_on_done)
            assert len(calls) == 1 and calls[0][0] is r, (k, calls)
            if k < n and not from_on_done:
                assert r.finish_reason == "cancelled" and r.completion_tokens == k, (k, r)
                assert full.text.startswith(r.text)
            else:
                assert r.finish_reason == "length" and r.text == full.text, (k, r)
    assert "engine callback failed" not in caplog.text


# ---- close (review F9) -------------------------------------------------------------


def test_close_fails_pending_calls_and_requests_and_refuses_new_work() -> None:
    """A call_soon queued and a request running when the engine closes both fail with
    "engine closed" (an asyncio caller awaiting the call wakes); afterwards submit and
    call_soon raise at once, and close again is a no-op."""
    eng = Engine(EngineConfig(n_slots=2, slot_ctx=128))
    ends = Ends(eng)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:  # keeps the engine thread at a step boundary
        entered.set()
        release.wait(WAIT_S)

    held = eng.call_soon(hold)
    assert entered.wait(WAIT_S)
    later = eng.call_soon(lambda: "ran")  # queued behind the held boundary
    running = eng.submit(
        Request(prompt=COUNT, params=SamplingParams(max_tokens=100, temperature=0.0)),
        on_done=ends.on_done("running"),
    )
    closer = threading.Thread(target=eng.close, name="closer")

    async def await_later() -> None:
        waiter = asyncio.ensure_future(asyncio.wrap_future(later))
        closer.start()
        give_up = time.monotonic() + WAIT_S
        while not eng.closed:
            assert time.monotonic() < give_up, "close did not start"
            await asyncio.sleep(0.01)
        release.set()  # the thread finishes this step and stops
        with pytest.raises(EngineError, match="engine closed") as err:
            await asyncio.wait_for(waiter, WAIT_S)
        assert err.value.code == "unavailable"

    try:
        asyncio.run(await_later())
        closer.join(WAIT_S)
        assert not closer.is_alive()
        assert held.result(0) is None
        with pytest.raises(EngineError, match="engine closed"):
            running.result(0)
        ((result, error),) = ends.calls["running"]
        assert result is None and isinstance(error, EngineError)
        with pytest.raises(EngineError, match="engine closed"):
            eng.submit(Request(prompt="Hi"))
        with pytest.raises(EngineError, match="engine closed"):
            eng.call_soon(lambda: None)
        with pytest.raises(EngineError, match="engine closed"):
            eng.generate("Hi")
    finally:
        release.set()
        eng.close()  # again: a no-op
    assert eng.closed


def test_close_on_the_engine_thread_is_refused() -> None:
    """It would free llama.cpp's context under the step running the call."""
    with Engine(EngineConfig(n_slots=1, slot_ctx=128)) as eng:
        err = eng.call_soon(eng.close).exception(WAIT_S)
        assert isinstance(err, RuntimeError)
        assert eng.generate("Hi", params=SamplingParams(max_tokens=2)).completion_tokens == 2


def test_close_waits_for_a_tokenization_under_way_on_another_thread() -> None:
    """A node tokenizes on its own thread; a close meanwhile must not free the
    vocabulary under it (llama.cpp aborts the process), and later calls are refused."""
    eng = Engine(EngineConfig(n_slots=1, slot_ctx=4096))
    text = "The river bends east past the mill and the old stone bridge. " * 400
    started = threading.Event()
    outcome: list[BaseException] = []

    def tokenize_until_closed() -> None:
        while True:
            started.set()
            try:
                eng.prompt_tokens(text, None)  # over the limit: refused after tokenizing
            except EngineError as exc:
                if exc.code != "prompt_too_long":
                    outcome.append(exc)
                    return

    t = threading.Thread(target=tokenize_until_closed, name="tokenize")
    t.start()
    assert started.wait(WAIT_S)
    eng.close()
    t.join(WAIT_S)
    assert not t.is_alive()
    (err,) = outcome
    assert isinstance(err, EngineError) and err.message == "engine closed"


# ---- calls on the llama.cpp context after close -------------------------------------


def _outcome(call: Callable[[], object]) -> str:
    """ "closed" for the engine's clear error; anything else, named (a C crash ends the
    test run before this returns: it also fails)."""
    try:
        call()
    except EngineError as exc:
        if exc.code == "unavailable" and exc.message == "engine closed":
            return "closed"
        return f"EngineError({exc.code}, {exc.message})"
    except Exception as exc:
        return repr(exc)
    return "returned"


def _two_states(eng: Engine) -> tuple[list[int], dict[str, KvState]]:
    """On a one-slot engine: COUNT's exported state in namespaces "a" and "b"; the slot
    holds "b"'s. Importing "a"'s then evicts the slot (llama.cpp work, not a no-op)."""
    states = {}
    for ns in ("a", "b"):
        eng.generate(COUNT, params=ENDS_IN_6, namespace=ns)
        state = eng.export_prefix(eng.tokenize(COUNT), ns)
        assert state is not None
        states[ns] = state
    return eng.tokenize(COUNT), states


def test_calls_on_the_freed_context_after_close_raise_engine_closed() -> None:
    """`close` frees llama.cpp's context and model while the slots still hold what they
    cached: an export, an import or a clear after it would read freed C memory (a
    segfault or garbage). Each, and every other call touching llama.cpp, raises the
    engine's "engine closed" (unavailable) instead."""
    eng = Engine(EngineConfig(n_slots=1, slot_ctx=128))
    try:
        tokens, states = _two_states(eng)
    finally:
        eng.close()
    assert eng.busy_slots() == 1  # what it held is still on the books: calls would use it
    calls: dict[str, Callable[[], object]] = {
        "export_prefix": lambda: eng.export_prefix(tokens, "b"),
        "import_prefix": lambda: eng.import_prefix(states["a"], "a"),
        "clear": eng.clear,
        "slot_state_bytes": lambda: eng.slot_state_bytes(0),
        "check_consistency": eng.check_consistency,
        "step": eng.step,
        "tokenize": lambda: eng.tokenize("Hi"),
        "detokenize": lambda: eng.detokenize(tokens),
        "chat_template": eng.chat_template,
    }
    assert {name: _outcome(call) for name, call in calls.items()} == dict.fromkeys(calls, "closed")


@pytest.mark.parametrize("where", ["export_prefix", "import_prefix", "clear"])
def test_a_call_racing_close_completes_or_raises_engine_closed(where: str) -> None:
    """The node exports and imports on its loop's threads while a stop closes the engine
    on another: a call either runs on a live context or raises "engine closed", never
    reads freed memory. The racer calls in a loop, each call doing llama.cpp work (an
    export of what the slot holds; an import of the other namespace's state, evicting
    it; a clear after an import), until close has returned and it made a few more
    calls; every call after close must raise."""
    eng = Engine(EngineConfig(n_slots=1, slot_ctx=128))
    try:
        tokens, states = _two_states(eng)
    except BaseException:
        eng.close()
        raise
    closed_done = threading.Event()
    ran = threading.Event()
    outcomes: list[str] = []
    after_close: list[str] = []
    n = [0]

    def step_boundary() -> None:
        """The engine thread runs a step: nothing waits, so it drops the slot
        reservation an import made (else the next import would find no idle slot)."""
        with contextlib.suppress(EngineError):  # closed meanwhile: nothing to drop
            eng.call_soon(lambda: None).result(WAIT_S)

    def one_call() -> object:
        n[0] += 1
        if where == "export_prefix":
            return eng.export_prefix(tokens, "b")
        ns = "a" if n[0] % 2 else "b"
        if where == "import_prefix":
            got = eng.import_prefix(states[ns], ns)
            step_boundary()
            return got
        eng.import_prefix(states[ns], ns)  # something for the clear to drop
        step_boundary()
        return eng.clear()

    def race() -> None:
        while len(after_close) < 3:
            late = closed_done.is_set()  # close had returned before this call began
            got = _outcome(one_call)
            (after_close if late else outcomes).append(got)
            ran.set()

    racer = threading.Thread(target=race, name="racer")
    racer.start()
    try:
        assert ran.wait(WAIT_S)
        eng.close()
        closed_done.set()
        racer.join(WAIT_S)
        assert not racer.is_alive()
    finally:
        closed_done.set()
        eng.close()
    assert set(outcomes) <= {"returned", "closed"}, outcomes
    assert "returned" in outcomes
    assert set(after_close) <= {"closed"}, after_close
