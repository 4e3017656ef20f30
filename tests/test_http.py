"""The OpenAI-compatible HTTP API for real: lab node processes, the real `openai`
package, raw HTTP for what a well-behaved client never sends, ZeroMQ side by side."""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from meshkit import is_request, log_events, started

from zmesh.client import Client
from zmesh.lab import Lab, free_ports

pytestmark = pytest.mark.slow

ENGINE = {"n_slots": 3, "slot_ctx": 1024, "n_threads": 1}
KEY_ACME = "sk-acme-0123456789abcdef"
KEY_GLOBEX = "sk-globex-0123456789abcdef"
KEYS = [
    {"key": KEY_ACME, "tenants": ["acme"], "name": "acme-app"},
    {"key": KEY_GLOBEX, "tenants": ["globex", "default"], "name": "globex-app"},
]
MAX_BODY = 16 * 1024
MODEL = "gemma-3-270m-q4_k_m"
SYSTEM = "You are a careful assistant who answers questions about rivers. " * 12


@pytest.fixture(scope="module")
def lab():
    lab = Lab(
        n_nodes=2,
        engine=ENGINE,
        routing={"place_slack_frac": 0.0},  # a prefix stays where it was first served
        http_keys=KEYS,
        # One request in flight per key, so that the per-key limit is easy to reach.
        extra_config={"http": {"max_body_bytes": MAX_BODY}, "max_inflight_per_client": 1},
    )
    with started(lab):
        yield lab


def _oa(lab: Lab, i: int = 0, key: str = KEY_ACME) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{lab.http_urls[i]}/v1", api_key=key, max_retries=0)


def _post(
    url: str, body: bytes | dict[str, Any], key: str | None = KEY_ACME, **headers: str
) -> tuple[int, dict[str, str], dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **headers}
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def _error(status: int, body: dict[str, Any], want_status: int, want_code: str) -> str:
    assert status == want_status, body
    err = body["error"]
    assert set(err) >= {"message", "type", "code"}
    assert err["code"] == want_code, err
    return str(err["message"])


def test_the_openai_package_streams_and_completes_text_and_chat(lab: Lab) -> None:
    c = _oa(lab)
    assert [m.id for m in c.models.list().data] == [MODEL]
    raw = c.completions.with_raw_response.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6
    )
    done = raw.parse()
    assert raw.headers["x-zmesh-served-by"] in {n.name for n in lab.nodes}
    assert raw.headers["x-zmesh-route-reason"]
    assert done.usage is not None and done.usage.completion_tokens == 6
    assert done.usage.prompt_tokens_details is not None
    assert (
        int(raw.headers["x-zmesh-cached-tokens"]) == done.usage.prompt_tokens_details.cached_tokens
    )
    assert done.choices[0].finish_reason == "length" and done.choices[0].text

    # The same prompt streamed: same greedy text, chunk by chunk, then usage.
    parts, usage = [], None
    for ch in c.completions.create(
        model=MODEL,
        prompt="The capital of France is",
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    ):
        parts += [x.text for x in ch.choices]
        usage = ch.usage or usage
    assert "".join(parts) == done.choices[0].text
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens > 0  # the prompt was just served

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=5)
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    streamed = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, stream=True)
    deltas = [ch.choices[0].delta for ch in streamed if ch.choices]
    assert deltas[0].role == "assistant"
    assert "".join(d.content or "" for d in deltas) == chat.choices[0].message.content

    # A list of token ids is a prompt too.
    ids = c.completions.create(model=MODEL, prompt=[2, 818, 5279, 529, 7001, 563], max_tokens=3)
    assert ids.usage is not None and ids.usage.prompt_tokens == 6


def test_chat_prompts_use_the_models_template(lab: Lab) -> None:
    """Gemma's turn markers reach the model: the prompt is longer than the bare text."""
    c = _oa(lab)
    bare = c.completions.create(model=MODEL, prompt="Hi!", max_tokens=1)
    chat = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi!"}], max_tokens=1
    )
    assert bare.usage is not None and chat.usage is not None
    # <start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
    assert chat.usage.prompt_tokens >= bare.usage.prompt_tokens + 6


