"""OpenAI API shapes: request bodies in, response bodies, stream chunks and errors out.

Pure functions and msgspec Structs, no I/O: `zmesh/http/server.py` does the HTTP.
Unknown request fields are ignored (clients send `presence_penalty`, `user`, ...);
fields whose meaning zmesh cannot honour (`n` > 1, `logprobs`, `echo`, `suffix`,
`tools`) are refused with a 400 rather than silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

import msgspec

from zmesh import protocol as P

# zmesh error code -> (HTTP status, OpenAI error type, OpenAI error code)
_ERRORS: dict[str, tuple[int, str, str]] = {
    P.INVALID_REQUEST: (400, "invalid_request_error", "invalid_request"),
    P.MALFORMED: (400, "invalid_request_error", "invalid_request"),
    P.PROMPT_TOO_LONG: (400, "invalid_request_error", "context_length_exceeded"),
    P.FORBIDDEN: (403, "permission_error", "forbidden"),
    P.OVERLOADED: (429, "rate_limit_error", "overloaded"),
    P.TOO_MANY_REQUESTS: (429, "rate_limit_error", "too_many_requests"),
    P.UNAVAILABLE: (503, "server_error", "unavailable"),
    P.DEADLINE_EXCEEDED: (504, "timeout_error", "deadline_exceeded"),
    P.INTERNAL: (500, "server_error", "internal"),
}
_T = TypeVar("_T")
RETRY_AFTER_S = 1  # Retry-After on 429: one decode slot frees within about a second


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "code"}}``."""

    def __init__(self, status: int, message: str, type_: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    @classmethod
    def from_zmesh(cls, code: str, message: str) -> ApiError:
        status, type_, oa_code = _ERRORS.get(code, (500, "server_error", code))
        return cls(status, message, type_, oa_code)

    @classmethod
    def invalid(cls, message: str) -> ApiError:
        return cls(400, message, "invalid_request_error", "invalid_request")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)} if self.status == 429 else {}


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _Common(msgspec.Struct, kw_only=True):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; llama.cpp and vLLM take it
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None

    def params(self, default_max_tokens: int) -> P.SamplingParams:
        if self.n != 1:
            raise ApiError.invalid("n must be 1: zmesh returns one choice per request")
        if self.logprobs not in (None, False, 0):
            raise ApiError.invalid("logprobs are not supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        p = P.SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=0.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
        )
        try:
            p.validate()
        except ValueError as exc:
            raise ApiError.invalid(str(exc)) from None
        return p

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Common, kw_only=True):
    prompt: str | list[str | int]  # text, [text], or token ids
    echo: bool = False
    suffix: str | None = None

    def text_or_tokens(self) -> str | list[int]:
        if self.echo or self.suffix:
            raise ApiError.invalid("echo and suffix are not supported")
        p = self.prompt
        if isinstance(p, str):
            return p
        if len(p) == 1 and isinstance(p[0], str):
            return p[0]
        if not p or not all(isinstance(t, int) for t in p):
            raise ApiError.invalid("prompt must be a string, a list of 1 string, or token ids")
        return [int(t) for t in p]


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" or p.text is None for p in self.content):
            raise ApiError.invalid("only text content parts are supported")
        return "".join(p.text or "" for p in self.content)


class ChatRequest(_Common, kw_only=True):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: Any = None

    def turns(self) -> list[tuple[str, str]]:
        if not self.messages:
            raise ApiError.invalid("messages is empty")
        if self.tools:
            raise ApiError.invalid("tools are not supported")
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return [(m.role, m.text()) for m in self.messages]


def decode_body(body: bytes, kind: type[_T]) -> _T:
    """The request body as ``kind``; a 400 naming the bad field otherwise."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ApiError.invalid(f"invalid request body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiError.invalid(f"the body is not valid JSON: {exc}") from None


def finish_reason(done: P.Done) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def usage(done: P.Done) -> dict[str, Any]:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.completion_tokens,
        "total_tokens": done.prompt_tokens + done.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def routing_facts(done: P.Done) -> dict[str, Any]:
    """zmesh's own provenance, for the `zmesh` field of a stream's last chunk."""
    return {
        "served_by": done.served_by,
        "route_reason": done.route_reason,
        "cached_tokens": done.cached_tokens,
        "hops": done.hops,
        "route_path": done.route_path,
    }


def routing_headers(done: P.Done) -> dict[str, str]:
    return {
        "x-zmesh-served-by": done.served_by,
        "x-zmesh-route-reason": done.route_reason,
        "x-zmesh-cached-tokens": str(done.cached_tokens),
        "x-zmesh-hops": str(done.hops),
    }


class Shapes:
    """Builds the bodies of one request: completion (`chat=False`) or chat."""

    def __init__(self, chat: bool, rid: str, model: str) -> None:
        self.chat, self.model = chat, model
        self.request_id = rid  # the caller's x-request-id (or ours)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"
        self.created = int(time.time())
        self._role_sent = False

    def _envelope(self, obj: str, choice: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def response(self, done: P.Done) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "finish_reason": finish_reason(done),
                "logprobs": None,
            }
            out = self._envelope("chat.completion", choice)
        else:
            choice = {
                "index": 0,
                "text": done.text,
                "finish_reason": finish_reason(done),
                "logprobs": None,
            }
            out = self._envelope("text_completion", choice)
        out["usage"] = usage(done)
        return out

    def chunk(self, text: str, done: P.Done | None = None) -> dict[str, Any]:
        """A stream chunk with ``text``; the last one (``done``) carries the finish
        reason and zmesh's routing facts."""
        reason = finish_reason(done) if done is not None else None
        if self.chat:
            delta: dict[str, Any] = {"content": text} if text or done is None else {}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason}
            out = self._envelope("chat.completion.chunk", choice)
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
            out = self._envelope("text_completion", choice)
        if done is not None:
            out["zmesh"] = routing_facts(done)
        return out

    def usage_chunk(self, done: P.Done) -> dict[str, Any]:
        """`stream_options.include_usage`: a last chunk with no choices and the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = self._envelope(obj, {})
        out["choices"] = []
        out["usage"] = usage(done)
        return out


def models(model: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 0, "owned_by": "zmesh"}],
    }
