"""What comes in on the serve socket: framing, dispatch, authorization, admission.

The serve loop reads one message per frame (a REQ socket's empty delimiter is
tolerated), checks a client key's rights per message (keys on), drops a partitioned
peer's traffic, and hands each message to the part that owns it. A `Generate` is
validated, checked against duplicate ids of its caller's scope and against
`max_inflight_per_client`, then given to the pipeline. Request ids are per caller
(`scope`): a client key (all its connections), else the connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import zmq

from zmesh import protocol as P
from zmesh.kvpeer import KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.membership import Advertiser, Membership
from zmesh.node.pipeline import Pipeline
from zmesh.node.push import KvPush
from zmesh.node.transport import Transport
from zmesh.node.worker import Worker
from zmesh.security import AuthorizedKey, Denial


def scope(envelope: list[bytes], caller: AuthorizedKey | None) -> bytes:
    """Whose request ids these are: a client key (all its connections), else the
    connection (ROUTER identity): a keyless client, or a peer's DEALER. Ids of two
    scopes never clash, and a Cancel reaches only requests of its own scope."""
    if caller is not None and caller.role != "node":
        return caller.public
    return envelope[0] if envelope else b""


def forbidden(caller: AuthorizedKey | None, msg: P.Message) -> str | None:
    """Why ``caller`` may not send ``msg`` (None: it may). Nodes may send anything;
    client keys may ask, check status and ping, for their own tenants only."""
    if caller is None:
        return "unidentified connection"
    if caller.role == "node":
        return None
    if isinstance(msg, P.Generate) and not caller.may_use_tenant(msg.tenant):
        return f"key {caller.name!r} may not use tenant {msg.tenant!r}"
    if isinstance(msg, P.SnapshotRequest):
        return "only mesh nodes may pull cache snapshots"
    if isinstance(msg, P.KvFetch | P.KvOffer):
        return "only mesh nodes may fetch or offer KV state"
    if isinstance(msg, P.Ping) and getattr(msg, "sender", None) is not None:
        return "only mesh nodes may announce themselves"
    return None


class InFlight:
    """Generate requests admitted and not answered yet: by (scope, id), and per client."""

    def __init__(self) -> None:
        self.keys: set[tuple[bytes, str]] = set()
        self.count = 0
        self.by_client: dict[bytes, int] = {}  # only clients with some

    def add(self, key: tuple[bytes, str], client: bytes | None) -> None:
        if client is not None:
            self.by_client[client] = self.by_client.get(client, 0) + 1
        self.count += 1
        self.keys.add(key)

    def done(self, key: tuple[bytes, str], client: bytes | None) -> None:
        """The request `add` counted was answered (or refused later on)."""
        self.keys.discard(key)
        self.count = max(self.count - 1, 0)
        if client is None:
            return
        n = self.by_client.get(client, 0) - 1
        if n > 0:
            self.by_client[client] = n
        else:
            self.by_client.pop(client, None)  # idle clients cost no memory


class Admission:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        inflight: InFlight,
        pipeline: Pipeline,
        worker: Worker,
        advertiser: Advertiser,
        membership: Membership,
        kv: KvPeer,
        status: Callable[[str], P.Status],
        push: KvPush,
    ) -> None:
        self._c = ctx
        self._t = transport
        self.inflight = inflight
        self._pipeline = pipeline
        self._worker = worker
        self._adv = advertiser
        self._members = membership
        self._kv = kv
        self._status = status
        self._push = push
        self._tasks: set[asyncio.Task[None]] = set()  # the loop holds tasks only weakly

    # ---- the serve socket ---------------------------------------------------------

    async def serve_loop(self) -> None:
        t = self._t
        while True:
            caller: AuthorizedKey | None = None
            if t.keys is None:
                frames = await t.serve.recv_multipart()
            else:
                # With CURVE, the ZAP handler made each connection's User-Id its key.
                parts = await t.serve.recv_multipart(copy=False)
                caller = self._caller(parts[-1])
                frames = [p.bytes for p in parts]
            # One frame per message; a REQ socket adds an empty delimiter we echo back.
            envelope, payload = frames[:-1], frames[-1]
            try:
                if len(frames) > 3 or (len(frames) == 3 and frames[1] != b""):
                    self._c.count("frames_malformed")
                    self._c.log.warning("frame.malformed", socket="serve", parts=len(frames))
                    t.reply_error(
                        frames[:1],
                        None,
                        P.MALFORMED,
                        f"expected one frame per message, got {len(frames) - 1}",
                    )
                    continue
                self.on_serve(envelope, payload, caller)
            except Exception as exc:  # a bug must cost one request, not the node
                self._c.log.exception("serve.handler_failed", error=repr(exc))

    def on_serve(
        self, envelope: list[bytes], payload: bytes, caller: AuthorizedKey | None = None
    ) -> None:
        c, t = self._c, self._t
        try:
            msg = P.decode(payload)
        except P.ProtocolError as exc:
            c.count("frames_malformed")
            c.log.warning(
                "frame.malformed",
                socket="serve",
                code=exc.code,
                error=exc.message,
                request_id=exc.request_id,
            )
            t.reply(envelope, P.error_for(exc, c.node_id))
            return
        if t.keys is not None and (why := forbidden(caller, msg)) is not None:
            c.count("requests_forbidden")
            rid = getattr(msg, "request_id", None)
            c.log.warning(
                "auth.forbidden",
                request_id=rid,
                key=caller.public.decode() if caller else None,
                key_name=caller.name if caller else None,
                type=type(msg).__name__,
                why=why,
            )
            t.reply_error(envelope, rid, P.FORBIDDEN, why)
            return
        if t.faults.cut_off(self._peer_sender(envelope, msg, caller)):
            return
        if isinstance(msg, P.Generate):
            self._spawn(self._handle_generate(envelope, msg, caller))
        elif isinstance(msg, P.StatusRequest):
            t.reply(envelope, self._status(msg.request_id))
        elif isinstance(msg, P.SnapshotRequest):
            self._adv.send_snapshot(envelope, msg)
        elif isinstance(msg, P.KvFetch):
            self._spawn(self._kv.serve_fetch(envelope, msg))
        elif isinstance(msg, P.KvOffer):
            self._push.on_offer(envelope, msg)
        elif isinstance(msg, P.Ping):
            t.reply(
                envelope,
                P.Pong(request_id=msg.request_id, sent_at=msg.sent_at, node_id=c.node_id),
            )
            if msg.sender is not None:
                self._members.learn_of(msg.sender)
        elif isinstance(msg, P.Cancel):
            # Only the caller's own request: another's id is ignored like an unknown one.
            sc = scope(envelope, caller)
            self._worker.cancel((sc, msg.request_id))
            self._pipeline.relay.cancel_forwards(sc, msg.request_id)
        else:
            c.count("frames_unexpected")
            c.log.warning("frame.unexpected", socket="serve", type=type(msg).__name__)
            t.reply(
                envelope,
                P.Error(
                    request_id=getattr(msg, "request_id", None),
                    code=P.INVALID_REQUEST,
                    message=f"{type(msg).__name__} is not accepted on the serve socket",
                    node_id=c.node_id,
                ),
            )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Keep a reference: the loop holds tasks only weakly.
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _caller(self, frame: zmq.Frame) -> AuthorizedKey | None:
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        key = user.encode() if isinstance(user, str) else None
        return self._t.authorized.get(key) if key else None

    def _peer_sender(
        self, envelope: list[bytes], msg: P.Message, caller: AuthorizedKey | None
    ) -> str | None:
        """The peer that sent ``msg`` to the serve socket (None: a client), remembered
        by ROUTER identity so that replies to it count as peer traffic."""
        if caller is not None and caller.role != "node":
            return None
        ident = envelope[0] if envelope else b""
        node: str | None = None
        if isinstance(msg, P.Generate):
            node = msg.origin
        elif isinstance(msg, P.Ping) and msg.sender is not None:
            node = msg.sender.node_id
        elif isinstance(msg, P.SnapshotRequest | P.KvOffer):
            node = msg.node_id
        if node is None or self._c.peers.get(node) is None:
            return self._t.faults.peer_idents.get(ident)  # a Cancel from a peer, or a client
        self._t.faults.remember(ident, node)
        return node

    # ---- CURVE handshake refusals (the ZAP handler's callbacks) -------------------

    def on_auth_denied(self, d: Denial) -> None:
        self._c.count("auth_denied")
        if d.log:
            self._c.log.warning(
                "auth.denied",
                key=d.key or None,
                domain=d.domain,
                address=d.address,
                reason=d.reason,
                repeats=d.repeats,
            )

    def on_auth_suppressed(self, n: int, window_s: float) -> None:
        # The ZAP handler logs a bounded number of refusals per window; this sums the rest.
        self._c.log.warning("auth.denied_summary", more_refused=n, window_s=window_s)

    # ---- Generate ----------------------------------------------------------------

    def client_of(
        self, envelope: list[bytes], msg: P.Generate, caller: AuthorizedKey | None
    ) -> bytes | None:
        """Whom a request counts against for max_inflight_per_client; None for a peer.

        With keys, a client is its CURVE key (all its connections share one budget) and
        a peer is a node-role key. Without keys a client is its ROUTER identity (one
        connection), and a request forwarded by a known peer is the peer's: keyless
        meshes trust whoever reaches them anyway.
        """
        if caller is not None:
            return None if caller.role == "node" else caller.public
        if self._t.keys is None and msg.origin and self._c.peers.get(msg.origin) is not None:
            return None
        return envelope[0] if envelope else b""

    def _admit(
        self,
        key: tuple[bytes, str],
        client: bytes | None,
        envelope: list[bytes],
        msg: P.Generate,
    ) -> bool:
        """Count the request in flight, unless its client is at its limit (then refuse)."""
        limit = self._c.config.max_inflight_per_client
        if client is not None:
            n = self.inflight.by_client.get(client, 0)
            if limit and n >= limit:
                self._refuse_client(client, envelope, msg, n)
                return False
        self.inflight.add(key, client)
        return True

    def _refuse_client(self, client: bytes, envelope: list[bytes], msg: P.Generate, n: int) -> None:
        c = self._c
        c.count("requests_client_limited")
        caller = self._t.authorized.get(client)
        c.log.warning(
            "request.failed",
            request_id=msg.request_id,
            code=P.TOO_MANY_REQUESTS,
            client=caller.name if caller else client.hex(),
            inflight=n,
        )
        self._t.reply_error(
            envelope,
            msg.request_id,
            P.TOO_MANY_REQUESTS,
            f"this client has {n} requests in flight on {c.node_id} "
            f"(max_inflight_per_client); wait for an answer before sending more",
        )

    async def _handle_generate(
        self, envelope: list[bytes], msg: P.Generate, caller: AuthorizedKey | None = None
    ) -> None:
        c, t = self._c, self._t
        received = time.time()
        rid = msg.request_id
        try:
            P.validate_generate(msg)
        except P.ProtocolError as exc:
            c.count("requests_invalid")
            c.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            t.reply_error(envelope, rid, exc.code, exc.message)
            return
        key = (scope(envelope, caller), rid)
        if key in self.inflight.keys:  # the same caller's; another's id is no business of it
            c.count("requests_duplicate")
            c.log.warning(
                "request.failed",
                request_id=rid,
                code=P.INVALID_REQUEST,
                error="duplicate request id in flight",
            )
            t.reply_error(
                envelope,
                rid,
                P.INVALID_REQUEST,
                f"request id {rid} is already in flight on {c.node_id}",
            )
            return
        client = self.client_of(envelope, msg, caller)
        if not self._admit(key, client, envelope, msg):
            return
        if msg.progress:
            self._worker.watch(key, envelope)  # keep-alives for the forwarder
        queued = False
        try:
            queued = await self._pipeline.accept(envelope, msg, received, client, key[0])
        finally:
            if not queued:  # answered, or failed, before reaching the worker (which
                self.inflight.done(key, client)  # otherwise clears these when done)
                self._worker.unwatch(key)
