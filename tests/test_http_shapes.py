"""The OpenAI shapes of zmesh/http/openai.py: request parsing, error mapping, bodies."""

from __future__ import annotations

import pytest

from zmesh import protocol as P
from zmesh.http.openai import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Shapes,
    decode_body,
    routing_headers,
)

DONE = P.Done(
    request_id="r1",
    text="Paris.",
    finish_reason="eog",
    served_by="node-b",
    hops=1,
    route_reason="prefix",
    route_path=["node-a", "node-b"],
    prompt_tokens=40,
    cached_tokens=32,
    completion_tokens=3,
    ttft_s=0.01,
    prefill_s=0.005,
    decode_tps=100.0,
)


@pytest.mark.parametrize(
    ("code", "status", "oa_code"),
    [
        (P.INVALID_REQUEST, 400, "invalid_request"),
        (P.PROMPT_TOO_LONG, 400, "context_length_exceeded"),
        (P.FORBIDDEN, 403, "forbidden"),
        (P.OVERLOADED, 429, "overloaded"),
        (P.TOO_MANY_REQUESTS, 429, "too_many_requests"),
        (P.UNAVAILABLE, 503, "unavailable"),
        (P.DEADLINE_EXCEEDED, 504, "deadline_exceeded"),
        (P.INTERNAL, 500, "internal"),
    ],
)
def test_zmesh_errors_map_to_openai_status_and_shape(code: str, status: int, oa_code: str) -> None:
    err = ApiError.from_zmesh(code, "why")
    assert (err.status, err.body()["error"]["code"]) == (status, oa_code)
    assert set(err.body()["error"]) == {"message", "type", "code"}
    assert ("Retry-After" in err.headers()) == (status == 429)


def test_request_bodies_are_checked_field_by_field() -> None:
    with pytest.raises(ApiError, match="max_tokens"):
        decode_body(b'{"prompt": "x", "max_tokens": "3"}', CompletionRequest)
    with pytest.raises(ApiError, match="not valid JSON"):
        decode_body(b"{", CompletionRequest)
    with pytest.raises(ApiError, match="prompt"):
        decode_body(b"{}", CompletionRequest)
    with pytest.raises(ApiError, match="token ids"):
        decode_body(b'{"prompt": ["a", "b"]}', CompletionRequest).text_or_tokens()
    assert decode_body(b'{"prompt": [1, 2]}', CompletionRequest).text_or_tokens() == [1, 2]
    assert decode_body(b'{"prompt": ["hi"]}', CompletionRequest).text_or_tokens() == "hi"
    req = decode_body(b'{"prompt": "x", "stop": "\\n", "seed": 7, "extra": 1}', CompletionRequest)
    p = req.params(16)
    assert (p.stop, p.seed, p.max_tokens, p.temperature) == (["\n"], 7, 16, 0.0)
    with pytest.raises(ApiError, match="temperature"):
        decode_body(b'{"prompt": "x", "temperature": 9}', CompletionRequest).params(16)
    chat = decode_body(
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, '
        b'{"type": "text", "text": "b"}]}], "max_completion_tokens": 5}',
        ChatRequest,
    )
    assert chat.turns() == [("user", "ab")] and chat.params(256).max_tokens == 5
    with pytest.raises(ApiError, match="text content"):
        decode_body(
            b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', ChatRequest
        ).turns()


def test_bodies_and_stream_chunks_carry_usage_and_routing_facts() -> None:
    body = Shapes(False, "r1", "m").response(DONE)
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Paris."
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 32}
    assert body["usage"]["total_tokens"] == 43
    assert routing_headers(DONE)["x-zmesh-served-by"] == "node-b"
    chat = Shapes(True, "r1", "m")
    first, last = chat.chunk("Par"), chat.chunk("", DONE)
    assert first["choices"][0]["delta"] == {"content": "Par", "role": "assistant"}
    assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert last["zmesh"]["served_by"] == "node-b" and last["zmesh"]["cached_tokens"] == 32
    assert chat.usage_chunk(DONE)["choices"] == []
