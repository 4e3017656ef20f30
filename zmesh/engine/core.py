"""The step-based engine: every running request advances in one ``llama_decode``.

`Engine.step` builds one batch with one token for every decoding slot (its own
sequence id and position, logits on) plus at most one chunk of one pending prompt
(``prefill_chunk`` tokens while others decode, so a long prompt never stalls them for
its whole prefill), decodes it once, and samples each sequence from its own logits
row. A failed decode rolls every sequence of that batch back to what it held before
and fails those requests; the trees never claim more than llama.cpp holds.

One long-lived engine thread runs the steps. Other threads `submit` requests (they
wait in a FIFO until a slot is idle and fewer than ``max_running`` run), cancel them,
and hand it work to run between two steps (`call_soon`: KV exports and imports). Each
step's text pieces and ends go out together through ``deliver`` (one hop to an event
loop; `delivery.deliver_calls`); a `Handle`'s future is settled on the engine thread,
so it ends even if what ``deliver`` hands the calls to never runs them. `close` fails
whatever has not ended or run yet with ``EngineError("engine closed")``. `generate` is
the synchronous one-request wrapper over the same path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

import llama_cpp as ll

from zmesh.blocks import DEFAULT_KEY
from zmesh.config import EngineConfig
from zmesh.engine.delivery import Call, Settle, bind, deliver_calls, run_calls
from zmesh.engine.kvship import KvPool
from zmesh.engine.sequence import Handle, OnDone, OnPiece, Phase, Sequence
from zmesh.engine.types import (
    EngineError,
    GenerationResult,
    Request,
    StepReport,
    closed_error,
)
from zmesh.protocol import INVALID_REQUEST, SamplingParams
from zmesh.slots import choose
from zmesh.stats import ewma

log = logging.getLogger("zmesh.engine")


class Engine(KvPool):
    def __init__(self, config: EngineConfig | None = None, hash_key: bytes = DEFAULT_KEY) -> None:
        cfg = config or EngineConfig()
        super().__init__(cfg, hash_key)
        self.prefill_chunk = cfg.prefill_chunk
        # Requests running at once (1 = the old one-at-a-time engine); settable.
        self.max_running = cfg.max_running or cfg.n_slots
        # Called once per step with that step's callbacks (pieces, ends) of requests
        # not submitted by `generate`; the node sets it to hop to its loop once.
        self.deliver: Callable[[list[Call]], None] = run_calls
        self.on_step: Callable[[StepReport], None] | None = None  # tests, benches
        self._cond = threading.Condition()  # guards the queues below and _closed
        self._waiting: deque[Sequence] = deque()
        self._between: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._running: list[Sequence] = []  # engine thread only, in admission order
        self._thread: threading.Thread | None = None
        self._closed = False
        self._miss_probe: tuple[int, ...] | None = None  # BOS + a token no prompt has
        self._model_users = 0  # `_model_use` calls under way (close waits for them)

    # ---- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop the engine thread and free llama.cpp (idempotent). Every request not
        ended and every `call_soon` not run yet fails with `closed_error` (a caller
        waiting on one is never left hanging); `submit` and `call_soon` raise it from
        now on."""
        if threading.current_thread() is self._thread:
            # It would free the context under the step that runs this very call.
            raise RuntimeError("close() on the engine thread")
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            while self._model_users:  # other threads read the vocabulary close frees
                self._cond.wait()
        t = self._thread
        if t is not None:
            t.join()  # no step runs after this, and no new thread starts (_closed)
        with self._cond:
            between, self._between = self._between, []
        for _, fut in between:
            if fut.set_running_or_notify_cancel():
                fut.set_exception(closed_error())
        with self._llama:  # a call holding the context ends first; later ones raise
            self._fail_all(closed_error())
            self._free_llama()

    @property
    def closed(self) -> bool:
        return self._closed

    def miss_evict_tokens(self) -> int:
        """Cached tokens a miss would overwrite now (the eviction charge's advert): the slot
        policy, running slots pinned, for BOS plus a token no prompt has (ids are >= 0)."""
        if self._miss_probe is None:  # asked per request and heartbeat: tokenize once
            try:
                self._miss_probe = (*self.tokenize("")[:1], -1)
            except EngineError:
                return 0  # closed: a heartbeat during stop advertises nothing to overwrite
        probe = self._miss_probe
        with self._lock:
            c = choose(self._views(probe, ""), len(probe))
        return 0 if c is None or c.in_place else c.evicted

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ensure_thread(self) -> None:
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="zmesh-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._running or self._between):
                    self._cond.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug: fail what runs, keep serving
                log.exception("engine step failed")
                with self._llama:
                    self._fail_all(
                        EngineError("internal", f"engine step failed: {exc}"), deliver=True
                    )

    # ---- the API -------------------------------------------------------------

    def submit(
        self,
        request: Request,
        on_piece: OnPiece | None = None,
        on_done: OnDone | None = None,
        *,
        inline: bool = False,
    ) -> Handle:
        """Queue ``request``; the engine thread serves it. ``on_piece(text)`` gets the
        streamed text, ``on_done(result, error)`` the end, both through ``deliver``
        (``inline``: called on the engine thread). Raises `EngineError` at once for a
        request it cannot serve (bad parameters, prompt too long) or once closed."""
        params = request.params
        try:
            params.validate()
        except ValueError as exc:
            raise EngineError(INVALID_REQUEST, str(exc)) from exc
        ids = self.prompt_tokens(request.prompt, request.tokens)
        seq = Sequence(
            ids,
            params,
            request.namespace,
            min(params.max_tokens, self.slot_ctx - len(ids)),
            deadline=request.deadline,
            should_stop=request.should_stop,
            on_piece=on_piece,
            on_done=on_done,
            inline=inline,
        )
        with self._cond:
            if self._closed:
                raise closed_error()
            self._waiting.append(seq)
            self._cond.notify()
        self._ensure_thread()
        return Handle(seq)

    def prompt_tokens(self, prompt: str | bytes | None, tokens: Seq[int] | None) -> list[int]:
        """`LlamaBase.prompt_tokens` (any thread) under `_model_use`: raises
        `closed_error` once closed, even for token ids."""
        with self._model_use():
            return super().prompt_tokens(prompt, tokens)

    @contextmanager
    def _model_use(self) -> Iterator[None]:
        """Never while `close` frees the model: raises `closed_error` once closed, and
        a close waits for those under way (tokenizing, detokenizing, chat templates)."""
        with self._cond:
            if self._closed:
                raise closed_error()
            self._model_users += 1
        try:
            yield
        finally:
            with self._cond:
                self._model_users -= 1
                if self._closed and not self._model_users:
                    self._cond.notify_all()  # the close waiting for this one

    def generate(
        self,
        prompt: str | bytes | None = None,
        *,
        tokens: Seq[int] | None = None,
        params: SamplingParams | None = None,
        namespace: str = "default",
        on_text: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Serve one request and wait for it; ``on_text`` receives streamed text as it
        is decoded (on the engine thread, before this returns)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("generate() on the engine thread would wait for itself")
        request = Request(
            prompt=prompt,
            tokens=tokens,
            params=params or SamplingParams(),
            namespace=namespace,
            should_stop=should_stop,
        )
        return self.submit(request, on_piece=on_text, inline=True).result()

    def next_token_logits(
        self,
        prompt: str | bytes | None = None,
        *,
        tokens: Seq[int] | None = None,
        namespace: str = "default",
    ) -> tuple[list[float], int]:
        """Logits of the token after ``prompt``, computed as ``generate`` computes them
        (reusing any cached prefix), and the number of prompt tokens reused.

        For checks that reuse changes nothing but float rounding; not used to serve
        (with other requests running, another step may have overwritten the logits).
        """
        r = self.generate(
            prompt, tokens=tokens, params=SamplingParams(max_tokens=1), namespace=namespace
        )
        # One token sampled and not decoded: the prompt's row is the last one out.
        with self._live():
            return ll.llama_get_logits_ith(self._ctx, -1)[: self.n_vocab], r.cached_tokens

    def running(self) -> int:
        """Requests holding a slot now."""
        return len(self._running)

    def waiting(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    # ---- work between steps ---------------------------------------------------

    def call_soon(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the engine thread before its next step (at once when idle).
        Raises `closed_error` once closed; a close before ``fn`` ran fails the future
        with it."""
        fut: Future[Any] = Future()
        with self._cond:
            if self._closed:
                raise closed_error()
            self._between.append((fn, fut))
            self._cond.notify()
        self._ensure_thread()
        return fut

    def _run_between(self) -> None:
        with self._cond:
            work, self._between = self._between, []
        for fn, fut in work:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the waiting thread
                fut.set_exception(exc)

    # ---- one step --------------------------------------------------------------

    def step(self) -> StepReport:
        """Run queued between-step work, admit waiting requests into idle slots, end
        cancelled ones, and decode one batch for everything that runs."""
        calls: list[tuple[Sequence, Call]] = []
        try:
            with self._live():
                self._run_between()
                finished = self._admit(calls)
                report = self._decode(calls, finished) if self._running else None
        finally:
            # Requests this step already ended are out of the engine's lists: their
            # ends must go out even when a later part of the step raised.
            deliver_calls(calls, self.deliver)
        if report is None:
            return StepReport(self.stats.steps, finished=finished)
        if self.on_step is not None:
            self.on_step(report)
        return report

    def _admit(self, calls: list[tuple[Sequence, Call]]) -> int:
        ended = 0
        with self._cond:
            gone = [s for s in self._waiting if s.should_end()]
            for s in gone:
                self._waiting.remove(s)
        for s in gone:
            s.finish = "cancelled"
            self._finish(s, calls)
            ended += 1
        for s in [s for s in self._running if s.should_end()]:
            s.finish = "cancelled"
            self._finish(s, calls)
            ended += 1
        while len(self._running) < self.max_running:
            with self._cond:
                if not self._waiting:
                    break
                seq = self._waiting[0]
            choice = self._claim(seq.ids, seq.namespace)
            if choice is None:
                break  # every slot it could take is busy: FIFO, the rest wait too
            with self._cond:
                self._waiting.popleft()
            # Running first: if admitting raises, the failure path still finds it and
            # frees the slot it pinned.
            self._running.append(seq)
            seq.admitted(self._slots[choice.slot], choice.reuse, choice.evicted)
        with self._cond:
            settled = not self._waiting
        if settled:  # every request queued after an import has claimed its slot or ended
            self._drop_reservations()
        return ended

    def _decode(self, calls: list[tuple[Sequence, Call]], finished: int) -> StepReport:
        b = self._batch
        n = 0
        rows: list[tuple[Sequence, int]] = []  # sequences sampled, batch row of logits
        decoders = [s for s in self._running if s.phase is Phase.DECODE]
        for s in decoders:
            slot = s.slot
            b.token[n] = s.pending
            b.pos[n] = len(slot.tokens)
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = slot.seq
            b.logits[n] = 1
            rows.append((s, n))
            n += 1
        pre = next((s for s in self._running if s.phase is Phase.PREFILL), None)
        chunk: list[int] = []
        if pre is not None:
            slot = pre.slot
            left = len(pre.ids) - len(slot.tokens)
            room = self.n_batch - n
            if decoders:  # keep the decoders' step short
                room = min(room, self.prefill_chunk)
            chunk = pre.ids[len(slot.tokens) : len(slot.tokens) + room]
            pos0 = len(slot.tokens)
            for i, tok in enumerate(chunk):
                b.token[n] = tok
                b.pos[n] = pos0 + i
                b.n_seq_id[n] = 1
                b.seq_id[n][0] = slot.seq
                b.logits[n] = 0
                n += 1
            if len(chunk) == left:  # the prompt is in: its last row starts the answer
                b.logits[n - 1] = 1
                rows.append((pre, n - 1))
        b.n_tokens = n
        t0 = time.perf_counter()
        rc = ll.llama_decode(self._ctx, b)
        if pre is not None:  # the step's cost is its chunk's (the decoders' rows are few)
            pre.prefill_work_s += time.perf_counter() - t0
        self.stats.steps += 1
        if rc != 0:
            # Leave every slot of this batch exactly as far as we know it is.
            err = EngineError("internal", f"llama_decode failed with status {rc}")
            for s in [*decoders, *([pre] if pre is not None else [])]:
                ll.llama_memory_seq_rm(self._mem, s.slot.seq, len(s.slot.tokens), -1)
                self._finish(s, calls, err)
            return StepReport(self.stats.steps, finished=finished + len(decoders) + bool(pre))
        for s in decoders:
            s.slot.tokens.append(s.pending)
        if pre is not None:
            pre.slot.tokens.extend(chunk)
            if pre.slot.tokens == pre.ids:
                self._publish(pre.slot)  # routing and sharing see the prompt now
        for s, row in rows:
            token = ll.llama_sampler_sample(s.sampler, self._ctx, row)
            eog = self._is_eog(token)
            text = s.accept(token, b"" if eog else self._piece(token), eog)
            if text and s.on_piece is not None:
                calls.append((s, bind(s.on_piece, text)))
            if s.finish:
                self._finish(s, calls)
                finished += 1
        return StepReport(
            self.stats.steps,
            decoded=tuple(s.slot.seq for s in decoders),
            prefill=(pre.slot.seq, len(chunk)) if pre is not None else None,
            finished=finished,
        )

    def _finish(
        self,
        s: Sequence,
        calls: list[tuple[Sequence, Call]],
        error: BaseException | None = None,
    ) -> None:
        """End ``s``: free its slot (idle again, its tree published) and report."""
        if s in self._running:
            self._running.remove(s)
        tail = s.close_text() if error is None else ""
        slot = s.slot
        result = s.result(slot.seq if slot is not None else -1)
        s.free()
        if slot is not None:
            self._release(slot)
        if error is None:
            self._record(result)
        if tail and s.on_piece is not None:
            calls.append((s, bind(s.on_piece, tail)))
        fut = s.future
        if error is None:
            calls.append((s, Settle(lambda: fut.set_result(result))))
        else:
            calls.append((s, Settle(lambda: fut.set_exception(error))))
        if s.on_done is not None:
            done = s.on_done
            if error is None:
                calls.append((s, lambda: done(result, None)))
            else:
                calls.append((s, lambda: done(None, error)))

    def _fail_all(self, error: BaseException, deliver: bool = False) -> None:
        """End every waiting and running request with ``error`` (close, a bug).

        ``deliver``: through `deliver`, as any end (the engine goes on serving);
        otherwise run the callbacks here (closing: nobody may deliver any more)."""
        calls: list[tuple[Sequence, Call]] = []
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for s in [*waiting, *self._running]:
            self._finish(s, calls, error)
        if deliver:
            deliver_calls(calls, self.deliver)
            return
        for _, call in calls:
            run_calls([call])

    def _record(self, r: GenerationResult) -> None:
        st = self.stats
        st.requests += 1
        st.prompt_tokens += r.prompt_tokens
        st.cached_tokens += r.cached_tokens
        prefilled = r.prompt_tokens - r.cached_tokens
        if prefilled >= 32 and r.completion_tokens:  # tiny prefills: mostly fixed costs
            # Its own steps, not the wall time since admission: prompts prefill one at a
            # time, and the wait for earlier ones is the load model's (candidates.py),
            # not this node's speed.
            work = r.prefill_work_s or r.prefill_s
            st.prefill_s_per_token = ewma(st.prefill_s_per_token, work / prefilled)
        st.service_s = ewma(st.service_s, r.queue_s + r.prefill_s + r.decode_s)
        st.completion_tokens = ewma(st.completion_tokens, float(r.completion_tokens))
        if r.completion_tokens > 1:
            st.decode_s_per_token = ewma(st.decode_s_per_token, r.decode_s / r.completion_tokens)
