"""The node's OpenAI-compatible HTTP front (aiohttp, on the node's own asyncio loop).

A request that enters over HTTP is sent, as a plain ZeroMQ `Generate`, to this node's
own serve socket by the ordinary `AsyncClient` pinned to that one endpoint: an
inproc:// address the front binds on the serve ROUTER (loopback TCP with CURVE on).
So it is admitted, routed, forwarded, failed over, deadline-checked, counted and
cancelled by exactly the code a ZeroMQ client meets, and the front needs nothing of
the node but its config, its engine (chat template, model name), its serve socket
and its readiness. Calling the node's private admission path instead would save a
pipe hop (`zmesh bench http` measures no TTFT cost) and tie this module to
request-pipeline internals that change often.

Keys: with `http.api_keys`, every request but /health and /metrics needs
`Authorization: Bearer KEY`; the key names the tenants it may use (the first unless
`x-zmesh-tenant` picks another). Each key (or, without keys, every caller together)
is one client of the node: its own DEALER, its own `max_inflight_per_client` budget.
With CURVE on, the front talks to its node with the node's own key pair.
"""

from __future__ import annotations

import contextlib
import hmac
import re
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from zmesh import protocol as P
from zmesh.client import AsyncClient, NoEndpointAvailable, RequestError, RequestTimeout
from zmesh.engine import EngineError
from zmesh.http.openai import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Shapes,
    decode_body,
    models,
    routing_headers,
)
from zmesh.metrics import metrics_bind_host

if TYPE_CHECKING:
    from zmesh.config import HttpApiKey
    from zmesh.node import Node

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# OpenAI's chat default is "until the context ends"; a bounded one keeps a slot free.
DEFAULT_CHAT_MAX_TOKENS = 256
_TCP_RE = re.compile(r"tcp://(?P<host>\[[^\]]*\]|[^:/]+):(?P<port>[0-9]+)")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def loopback_endpoint(serve_addr: str) -> str:
    """Where the front reaches its own node: the serve address, a wildcard bind host
    replaced by loopback."""
    m = _TCP_RE.fullmatch(serve_addr)
    if m is None:  # ipc://
        return serve_addr
    host = {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(m["host"], m["host"])
    return f"tcp://{host}:{m['port']}"


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RequestError | EngineError):
        return ApiError.from_zmesh(exc.code, exc.message)
    if isinstance(exc, RequestTimeout):
        return ApiError.from_zmesh(P.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, NoEndpointAvailable):
        return ApiError.from_zmesh(P.UNAVAILABLE, f"the node does not answer: {exc}")
    return ApiError.from_zmesh(P.INTERNAL, f"{type(exc).__name__}: {exc}")


