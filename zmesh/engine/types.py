"""The engine's plain types: errors, a request, its result, running statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from zmesh.protocol import UNAVAILABLE, SamplingParams

MIN_SLOT_CTX = 64


class EngineError(Exception):
    """A request the engine cannot serve; ``code`` is a protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def closed_error() -> EngineError:
    """What every call on a closed engine raises, and every request or call a close
    cuts short fails with."""
    return EngineError(UNAVAILABLE, "engine closed")


@dataclass(slots=True)
class Request:
    """One generation request as `Engine.submit` takes it: exactly one of ``prompt``
    (text) or ``tokens`` (ids). ``deadline`` is wall-clock (``time.time()``) seconds;
    past it, like after ``should_stop()`` turns true, the request ends "cancelled" at
    the next step boundary."""

    prompt: str | bytes | None = None
    tokens: Sequence[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    namespace: str = "default"
    deadline: float | None = None
    should_stop: Callable[[], bool] | None = None


@dataclass(slots=True)
class GenerationResult:
    text: str
    finish_reason: str  # "stop" | "length" | "eog" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float  # from submit to the first token, waiting for a slot included
    prefill_s: float  # from taking a slot to the first token
    decode_s: float
    slot: int
    evicted_tokens: int = 0
    queue_s: float = 0.0  # waiting for a slot
    # Of prefill_s, the steps that carried this prompt's chunks (the engine prefills
    # one prompt at a time: the rest is waiting for earlier prompts). 0: not measured.
    prefill_work_s: float = 0.0

    @property
    def decode_tps(self) -> float:
        return self.completion_tokens / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(slots=True)
class EngineStats:
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    prefill_s_per_token: float = 0.0  # EWMA over prefills of a useful size
    service_s: float = 0.0  # EWMA of the whole request time
    decode_s_per_token: float = 0.0  # EWMA
    completion_tokens: float = 0.0  # EWMA: how long answers really are
    steps: int = 0  # llama_decode calls made by `Engine.step`


@dataclass(frozen=True, slots=True)
class StepReport:
    """What one `Engine.step` did (tests count steps with it, not time)."""

    index: int  # llama_decode calls so far, this one included (0: none made)
    decoded: tuple[int, ...] = ()  # slots that decoded one sampled token
    prefill: tuple[int, int] | None = None  # (slot, prompt tokens) of the prefill chunk
    finished: int = 0  # requests that ended in this step
