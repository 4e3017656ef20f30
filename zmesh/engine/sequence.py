"""One request inside the engine, from submit to done: its sampler, its text, its clock.

A `Sequence` holds everything that is per request: the sampler chain (own seed), the
incremental UTF-8 decoder, the stop-string scan and the text held back because a stop
string may still claim it, the token counters, the timers, the cancel flag and the
deadline. The stepper feeds it one sampled token at a time (`accept`); it says what
text to stream and whether the request is finished. `Handle` is what a caller keeps.
"""

from __future__ import annotations

import codecs
import enum
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import llama_cpp as ll

from zmesh.engine.types import GenerationResult
from zmesh.protocol import SamplingParams

_Sampler = Any  # a ctypes pointer to llama_sampler
OnPiece = Callable[[str], None]
OnDone = Callable[[GenerationResult | None, BaseException | None], None]


def make_sampler(p: SamplingParams) -> _Sampler:
    chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    if p.temperature <= 0.0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
        return chain
    if p.top_k > 0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1.0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(p.temperature))
    seed = p.seed if p.seed is not None else ll.LLAMA_DEFAULT_SEED
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain


class Phase(enum.Enum):
    WAITING = "waiting"  # no slot yet
    PREFILL = "prefill"  # prompt tokens still to decode into its slot
    DECODE = "decode"  # one sampled token to decode per step
    DONE = "done"


class Sequence:
    """Per-request state; touched by the engine thread only (but `cancel`)."""

    def __init__(
        self,
        ids: list[int],
        params: SamplingParams,
        namespace: str,
        max_new: int,
        *,
        deadline: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_piece: OnPiece | None = None,
        on_done: OnDone | None = None,
        inline: bool = False,
    ) -> None:
        self.t0 = time.perf_counter()
        self.ids = ids
        self.params = params
        self.namespace = namespace
        self.max_new = max_new
        self.deadline = deadline
        self.should_stop = should_stop
        self.on_piece = on_piece
        self.on_done = on_done
        self.inline = inline  # callbacks run on the engine thread, not via `deliver`
        self.future: Future[GenerationResult] = Future()
        self.phase = Phase.WAITING
        self.slot: Any = None  # the engine's slot once admitted
        self.reuse = self.evicted = 0
        self.sampler: _Sampler = None
        self.pending = -1  # the last sampled token: decoded next step unless finished
        self.finish = ""
        self._cancel = threading.Event()
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = list(params.stop)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self.text = ""
        self.emitted = 0
        self.generated = 0
        self.t_admit = self.t_first = self.t_last = 0.0
        self.ttft_s = self.prefill_s = 0.0
        # Seconds of the steps that carried this prompt's chunks: its own prefill work,
        # without the steps it waited through while an earlier prompt prefilled.
        self.prefill_work_s = 0.0

    # ---- control -----------------------------------------------------------

    def cancel(self) -> None:
        self._cancel.set()

    def should_end(self) -> bool:
        """Cancelled, past its deadline, or its caller asks it to stop."""
        if self._cancel.is_set():
            return True
        if self.deadline is not None and time.time() > self.deadline:
            return True
        return self.should_stop is not None and bool(self.should_stop())

    def admitted(self, slot: Any, reuse: int, evicted: int) -> None:
        self.slot, self.reuse, self.evicted = slot, reuse, evicted
        self.t_admit = time.perf_counter()
        self.sampler = make_sampler(self.params)
        self.phase = Phase.PREFILL

    # ---- tokens ------------------------------------------------------------

    def accept(self, token: int, piece: bytes, eog: bool) -> str:
        """Take one sampled token; return the text now safe to stream. Sets ``finish``
        when the request is over (the token is then not decoded)."""
        now = time.perf_counter()
        if self.generated == 0:
            self.t_first = now
            self.ttft_s, self.prefill_s = now - self.t0, now - self.t_admit
        self.t_last = now
        self.generated += 1
        self.pending = token
        if eog:
            self.finish = "eog"
            return ""
        self.text += self._decoder.decode(piece)
        cut = min((i for i in (self.text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.finish = self.text[:cut], "stop"
            return ""
        out = ""
        if len(self.text) - self._hold > self.emitted:
            out = self.text[self.emitted : len(self.text) - self._hold]
            self.emitted = len(self.text) - self._hold
        if self.generated >= self.max_new:
            self.finish = "length"
        self.phase = Phase.DECODE
        return out

    def close_text(self) -> str:
        """End the text (flush the decoder unless a stop cut it); the rest to stream."""
        if self.finish != "stop":
            self.text += self._decoder.decode(b"", final=True)
        out = self.text[self.emitted :] if len(self.text) > self.emitted else ""
        self.emitted = len(self.text)
        return out

    def free(self) -> None:
        if self.sampler is not None:
            ll.llama_sampler_free(self.sampler)
            self.sampler = None
        self.phase = Phase.DONE

    def result(self, slot_seq: int) -> GenerationResult:
        end = self.t_last if self.generated else time.perf_counter()
        return GenerationResult(
            text=self.text,
            finish_reason=self.finish,
            prompt_tokens=len(self.ids),
            cached_tokens=self.reuse,
            completion_tokens=self.generated,
            ttft_s=self.ttft_s,
            prefill_s=self.prefill_s,
            prefill_work_s=self.prefill_work_s,
            decode_s=end - self.t_first if self.generated else 0.0,
            slot=slot_seq,
            evicted_tokens=self.evicted,
            queue_s=(self.t_admit - self.t0) if self.t_admit else end - self.t0,
        )


class Handle:
    """A submitted request: cancel it, wait for its result."""

    __slots__ = ("_seq",)

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def cancel(self) -> None:
        """End the request at the next step boundary (finish_reason "cancelled")."""
        self._seq.cancel()

    def done(self) -> bool:
        return self._seq.future.done()

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The result; raises the request's `EngineError` if it failed."""
        return self._seq.future.result(timeout)

    @property
    def future(self) -> Future[GenerationResult]:
        return self._seq.future