def test_bad_requests_get_openai_errors_and_the_node_lives_on(lab: Lab) -> None:
    url = f"{lab.http_urls[0]}/v1/completions"
    status, _, body = _post(url, b'{"model": "x", "prompt": ')
    assert "JSON" in _error(status, body, 400, "invalid_request")
    status, _, body = _post(url, {"prompt": "hi", "max_tokens": "ten"})
    assert "max_tokens" in _error(status, body, 400, "invalid_request")
    status, _, body = _post(url, {"prompt": 42})
    _error(status, body, 400, "invalid_request")
    status, _, body = _post(url, {"prompt": "hi", "temperature": -1})
    assert "temperature" in _error(status, body, 400, "invalid_request")
    status, _, body = _post(url, {"model": "gpt-4o", "prompt": "hi"})
    _error(status, body, 404, "model_not_found")
    status, _, body = _post(url, {"prompt": "river " * 1500, "max_tokens": 1})
    _error(status, body, 400, "context_length_exceeded")
    status, _, body = _post(url, {"prompt": "x" * (2 * MAX_BODY)})
    _error(status, body, 413, "body_too_large")
    status, _, body = _post(f"{lab.http_urls[0]}/v1/nothing", {"prompt": "hi"})
    _error(status, body, 404, "not_found")
    status, _, body = _post(
        f"{lab.http_urls[0]}/v1/chat/completions", {"messages": [{"role": "user"}], "n": 2}
    )
    assert "n must be 1" in _error(status, body, 400, "invalid_request")
    # Still serving, over both doors.
    status, _, body = _post(url, {"prompt": "Rivers flow to the", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_keys_missing_wrong_and_of_another_tenant(lab: Lab) -> None:
    url = f"{lab.http_urls[1]}/v1/completions"
    body = {"prompt": "Hello", "max_tokens": 1}
    status, _, reply = _post(url, body, key=None)
    _error(status, reply, 401, "missing_api_key")
    status, _, reply = _post(url, body, key="sk-not-a-key-of-this-mesh")
    _error(status, reply, 401, "invalid_api_key")
    status, _, reply = _post(url, body, key=KEY_ACME, **{"x-zmesh-tenant": "globex"})
    assert "globex" in _error(status, reply, 403, "forbidden")
    with pytest.raises(openai.AuthenticationError):
        _oa(lab, 1, key="sk-wrong-wrong-wrong-wrong").models.list()
    # Health and metrics are for load balancers and Prometheus: no key.
    with urllib.request.urlopen(f"{lab.http_urls[1]}/health", timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"
    with urllib.request.urlopen(f"{lab.http_urls[1]}/metrics", timeout=10) as r:
        assert b"zmesh_requests_received" in r.read()
    # A key of two tenants picks either; their caches stay apart.
    prompt = SYSTEM + "Which river is longest?"
    first = _post(url, {"prompt": prompt, "max_tokens": 1}, key=KEY_GLOBEX)
    assert first[0] == 200
    again = _post(url, {"prompt": prompt, "max_tokens": 1}, key=KEY_GLOBEX)
    assert again[2]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    other = _post(
        url, {"prompt": prompt, "max_tokens": 1}, key=KEY_GLOBEX, **{"x-zmesh-tenant": "default"}
    )
    assert other[0] == 200
    assert other[2]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def _served(headers: dict[str, str]) -> tuple[str, int]:
    h = {k.lower(): v for k, v in headers.items()}
    return h["x-zmesh-served-by"], int(h["x-zmesh-cached-tokens"])


def test_http_and_zeromq_requests_reuse_each_others_prefixes(lab: Lab) -> None:
    # ZeroMQ first, on node-a; then HTTP on node-b: routed to node-a's cached prefix.
    head = SYSTEM + "Question one about the Danube and its tributaries: "
    with Client(lab.nodes[0].serve, tenant="acme") as zc:
        zd = zc.generate(head + "where does it start?", max_tokens=1, endpoint=lab.nodes[0].serve)
    assert zd.served_by == lab.nodes[0].name
    asyncio.run(lab.wait_converged(timeout=30))
    status, headers, body = _post(
        f"{lab.http_urls[1]}/v1/completions",
        {"prompt": head + "where does it end?", "max_tokens": 1},
    )
    assert status == 200, body
    served_by, cached = _served(headers)
    assert (served_by, cached > zd.prompt_tokens // 2) == (lab.nodes[0].name, True)

    # HTTP first, on node-b, with a new prefix; then ZeroMQ on node-a: routed to node-b.
    head = "Mountains, glaciers and the lakes they leave behind. " * 14 + "On the Alps: "
    status, headers, _ = _post(
        f"{lab.http_urls[1]}/v1/completions", {"prompt": head + "how long?", "max_tokens": 1}
    )
    assert _served(headers)[0] == lab.nodes[1].name
    asyncio.run(lab.wait_converged(timeout=30))
    with Client(lab.nodes[0].serve, tenant="acme") as zc:
        zd = zc.generate(head + "how wide?", max_tokens=1, endpoint=lab.nodes[0].serve)
    assert zd.served_by == lab.nodes[1].name
    assert zd.cached_tokens > zd.prompt_tokens // 2


def test_a_caller_that_hangs_up_mid_stream_cancels_its_request(lab: Lab) -> None:
    node = lab.nodes[0]
    u = urlsplit(node.http or "")
    rid = f"hangup-{time.monotonic_ns()}"
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": "Tell me a very long story about a river.", "max_tokens": 900,
            "stream": True}  # fmt: skip
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Authorization": f"Bearer {KEY_ACME}", "x-request-id": rid},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # generation is under way
    conn.sock.close()  # hang up
    conn.close()

    # The node logs the request as cancelled long before 900 tokens, and is idle again.
    give_up = time.monotonic() + 120
    done: list[dict[str, Any]] = []
    while not done:
        assert time.monotonic() < give_up, "the request was not cancelled"
        done = [
            e
            for n in lab.nodes
            for e in log_events(n.log_path, "request.completed")
            if is_request(e["request_id"], rid)  # the mesh's id: rid~suffix
        ]
        time.sleep(0.1)
    assert done[0]["finish"] == "cancelled" and done[0]["completion_tokens"] < 900
    while True:
        sts = asyncio.run(lab.statuses())
        if all(st.inflight == 0 and st.queue_depth == 0 for st in sts):
            break
        assert time.monotonic() < give_up, f"still busy: {[st.inflight for st in sts]}"
        time.sleep(0.1)
    status, _, reply = _post(f"{node.http}/v1/completions", {"prompt": "Next", "max_tokens": 1})
    assert status == 200, reply


def test_with_curve_keys_http_needs_api_keys_and_still_serves() -> None:
    from zmesh.config import ConfigError, config_from_dict

    lab = Lab(n_nodes=1, engine=ENGINE, keys=True, http_keys=KEYS[:1])
    assert lab.keys_dir is not None
    with pytest.raises(ConfigError, match=r"http\.api_keys: required"):
        config_from_dict(
            {
                "node_id": "n1",
                "serve_addr": "tcp://127.0.0.1:5555",
                "gossip_addr": "tcp://127.0.0.1:5556",
                "security": {"secret_key_file": str(lab.keys_dir / "node-a.key_secret")},
                "http": {"port": 8080},
            }
        )
    with started(lab):
        c = _oa(lab)
        raw = c.completions.with_raw_response.create(model=MODEL, prompt="Rivers", max_tokens=2)
        assert raw.headers["x-zmesh-served-by"] == lab.nodes[0].name
        assert raw.parse().usage.completion_tokens == 2  # type: ignore[union-attr]
        with pytest.raises(openai.AuthenticationError):
            _oa(lab, key=KEY_GLOBEX).completions.create(model=MODEL, prompt="x", max_tokens=1)


def test_a_key_over_its_in_flight_limit_gets_429_and_other_keys_are_served(lab: Lab) -> None:
    node = lab.nodes[0]
    u = urlsplit(node.http or "")
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"prompt": "A long story about a river:", "max_tokens": 400, "stream": True}
    conn.request(
        "POST", "/v1/completions", json.dumps(body), {"Authorization": f"Bearer {KEY_ACME}"}
    )
    try:
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        url = f"{node.http}/v1/completions"
        status, headers, reply = _post(url, {"prompt": "Hi", "max_tokens": 1})
        _error(status, reply, 429, "too_many_requests")
        assert headers.get("Retry-After") == "1"
        status, _, reply = _post(url, {"prompt": "Hi", "max_tokens": 1}, key=KEY_GLOBEX)
        assert status == 200, reply
    finally:
        conn.close()


def test_a_node_that_has_not_joined_is_not_ready() -> None:
    """Its seed never answers: /health says 503 and requests get not_ready, not a hang."""
    fake_serve, fake_gossip = (f"tcp://127.0.0.1:{p}" for p in free_ports(2))
    lab = Lab(n_nodes=1, engine=ENGINE, extra_seeds=[{"serve": fake_serve, "gossip": fake_gossip}])
    with started(lab):  # bound and answering status
        try:
            urllib.request.urlopen(f"{lab.http_urls[0]}/health", timeout=10)
            raise AssertionError("a node with no peer heard reported healthy")
        except urllib.error.HTTPError as e:
            assert e.code == 503 and json.loads(e.read())["status"] == "starting"
        status, _, body = _post(
            f"{lab.http_urls[0]}/v1/completions", {"prompt": "Hi", "max_tokens": 1}, key=None
        )
        _error(status, body, 503, "not_ready")


def test_keyless_callers_may_reuse_an_x_request_id_at_the_same_time() -> None:
    """Without keys every HTTP caller shares one client of the node: two callers that
    pick the same x-request-id at once must both be answered (the mesh sees the id plus
    a suffix), each under its own id."""
    from concurrent.futures import ThreadPoolExecutor

    with started(Lab(n_nodes=1, engine=ENGINE)) as solo:
        url = f"{solo.http_urls[0]}/v1/completions"

        def ask(prompt: str) -> tuple[int, dict[str, str], dict[str, Any]]:
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0.0}
            return _post(url, body, key=None, **{"x-request-id": "same-id"})

        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, ["Count to ten: one, two,", "Name the planets:"]))
    for status, headers, body in answers:
        assert status == 200, body
        assert headers["x-request-id"] == "same-id"
        assert body["usage"]["completion_tokens"] >= 1