class HttpFront:
    def __init__(self, node: Node) -> None:
        self.node = node
        self.cfg = cfg = node.config.http
        self.log = node.log.bind(component="http")
        self.host = cfg.host or metrics_bind_host(node.config.serve_addr)
        self.port = cfg.port
        self.model = cfg.model_name or Path(node.engine.model_path).stem
        self.endpoint = loopback_endpoint(node.config.serve_addr)
        self._keys: list[tuple[bytes, str, HttpApiKey]] = [
            (k.key.encode(), k.name or f"key-{i}", k) for i, k in enumerate(cfg.api_keys)
        ]
        self._clients: dict[str, AsyncClient] = {}  # one per key: its own in-flight budget
        self._inflight: dict[str, int] = {}
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    # ---- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        # handler_cancellation: a caller that hangs up cancels its request on the node.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                exc.errno, f"http: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        if self.node.keys is None:
            # inproc: the serve ROUTER is reached through a pipe in this process, with
            # no TCP and no I/O-thread hop (about 5 ms less TTFT on a busy 2-core box).
            # With CURVE the front keeps loopback TCP, where the handshake names it.
            self.endpoint = f"inproc://zmesh-http-{id(self)}"
            self.node.serve.bind(self.endpoint)
        self.log.info("http.started", url=self.url, model=self.model, keys=len(self._keys))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    def _client(self, name: str) -> AsyncClient:
        c = self._clients.get(name)
        if c is None:
            kw: dict[str, Any] = {"context": self.node.ctx}
            if self.node.keys is not None:  # CURVE: talk to our node as the node itself
                kw.update(client_key=self.node.keys, server_key=self.node.keys.public.decode())
            c = self._clients[name] = AsyncClient(self.endpoint, timeout=self.cfg.timeout_s, **kw)
        return c

    # ---- checks --------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return _json(exc.body(), exc.status, exc.headers())
        except web.HTTPException as exc:  # unknown path, wrong method, body too large
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
            err = ApiError(
                exc.status, exc.reason, "invalid_request_error", code.get(exc.status, "http")
            )
            return _json(err.body(), exc.status)
        except Exception as exc:  # a bug costs this request, in the API's shape
            self.log.exception("http.handler_failed", path=request.path, error=repr(exc))
            err = _api_error(exc)
            return _json(err.body(), err.status)

    def not_ready(self) -> str | None:
        """Why the node cannot serve yet (None: it can): the model loads before the
        node binds, so ``ready`` covers it; a node with seeds must have heard a peer."""
        if not self.node.ready.is_set():
            return "the node is starting"
        if self.node.config.seeds and not self.node.peers.alive():
            return "the node has not joined the mesh yet (no peer heard)"
        return None

    def _auth(self, request: web.Request) -> tuple[str, str]:
        """(client name, tenant) of a request, or 401/403."""
        wanted = request.headers.get("x-zmesh-tenant")
        if not self._keys:
            return "anonymous", wanted or "default"
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                401, "missing API key: send Authorization: Bearer KEY",
                "authentication_error", "missing_api_key",
            )  # fmt: skip
        given = token.strip().encode()
        # compare_digest against every key: the time taken says nothing of which matched.
        found = [(n, k) for raw, n, k in self._keys if hmac.compare_digest(raw, given)]
        if not found:
            self.node.count("http_auth_failed")
            self.log.warning("http.auth_failed", peer=request.remote)
            raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
        name, key = found[0]
        tenant = wanted or key.tenants[0]
        if tenant not in key.tenants:
            self.node.count("requests_forbidden")
            self.log.warning("auth.forbidden", key_name=name, tenant=tenant, via="http")
            raise ApiError(
                403, f"key {name!r} may not use tenant {tenant!r}", "permission_error", "forbidden"
            )
        return name, tenant

    # ---- endpoints ---------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        why = self.not_ready()
        if why is not None:
            return _json({"status": "starting", "reason": why}, 503)
        return _json({"status": "ok", "node_id": self.node.node_id, "model": self.model})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.node.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    async def list_models(self, request: web.Request) -> web.Response:
        self._auth(request)
        return _json(models(self.model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        name, tenant = self._auth(request)
        if (why := self.not_ready()) is not None:
            raise ApiError(503, why, "server_error", "not_ready")
        body = await request.read()  # over client_max_size: 413 from aiohttp
        req: CompletionRequest | ChatRequest
        if chat:
            req = decode_body(body, ChatRequest)
            turns = req.turns()
            try:
                prompt: str | list[int] = self.node.engine.chat_prompt(
                    turns, self.cfg.chat_template
                )
            except EngineError as exc:
                raise _api_error(exc) from None
        else:
            req = decode_body(body, CompletionRequest)
            prompt = req.text_or_tokens()
        if req.model is not None and req.model != self.model:
            raise ApiError(
                404, f"the model {req.model!r} does not exist; this mesh serves {self.model!r}",
                "invalid_request_error", "model_not_found",
            )  # fmt: skip
        params = req.params(DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_MAX_TOKENS)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not 1 <= len(rid) <= P.MAX_ID_CHARS:
            raise ApiError.invalid(f"x-request-id must be 1..{P.MAX_ID_CHARS} characters")
        limit = self.node.config.max_inflight_per_client
        n = self._inflight.get(name, 0)
        if limit and n >= limit:
            raise ApiError.from_zmesh(
                P.TOO_MANY_REQUESTS,
                f"this key has {n} requests in flight (max_inflight_per_client)",
            )
        self._inflight[name] = n + 1
        kw: dict[str, Any] = {
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "seed": params.seed,
            "stop": params.stop,
            "tenant": tenant,
            # Callers share this front's connection (and, without keys, one client):
            # their own ids may clash, so the mesh sees the caller's id plus a suffix.
            "request_id": f"{rid[: P.MAX_ID_CHARS - 13]}~{uuid.uuid4().hex[:12]}",
            "endpoint": self.endpoint,
        }
        shapes = Shapes(chat, rid, self.model)
        client = self._client(name)
        try:
            if req.stream:
                return await self._stream(request, client, prompt, kw, shapes, req.include_usage)
            try:
                done = await client.generate(prompt, **kw)
            except Exception as exc:
                raise _api_error(exc) from None
            headers = {**routing_headers(done), "x-request-id": rid}
            return _json(shapes.response(done), headers=headers)
        finally:
            left = self._inflight.get(name, 1) - 1
            if left > 0:
                self._inflight[name] = left
            else:
                self._inflight.pop(name, None)

    async def _stream(
        self,
        request: web.Request,
        client: AsyncClient,
        prompt: str | list[int],
        kw: dict[str, Any],
        shapes: Shapes,
        include_usage: bool,
    ) -> web.StreamResponse:
        """Server-sent events. Headers go out with the first chunk, so an error before
        it (overloaded, prompt too long) still gets its status code; one after it
        comes as a `data: {"error": ...}` event. The routing facts, known only at the
        end, ride in the last chunk's `zmesh` field."""
        resp: web.StreamResponse | None = None

        async def send(obj: Any) -> None:
            nonlocal resp
            if resp is None:
                resp = web.StreamResponse(
                    headers={
                        "Content-Type": "text/event-stream",
                        "Cache-Control": "no-cache",
                        "x-request-id": shapes.request_id,
                    }
                )
                await resp.prepare(request)
            await resp.write(b"data: " + msgspec.json.encode(obj) + b"\n\n")

        # aclosing: a caller gone mid-stream (a failed write, or the handler cancelled)
        # closes the client's stream, which sends the node a Cancel.
        stream = cast("AsyncGenerator[P.Chunk | P.Done, None]", client.stream(prompt, **kw))
        async with contextlib.aclosing(stream) as events:
            try:
                async for ev in events:
                    if isinstance(ev, P.Chunk):
                        await send(shapes.chunk(ev.text))
                    elif isinstance(ev, P.Done):
                        await send(shapes.chunk("", ev))
                        if include_usage:
                            await send(shapes.usage_chunk(ev))
            except (ApiError, RequestError, RequestTimeout, NoEndpointAvailable) as exc:
                err = _api_error(exc)
                if resp is None:
                    raise err from None
                await send(err.body())
            except ConnectionResetError:  # the caller hung up: leaving closes the stream
                self.log.info("http.caller_gone", request_id=kw["request_id"])
                assert resp is not None
                return resp
        assert resp is not None  # a stream ends with Done or an error
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
