"""The node actor: one asyncio loop owns every socket; the engine runs in a worker thread.

Sockets: ROUTER `serve` (clients and peers), one DEALER per peer (forwards, snapshot
pulls, pings), PUB `gossip` (heartbeats, cache deltas), SUB (peers' gossip).
A request is routed once (see routing.py); a forward that fails, times out or whose
peer turns suspect is served locally, so no request is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio

from zmesh import protocol as P
from zmesh.blocks import tenant_namespace
from zmesh.config import NodeConfig, check_address
from zmesh.engine import Engine, EngineError, GenerationResult
from zmesh.faults import DelayLine, FaultControl, FaultError
from zmesh.gossip import LocalAdvert
from zmesh.kvpeer import KvPeer
from zmesh.kvstate import KvState
from zmesh.log import get_logger
from zmesh.metrics import NodeMetrics
from zmesh.peers import NEED_SNAPSHOT, PeerEstimate, PeerState, PeerTable
from zmesh.routing import (
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
)
from zmesh.security import (
    DOMAIN_GOSSIP,
    DOMAIN_SERVE,
    AuthorizedKey,
    Denial,
    KeyPair,
    ZapHandler,
    client_socket,
    load_authorized,
    load_keypair,
    load_public_key,
    server_socket,
)

DEFAULT_PREFILL_S_PER_TOKEN = 0.002  # until measured: about what 2 CPU cores do
DEFAULT_SERVICE_S = 0.5
DEFAULT_LINK_DELAY_S = 0.001
DEFAULT_DECODE_S_PER_TOKEN = 0.015
# A forwarder waits this long past a request's deadline for the peer's own
# deadline_exceeded (which says where the time went) before answering it itself.
DEADLINE_GRACE_S = 0.25
# A forward whose peer sent Progress waits this many of its keep-alive periods for the
# next frame before serving locally.
PROGRESS_MISSES = 3
# Until a node has measured its own rates it borrows its peers' median (of two peers at
# least), kept within this factor of the start values: one peer's claim must not set it.
BORROW_FACTOR = 10.0
_FALLBACK = object()  # sentinel pushed into a forward's queue when its peer fails


@dataclass(slots=True)
class _Job:
    """A request accepted for local service."""

    msg: P.Generate
    reply_to: list[bytes]  # ROUTER envelope of whoever asked
    tokens: list[int]
    received_at: float
    route_reason: str
    route_path: list[str]
    predicted_s: float = 0.0  # predicted service time, for the advertised backlog
    attempt: int = 0
    chunks: int = 0
    cancelled: bool = False
    client: bytes | None = None  # counted against max_inflight_per_client (None: a peer)
    scope: bytes = b""  # the sender's `_scope`: (scope, request id) is the job's key
    # KV shipping: the pull under way for this job, its result, and what it brought.
    kv_pull: asyncio.Task[KvState] | None = None
    pulled_from: str | None = None
    kv_state: KvState | None = None
    shipped_tokens: int = 0


@dataclass(slots=True)
class _Forward:
    target: str
    sent_at: float  # monotonic
    cost_s: float  # predicted service time at the target
    request_id: str = ""  # the caller's id; the peer knows it by its wire id (see _forward)
    scope: bytes = b""  # the caller's `_scope`: its Cancel follows the forward
    cancelled: bool = False  # the caller cancelled: never served here instead
    replies: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


class Node:
    def __init__(self, config: NodeConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.log = get_logger("zmesh.node").bind(node_id=self.node_id)
        self.engine = engine or Engine(config.engine)
        self.epoch = random.getrandbits(62)
        self.advert = LocalAdvert(self.epoch)
        g = config.gossip
        self.peers = PeerTable(
            self.node_id,
            g.suspect_after_s,
            g.dead_after_s,
            g.snapshot_timeout_s,
            forget_after_s=g.forget_s,
        )
        self._peer_refused_logged_at = -math.inf
        r = config.routing
        self.routing = RoutingSettings(
            policy=r.policy,
            max_hops=r.max_hops,
            min_gain_s=r.min_gain_s,
            min_gain_frac=r.min_gain_frac,
            place_slack_frac=r.place_slack_frac,
            balance_abs=r.balance_abs,
            balance_rel=r.balance_rel,
            ship=r.ship,
            ship_min_tokens=r.ship_min_tokens,
            ship_max_tokens=self.engine.max_ship_tokens,
            # No give-up: a forward is waited for while the peer sends Progress.
            give_up_s=0.0,
        )
        self.policy_state = PolicyState.seeded(int.from_bytes(self.node_id.encode()[:8], "little"))
        self.serve_addr = config.advertise_serve or config.serve_addr
        self.gossip_addr = config.advertise_gossip or config.gossip_addr
        self.counters: dict[str, int] = {}
        self.metrics = NodeMetrics(self)  # Prometheus; served when metrics_port > 0
        self._fault_rng = random.Random(self.epoch)
        self._last_route: dict[str, Candidate] = {}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=config.max_queue)
        self._running: _Job | None = None
        self._running_since = 0.0
        self._queued_s = 0.0  # predicted seconds of the jobs waiting in _queue
        self._load_changed = False  # send a heartbeat at the next gossip tick
        # Request ids are scoped to their caller (`_scope`): keyed (scope, request id).
        self._jobs: dict[tuple[bytes, str], _Job] = {}
        self._ids_inflight: set[tuple[bytes, str]] = set()  # admitted, not answered yet
        self._inflight = 0  # Generate requests accepted and not answered yet
        self._inflight_by_client: dict[bytes, int] = {}  # only clients with some
        self._forwards: dict[str, _Forward] = {}
        self._dealers: dict[str, zmq.asyncio.Socket] = {}  # by peer serve address
        self._dealer_tasks: dict[str, asyncio.Task[None]] = {}  # their reader tasks
        self._subscribed: set[str] = set()
        # Seeds' addresses stay connected when their peer is forgotten: a seed that
        # comes back is heard again, and a mesh cut apart finds itself through them.
        self._seed_addrs = frozenset(a for sd in config.seeds for a in (sd.serve, sd.gossip))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # Tokenizing is off the loop (a long prompt takes seconds) and not queued behind
        # the engine's work: routing needs the tokens before the request is queued.
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self.kv = KvPeer(
            self.engine,
            config.routing,
            self._namespace,
            self._on_engine,
            self._send,
            lambda: self.serve,
            self._count,
            self.log,
        )
        # (caller, request id) -> where to send Progress keep-alives
        self._progress: dict[tuple[bytes, str], list[bytes]] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._request_tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self.ctx = zmq.asyncio.Context()
        self.ready = asyncio.Event()
        # CurveZMQ (config [security]): our key pair, the allowlist, peers' keys.
        sec = config.security
        key_file = sec.secret_key_file
        self.keys: KeyPair | None = load_keypair(key_file) if key_file else None
        self.authorized: dict[bytes, AuthorizedKey] = {}
        if self.keys is not None:
            self.authorized = load_authorized(sec.authorized_dir, sec.authorized_keys)
            self.authorized.setdefault(
                self.keys.public, AuthorizedKey(public=self.keys.public, name=self.node_id)
            )
        self._peer_keys: dict[str, str] = {}  # node id -> its public key (Z85)
        # Fault injection (config [faults], zmesh/faults.py); off: one bool test per send.
        self.faults = FaultControl(
            P.FaultSettings(
                delay_ms=config.faults.delay_ms,
                partition=list(config.faults.partition),
                drop_deltas=config.gossip.drop_deltas,
            ),
            config.faults.control_file,
        )
        self._delayed = DelayLine(self._send_frames)
        self._faults_on = False
        self._delay_s = 0.0
        self._partition: frozenset[str] = frozenset()
        # Which ROUTER identity is which peer (learned from its forwards, pings and
        # snapshot requests), so replies to peers can be delayed or cut too.
        self._peer_idents: dict[bytes, str] = {}
        self._ident_of_peer: dict[str, bytes] = {}
        self._dealer_addrs: dict[int, str] = {}  # id(dealer) -> the peer's serve address
        self._shared_tenants = frozenset(config.tenant_shared)
        self._zap: ZapHandler | None = None

    # ---- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Bind, join the mesh and serve until `stop()`."""
        self.loop = asyncio.get_running_loop()
        if self.keys is not None:
            # The ZAP handler is bound before any CURVE server socket exists.
            self._zap = ZapHandler(
                self.ctx,
                self.authorized,
                self._on_auth_denied,
                on_suppressed=self._on_auth_suppressed,
            )
            self._tasks.append(asyncio.create_task(self._zap.run(), name="zap"))
        self.serve = self._socket(zmq.ROUTER)
        if self.keys is not None:
            server_socket(self.serve, self.keys, DOMAIN_SERVE)
        self.serve.bind(self.config.serve_addr)
        self.pub = self._socket(zmq.PUB)
        if self.keys is not None:
            server_socket(self.pub, self.keys, DOMAIN_GOSSIP)
        self.pub.bind(self.config.gossip_addr)
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        for seed in self.config.seeds:
            key = load_public_key(seed.public_key).decode() if seed.public_key else None
            self._connect_peer(seed.serve, seed.gossip, key)
        self.metrics.start(self.loop)
        self._apply_faults(self.faults.current, "config")
        self._poll_faults()  # a lab's control file may be there before we start
        # += : the seeds' dealer tasks and the ZAP task are in the list already.
        self._tasks += [
            asyncio.create_task(coro, name=name)
            for name, coro in [
                ("serve", self._serve_loop()),
                ("sub", self._sub_loop()),
                ("worker", self._worker_loop()),
                ("gossip", self._gossip_loop()),
                ("ping", self._ping_loop()),
                ("progress", self._progress_loop()),
                ("delay", self._delayed.run()),
            ]
        ]
        self.log.info(
            "node.started",
            serve=self.serve_addr,
            gossip=self.gossip_addr,
            epoch=self.epoch,
            policy=self.routing.policy,
            slots=self.engine.n_slots,
            model=str(self.engine.model_path),
        )
        if self.keys is None:
            # Said in every keyless node's log (compose labs included): who is trusted.
            self.log.warning(
                "security.off",
                note="no [security] keys: anyone who can reach the serve and gossip ports "
                "is trusted as a client and as a peer (docs/security.md)",
            )
        self.ready.set()
        http = None
        try:
            if self.config.http.port:  # the OpenAI-compatible API (zmesh/http/)
                from zmesh.http import HttpFront

                http = HttpFront(self)
                await http.start()
            await self._stopping.wait()
        finally:
            if http is not None:
                await http.stop()
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self.metrics.stop()
            if self._zap is not None:
                self._zap.close()
            self.ctx.destroy(linger=0)
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._tokenizer.shutdown(wait=True, cancel_futures=True)
            self.log.info("node.stopped")

    def stop(self) -> None:
        self._stopping.set()

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        # ZMTP pings: a TCP connection to a peer that vanished without a FIN (partition,
        # container moved to a new IP) is dropped within seconds and reconnected, with
        # a fresh DNS lookup, instead of stalling until the kernel gives up (minutes).
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        return s

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        self.metrics.count(name, n)

    def _connect_peer(
        self,
        serve_addr: str,
        gossip_addr: str,
        public_key: str | None = None,
        node_id: str | None = None,
    ) -> None:
        """Open a DEALER to the peer's serve and subscribe to its gossip (once each).

        With keys on, ``public_key`` (the peer's CURVE server key) must be in our
        allowlist: a member can only point us at other members.
        """
        if serve_addr == self.serve_addr:
            return
        server_key = None
        if self.keys is not None:
            server_key = public_key.encode() if public_key else None
            if server_key is None or server_key not in self.authorized:
                if serve_addr not in self._dealers:
                    self._count("peers_key_unknown")
                    self.log.warning(
                        "auth.peer_key_unknown",
                        peer=node_id,
                        serve=serve_addr,
                        key=public_key,
                    )
                return
            if node_id is not None:
                self._peer_keys[node_id] = public_key  # type: ignore[assignment]
        if serve_addr not in self._dealers:
            d = self._socket(zmq.DEALER)
            d.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            d.setsockopt(zmq.SNDHWM, 1000)
            if self.keys is not None and server_key is not None:
                client_socket(d, self.keys, server_key)
            d.connect(serve_addr)
            self._dealers[serve_addr] = d
            self._dealer_addrs[id(d)] = serve_addr
            task = asyncio.create_task(
                self._dealer_loop(d, serve_addr), name=f"dealer {serve_addr}"
            )
            self._dealer_tasks[serve_addr] = task
            self._tasks.append(task)
        if gossip_addr not in self._subscribed and gossip_addr != self.gossip_addr:
            if self.keys is not None and server_key is not None:
                client_socket(self.sub, self.keys, server_key)  # applies to this connect
            self.sub.connect(gossip_addr)
            self._subscribed.add(gossip_addr)

    def _forget_peer(self, peer: PeerEstimate, why: str) -> None:
        """Drop a peer that has been silent past forget_after_s (or a dead one, to make
        room): close its DEALER and stop subscribing to it, unless a seed or another
        peer uses the same address. Learned again like a new peer if it comes back."""
        self.peers.remove(peer.node_id)
        self._fail_forwards_to(peer.node_id)
        self.kv.costs.forget(peer.node_id)
        self._peer_keys.pop(peer.node_id, None)
        self._peer_idents.pop(self._ident_of_peer.pop(peer.node_id, b""), None)
        in_use = self._seed_addrs | {
            a for p in self.peers.all() for a in (p.serve_addr, p.gossip_addr)
        }
        if peer.serve_addr not in in_use and (d := self._dealers.pop(peer.serve_addr, None)):
            task = self._dealer_tasks.pop(peer.serve_addr)
            task.cancel()
            self._tasks.remove(task)
            self._dealer_addrs.pop(id(d), None)
            d.close(linger=0)
        if peer.gossip_addr not in in_use and peer.gossip_addr in self._subscribed:
            self._subscribed.discard(peer.gossip_addr)
            with contextlib.suppress(zmq.ZMQError):  # never connected (zmq says ENOENT)
                self.sub.disconnect(peer.gossip_addr)
        self._count("peers_forgotten")
        self.log.warning("peer.forgotten", peer=peer.node_id, serve=peer.serve_addr, why=why)

    def _send(self, sock: zmq.asyncio.Socket, envelope: list[bytes], msg: P.Message) -> bool:
        """Send without waiting; False when it cannot go out now (peer not connected)."""
        frames = [*envelope, P.encode(msg)]
        if self._faults_on and (peer := self._peer_of(sock, envelope)) is not None:
            return self._send_faulty(sock, frames, peer)
        return self._send_frames(sock, frames)

    def _send_frames(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
        # Through the asyncio socket, not a sync shadow of it: with DONTWAIT the future
        # is done at once (zmq.Again inside when the peer is not connected), and the
        # socket then re-checks for incoming messages. The zmq FD is edge-triggered and
        # a send can consume the edge that announced one: sent through a shadow, the
        # recv waiting on this socket slept until some other event (found by fuzzing:
        # a node stopped reading its serve socket after answering a request).
        fut = cast("asyncio.Future[Any]", sock.send_multipart(frames, flags=zmq.DONTWAIT))
        if not fut.done():  # queued behind an earlier send: it will go out
            return True
        exc = fut.exception()
        if exc is None:
            return True
        if not isinstance(exc, zmq.Again):
            self.log.warning("send.failed", error=str(exc))
        return False

    def _dealer_for(self, peer: PeerEstimate) -> zmq.asyncio.Socket | None:
        return self._dealers.get(peer.serve_addr)

    # ---- fault injection (config [faults], zmesh/faults.py) -----------------

    def _poll_faults(self) -> None:
        try:
            changed = self.faults.poll()
        except FaultError as exc:
            self._count("faults_invalid")
            self.log.warning("fault.invalid", error=str(exc))
            return
        if changed is not None:
            self._apply_faults(*changed)

    def _apply_faults(self, f: P.FaultSettings, source: str) -> None:
        self._delay_s = f.delay_ms / 1000
        self._partition = frozenset(f.partition)
        # The delay line stays in the path until it drains, so nothing overtakes.
        self._faults_on = bool(self._delay_s or self._partition or len(self._delayed))
        if self._faults_on or f.drop_deltas or source != "config":
            self._count("faults_changed")
            self.log.warning(
                "fault.changed",
                source=source,
                delay_ms=f.delay_ms,
                partition=sorted(f.partition),
                drop_deltas=f.drop_deltas,
            )

    def _peer_of(self, sock: zmq.asyncio.Socket, envelope: list[bytes]) -> str | None:
        """The peer a send goes to: "" for gossip (every peer), None for a client."""
        if sock is self.pub:
            return ""
        if sock is self.serve:
            return self._peer_idents.get(envelope[0]) if envelope else None
        addr = self._dealer_addrs.get(id(sock), "")
        return self._peer_at(addr) or addr

    def _peer_at(self, serve_addr: str) -> str | None:
        return next((p.node_id for p in self.peers.all() if p.serve_addr == serve_addr), None)

    def _send_faulty(self, sock: zmq.asyncio.Socket, frames: list[bytes], peer: str) -> bool:
        """A send to a peer while faults are on: cut by a partition, or delayed."""
        if peer in self._partition:
            self._count("fault_dropped_out")
            return True  # lost on the way, as on a cut link: the sender cannot tell
        if self._delay_s > 0 or len(self._delayed):
            if self._delayed.push(sock, frames, self._delay_s):
                return True
            self._count("fault_delay_overflow")
            return False
        return self._send_frames(sock, frames)

    def _cut_off(self, peer: str | None) -> bool:
        """Whether a message from ``peer`` is ignored because of an injected partition."""
        if peer is None or peer not in self._partition:
            return False
        self._count("fault_dropped_in")
        return True

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
        elif isinstance(msg, P.SnapshotRequest):
            node = msg.node_id
        if node is None or self.peers.get(node) is None:
            return self._peer_idents.get(ident)  # a Cancel from a peer, or a client
        old = self._ident_of_peer.get(node)
        if old != ident:  # a reconnect: one identity per peer, so this stays small
            self._peer_idents.pop(old or b"", None)
            self._peer_idents[ident] = node
            self._ident_of_peer[node] = ident
        return node

    # ---- serve socket ----------------------------------------------------

    async def _serve_loop(self) -> None:
        while True:
            caller: AuthorizedKey | None = None
            if self.keys is None:
                frames = await self.serve.recv_multipart()
            else:
                # With CURVE, the ZAP handler made each connection's User-Id its key.
                parts = await self.serve.recv_multipart(copy=False)
                caller = self._caller(parts[-1])
                frames = [p.bytes for p in parts]
            # One frame per message; a REQ socket adds an empty delimiter we echo back.
            envelope, payload = frames[:-1], frames[-1]
            try:
                if len(frames) > 3 or (len(frames) == 3 and frames[1] != b""):
                    self._count("frames_malformed")
                    self.log.warning("frame.malformed", socket="serve", parts=len(frames))
                    self._reply_error(
                        frames[:1],
                        None,
                        P.MALFORMED,
                        f"expected one frame per message, got {len(frames) - 1}",
                    )
                    continue
                self._on_serve(envelope, payload, caller)
            except Exception as exc:  # a bug must cost one request, not the node
                self.log.exception("serve.handler_failed", error=repr(exc))

    def _on_serve(
        self, envelope: list[bytes], payload: bytes, caller: AuthorizedKey | None = None
    ) -> None:
        try:
            msg = P.decode(payload)
        except P.ProtocolError as exc:
            self._count("frames_malformed")
            self.log.warning(
                "frame.malformed",
                socket="serve",
                code=exc.code,
                error=exc.message,
                request_id=exc.request_id,
            )
            self._send(self.serve, envelope, P.error_for(exc, self.node_id))
            return
        if self.keys is not None and (why := self._forbidden(caller, msg)) is not None:
            self._count("requests_forbidden")
            rid = getattr(msg, "request_id", None)
            self.log.warning(
                "auth.forbidden",
                request_id=rid,
                key=caller.public.decode() if caller else None,
                key_name=caller.name if caller else None,
                type=type(msg).__name__,
                why=why,
            )
            self._reply_error(envelope, rid, P.FORBIDDEN, why)
            return
        if self._cut_off(self._peer_sender(envelope, msg, caller)):
            return
        if isinstance(msg, P.Generate):
            # Keep a reference: the loop holds tasks only weakly.
            task = asyncio.create_task(self._handle_generate(envelope, msg, caller))
            self._request_tasks.add(task)
            task.add_done_callback(self._request_tasks.discard)
        elif isinstance(msg, P.StatusRequest):
            self._send(self.serve, envelope, self._status(msg.request_id))
        elif isinstance(msg, P.SnapshotRequest):
            self._send_snapshot(envelope, msg)
        elif isinstance(msg, P.KvFetch):
            task = asyncio.create_task(self.kv.serve_fetch(envelope, msg))
            self._request_tasks.add(task)
            task.add_done_callback(self._request_tasks.discard)
        elif isinstance(msg, P.Ping):
            self._send(
                self.serve,
                envelope,
                P.Pong(request_id=msg.request_id, sent_at=msg.sent_at, node_id=self.node_id),
            )
            if msg.sender is not None:
                self._learn_of(msg.sender)
        elif isinstance(msg, P.Cancel):
            # Only the caller's own request: another's id is ignored like an unknown one.
            scope = self._scope(envelope, caller)
            job = self._jobs.get((scope, msg.request_id))
            if job is not None:
                job.cancelled = True
            self._cancel_forwards(scope, msg.request_id)
        else:
            self._count("frames_unexpected")
            self.log.warning("frame.unexpected", socket="serve", type=type(msg).__name__)
            self._send(
                self.serve,
                envelope,
                P.Error(
                    request_id=getattr(msg, "request_id", None),
                    code=P.INVALID_REQUEST,
                    message=f"{type(msg).__name__} is not accepted on the serve socket",
                    node_id=self.node_id,
                ),
            )

    @staticmethod
    def _scope(envelope: list[bytes], caller: AuthorizedKey | None) -> bytes:
        """Whose request ids these are: a client key (all its connections), else the
        connection (ROUTER identity): a keyless client, or a peer's DEALER. Ids of two
        scopes never clash, and a Cancel reaches only requests of its own scope."""
        if caller is not None and caller.role != "node":
            return caller.public
        return envelope[0] if envelope else b""

    def _caller(self, frame: zmq.Frame) -> AuthorizedKey | None:
        try:
            user = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        key = user.encode() if isinstance(user, str) else None
        return self.authorized.get(key) if key else None

    @staticmethod
    def _forbidden(caller: AuthorizedKey | None, msg: P.Message) -> str | None:
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
        if isinstance(msg, P.KvFetch):
            return "only mesh nodes may fetch KV state"
        if isinstance(msg, P.Ping) and getattr(msg, "sender", None) is not None:
            return "only mesh nodes may announce themselves"
        return None

    def _on_auth_denied(self, d: Denial) -> None:
        self._count("auth_denied")
        if d.log:
            self.log.warning(
                "auth.denied",
                key=d.key or None,
                domain=d.domain,
                address=d.address,
                reason=d.reason,
                repeats=d.repeats,
            )

    def _on_auth_suppressed(self, n: int, window_s: float) -> None:
        # The ZAP handler logs a bounded number of refusals per window; this sums the rest.
        self.log.warning("auth.denied_summary", more_refused=n, window_s=window_s)

    def _reply_error(self, envelope: list[bytes], rid: str | None, code: str, message: str) -> None:
        self._send(
            self.serve,
            envelope,
            P.Error(request_id=rid, code=code, message=message, node_id=self.node_id),
        )

    # ---- requests --------------------------------------------------------

    def _client_of(
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
        if self.keys is None and msg.origin and self.peers.get(msg.origin) is not None:
            return None
        return envelope[0] if envelope else b""

    def _admit(self, client: bytes | None, envelope: list[bytes], msg: P.Generate) -> bool:
        """Count the request in flight, unless its client is at its limit (then refuse)."""
        limit = self.config.max_inflight_per_client
        if client is not None:
            n = self._inflight_by_client.get(client, 0)
            if limit and n >= limit:
                self._refuse_client(client, envelope, msg, n)
                return False
            self._inflight_by_client[client] = n + 1
        self._inflight += 1
        return True

    def _refuse_client(self, client: bytes, envelope: list[bytes], msg: P.Generate, n: int) -> None:
        self._count("requests_client_limited")
        caller = self.authorized.get(client)
        self.log.warning(
            "request.failed",
            request_id=msg.request_id,
            code=P.TOO_MANY_REQUESTS,
            client=caller.name if caller else client.hex(),
            inflight=n,
        )
        self._reply_error(
            envelope,
            msg.request_id,
            P.TOO_MANY_REQUESTS,
            f"this client has {n} requests in flight on {self.node_id} "
            f"(max_inflight_per_client); wait for an answer before sending more",
        )

    def _release(self, client: bytes | None) -> None:
        """The request that `_admit` counted was answered (or refused later on)."""
        self._inflight = max(self._inflight - 1, 0)
        if client is None:
            return
        n = self._inflight_by_client.get(client, 0) - 1
        if n > 0:
            self._inflight_by_client[client] = n
        else:
            self._inflight_by_client.pop(client, None)  # idle clients cost no memory

    async def _handle_generate(
        self, envelope: list[bytes], msg: P.Generate, caller: AuthorizedKey | None = None
    ) -> None:
        received = time.time()
        rid = msg.request_id
        try:
            P.validate_generate(msg)
        except P.ProtocolError as exc:
            self._count("requests_invalid")
            self.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            self._reply_error(envelope, rid, exc.code, exc.message)
            return
        key = (self._scope(envelope, caller), rid)
        if key in self._ids_inflight:  # the same caller's; another's id is no business of it
            self._count("requests_duplicate")
            self.log.warning(
                "request.failed",
                request_id=rid,
                code=P.INVALID_REQUEST,
                error="duplicate request id in flight",
            )
            self._reply_error(
                envelope,
                rid,
                P.INVALID_REQUEST,
                f"request id {rid} is already in flight on {self.node_id}",
            )
            return
        client = self._client_of(envelope, msg, caller)
        if not self._admit(client, envelope, msg):
            return
        self._ids_inflight.add(key)
        if msg.progress:
            self._progress[key] = envelope
            self._send_progress(key, envelope)  # at once: the forwarder's first reply
        queued = False
        try:
            queued = await self._accept(envelope, msg, received, client, key[0])
        finally:
            if not queued:  # answered, or failed, before reaching the worker (which
                self._ids_inflight.discard(key)  # otherwise clears these when done)
                self._release(client)
                self._progress.pop(key, None)

    async def _accept(
        self,
        envelope: list[bytes],
        msg: P.Generate,
        received: float,
        client: bytes | None,
        scope: bytes,
    ) -> bool:
        """Route and serve or relay an admitted request; True once queued for the worker
        (which then owns its in-flight count)."""
        rid = msg.request_id
        self._count("requests_received")
        self.log.info(
            "request.received", request_id=rid, hops=msg.hops, origin=msg.origin, tenant=msg.tenant
        )
        if _expired(msg):
            self._deadline_error(envelope, rid, "deadline passed before the request arrived")
            return False
        try:
            tokens = await self.loop.run_in_executor(
                self._tokenizer, self.engine.prompt_tokens, msg.prompt, msg.tokens
            )
        except EngineError as exc:
            self._count("requests_failed")
            self.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            self._reply_error(envelope, rid, exc.code, exc.message)
            return False
        path = [*((msg.origin and [msg.origin]) or []), self.node_id]
        decision = self._route(msg, tokens)
        attempt = 0
        if decision.forward:
            outcome = await self._forward(envelope, msg, decision, tokens, scope)
            if outcome == "done":
                return False
            attempt = 1 if outcome == "partial" else 0
            self._count("forward_fallbacks")
            reason = "fallback"
        else:
            reason = decision.reason
        new_tokens = len(tokens) - self.engine.local_match(tokens, self._namespace(msg.tenant))
        kv_pull = self._start_pull(msg, decision, tokens)
        if kv_pull is not None:
            new_tokens = len(tokens) - decision.pull_tokens
        job = _Job(
            msg=msg,
            reply_to=envelope,
            tokens=tokens,
            received_at=received,
            route_reason=reason,
            route_path=path,
            attempt=attempt,
            predicted_s=self._predict_s(max(new_tokens, 1), msg.params.max_tokens),
            client=client,
            scope=scope,
            kv_pull=kv_pull,
            pulled_from=decision.pull_from if kv_pull is not None else None,
        )
        if not self._enqueue(job) and kv_pull is not None:
            kv_pull.cancel()
            return False
        return True

    def _start_pull(
        self, msg: P.Generate, decision: Decision, tokens: list[int]
    ) -> asyncio.Task[KvState] | None:
        """Start pulling the prefix a "shipped" decision names, while the job queues."""
        if decision.pull_from is None:
            return None
        peer = self.peers.get(decision.pull_from)
        dealer = self._dealer_for(peer) if peer else None
        if peer is None or dealer is None:
            return None
        return asyncio.create_task(
            self.kv.fetch(
                dealer,
                peer.node_id,
                peer.link_delay_s or DEFAULT_LINK_DELAY_S,
                msg.tenant,
                tokens[: decision.pull_tokens],
                msg.deadline,
                msg.request_id,
            )
        )

    async def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread: between two steps of the running request,
        or in the engine's executor when it runs none."""
        fut = self.engine.call_between_steps(fn)
        if fut is None:
            return await self.loop.run_in_executor(self._executor, fn)
        return await asyncio.wrap_future(fut)

    def _namespace(self, tenant: str) -> str:
        """The cache namespace of a tenant: its own, or the one the tenant_shared share."""
        return tenant_namespace(tenant, self._shared_tenants)

    def _route(self, msg: P.Generate, tokens: list[int]) -> Decision:
        t0 = time.perf_counter()
        ns = self._namespace(msg.tenant)
        hasher = self.engine.hasher(ns)
        ids = hasher.block_ids(tokens)
        bs = hasher.block_size
        local_match = self.engine.local_match(tokens, ns)
        st = self.engine.stats
        prefill = st.prefill_s_per_token or self._peer_median(
            "prefill_s_per_token", DEFAULT_PREFILL_S_PER_TOKEN
        )
        service = st.service_s or self._peer_median("service_s", DEFAULT_SERVICE_S)
        cands = [
            Candidate(
                node_id=self.node_id,
                is_local=True,
                matched_tokens=local_match,
                queue_depth=self.queue_depth(),
                link_delay_s=0.0,
                prefill_s_per_token=prefill,
                service_s=service,
                wait_s=self.backlog_s(),
            )
        ]
        ship = self.routing.ship
        for peer in self.peers.alive():
            link = peer.link_delay_s or DEFAULT_LINK_DELAY_S
            cands.append(
                Candidate(
                    node_id=peer.node_id,
                    is_local=False,
                    matched_tokens=peer.match_blocks(ids) * bs,
                    queue_depth=peer.queue_depth + peer.inflight,
                    link_delay_s=link,
                    prefill_s_per_token=peer.prefill_s_per_token or prefill,
                    service_s=peer.service_s or service,
                    wait_s=peer.backlog_s + self._unreported_forwards_s(peer),
                    ship_s_per_token=self.kv.costs.ship_s_per_token(peer.node_id) if ship else None,
                    # The round trip, and the holder's pause until its next decode step.
                    ship_fixed_s=2 * link + DEFAULT_DECODE_S_PER_TOKEN,
                )
            )
        head = (
            ids[min(len(ids), max(1, self.config.routing.hash_prefix_tokens // bs)) - 1]
            if ids
            else hash(tuple(tokens[:bs])) & (2**64 - 1)
        )
        req = RouteRequest(
            prompt_tokens=len(tokens), hops=msg.hops, head_key=head, block_ids=ids, block_size=bs
        )
        decision = decide(req, cands, self.routing, self.policy_state)
        self._count(f"route_{decision.reason}")
        self._last_route = {c.node_id: c for c in cands}
        self.log.info(
            "route.decided",
            request_id=msg.request_id,
            policy=self.routing.policy,
            prompt_tokens=len(tokens),
            local_match=local_match,
            candidates={
                c.node_id: {"match": c.matched_tokens, "queue": c.queue_depth} for c in cands
            },
            decide_us=round((time.perf_counter() - t0) * 1e6, 1),
            **decision.log_fields(),
        )
        return decision

    async def _forward(
        self,
        envelope: list[bytes],
        msg: P.Generate,
        decision: Decision,
        tokens: list[int],
        scope: bytes,
    ) -> str:
        """Relay the request through a peer: "done", or "none"/"partial" to fall back."""
        peer = self.peers.get(decision.target)
        dealer = self._dealer_for(peer) if peer else None
        rid = msg.request_id
        # A fresh id on the wire for every forward: ids are per caller, and a late reply
        # to an abandoned forward must never answer a later one of the same id. The
        # caller's id as its prefix keeps it traceable in the peer's logs.
        wid = f"{rid[: P.MAX_ID_CHARS - 17]}~{os.urandom(8).hex()}"
        fwd_msg = msgspec.structs.replace(
            msg, request_id=wid, hops=msg.hops + 1, origin=self.node_id, progress=True
        )
        if dealer is None or peer is None or not self._send(dealer, [], fwd_msg):
            self.log.warning(
                "request.fallback", request_id=rid, target=decision.target, why="peer not connected"
            )
            return "none"
        target = self._last_route.get(peer.node_id)
        new_tokens = len(tokens) - (target.matched_tokens if target else 0)
        fwd = self._forwards[wid] = _Forward(
            target=peer.node_id,
            sent_at=time.monotonic(),
            cost_s=self._predict_s(max(new_tokens, 1), msg.params.max_tokens),
            request_id=rid,
            scope=scope,
        )
        peer.inflight += 1
        self._count("forwards")
        self.log.info(
            "request.forwarded",
            request_id=rid,
            wire_id=wid,
            target=peer.node_id,
            reason=decision.reason,
        )
        relayed = False
        timeout = gap = self.config.routing.forward_timeout_s
        try:
            while True:
                try:
                    reply = await asyncio.wait_for(
                        fwd.replies.get(), self._forward_wait_s(msg, gap)
                    )
                except TimeoutError:
                    reply, why = _FALLBACK, f"no reply for {gap:g}s"
                else:
                    why = "peer failed"
                if isinstance(reply, P.Progress):
                    # The peer holds the request (queued or running): a long answer is
                    # no failure, so wait while its keep-alives come and it stays alive.
                    gap = max(timeout, PROGRESS_MISSES * reply.interval_s)
                    continue
                if _expired(msg) and (reply is _FALLBACK or isinstance(reply, P.Error)):
                    # Too late to start over here: answer once, with the peer's own
                    # deadline error when it sent one, and stop the peer's work.
                    if isinstance(reply, P.Error) and reply.code == P.DEADLINE_EXCEEDED:
                        self._send(self.serve, envelope, reply)
                        self.log.info("request.deadline_relayed", request_id=rid, peer=peer.node_id)
                    else:
                        self._send(dealer, [], P.Cancel(request_id=wid))
                        self._deadline_error(envelope, rid, f"deadline passed at {peer.node_id}")
                    return "done"
                if fwd.cancelled and (reply is _FALLBACK or isinstance(reply, P.Error)):
                    return "done"  # cancelled by its caller: nothing to serve here
                if reply is _FALLBACK or isinstance(reply, P.Error):
                    detail = reply.message if isinstance(reply, P.Error) else why
                    self.log.warning(
                        "request.fallback",
                        request_id=rid,
                        target=peer.node_id,
                        why=detail,
                        partial=relayed,
                    )
                    self._send(dealer, [], P.Cancel(request_id=wid))
                    return "partial" if relayed else "none"
                if isinstance(reply, P.Chunk):
                    relayed = True
                    self._send(self.serve, envelope, reply)
                elif isinstance(reply, P.Done):
                    self._check_served_by(reply, peer.node_id)
                    reply.route_reason = decision.reason
                    reply.route_path = [self.node_id, reply.served_by]
                    self._send(self.serve, envelope, reply)
                    self._count("requests_forwarded_ok")
                    self.metrics.answered(reply, local=False)
                    return "done"
        finally:
            self._forwards.pop(wid, None)
            peer.inflight = max(0, peer.inflight - 1)

    def _check_served_by(self, done: P.Done, target: str) -> None:
        """A forwarded answer was served by the peer it went to, or by a node we know
        that the peer says it relayed it to (max_hops > 1). Any other claim is logged
        and replaced by the peer's id: the peer answers for what it sent."""
        claimed = done.served_by
        relayed = (
            done.route_path == [target, claimed]
            and claimed != self.node_id
            and self.peers.get(claimed) is not None
        )
        if claimed == target or relayed:
            return
        self._count("forwards_served_by_mismatch")
        self.log.warning(
            "request.served_by_mismatch",
            request_id=done.request_id,
            target=target,
            claimed=claimed,
            route_path=done.route_path,
        )
        done.served_by = target

    def _forward_wait_s(self, msg: P.Generate, wait: float) -> float:
        """How long to wait for a peer's next reply: ``wait``, cut short by the request's
        deadline (plus a grace for the peer's own deadline error)."""
        if msg.deadline is not None:
            wait = min(wait, max(msg.deadline - time.time(), 0.0) + DEADLINE_GRACE_S)
        return wait

    def _deadline_error(self, envelope: list[bytes], rid: str, why: str) -> None:
        self._count("requests_deadline")
        self.log.warning("request.failed", request_id=rid, code=P.DEADLINE_EXCEEDED, error=why)
        self._reply_error(envelope, rid, P.DEADLINE_EXCEEDED, why)

    def _cancel_forwards(self, scope: bytes, rid: str) -> None:
        """A caller cancels a request this node forwarded: the Cancel follows it to the
        peer (under the forward's wire id), whose cancelled Done is then relayed."""
        for wid, fwd in self._forwards.items():
            if fwd.scope == scope and fwd.request_id == rid:
                fwd.cancelled = True
                peer = self.peers.get(fwd.target)
                dealer = self._dealer_for(peer) if peer else None
                if dealer is not None:
                    self._send(dealer, [], P.Cancel(request_id=wid))
                    self.log.info("request.cancel_forwarded", request_id=rid, target=fwd.target)

    def _fail_forwards_to(self, node_id: str) -> None:
        for fwd in self._forwards.values():
            if fwd.target == node_id:
                fwd.replies.put_nowait(_FALLBACK)
        self.kv.fail_pulls(node_id)

    def queue_depth(self) -> int:
        return self._queue.qsize() + (1 if self._running else 0)

    def _peer_median(self, field: str, default: float) -> float:
        """A rate this node has not measured yet: peers on like hardware are a better
        guess than a constant, but only the median of two or more of them, kept within
        BORROW_FACTOR of ``default``; with fewer, ``default``."""
        values = sorted(v for p in self.peers.alive() if (v := getattr(p, field)) > 0)
        if len(values) < 2:
            return default
        median = values[len(values) // 2]
        return min(max(median, default / BORROW_FACTOR), default * BORROW_FACTOR)

    def _predict_s(self, new_tokens: int, max_tokens: int) -> float:
        return self.engine.stats.predict_s(
            new_tokens, max_tokens, DEFAULT_PREFILL_S_PER_TOKEN, DEFAULT_DECODE_S_PER_TOKEN
        )

    def backlog_s(self) -> float:
        """Predicted seconds until a request arriving now would start here."""
        running = 0.0
        if self._running is not None:
            elapsed = time.monotonic() - self._running_since
            running = max(self._running.predicted_s - elapsed, 0.0)
        return self._queued_s + running

    def _unreported_forwards_s(self, peer: PeerEstimate) -> float:
        """Work we sent to ``peer`` since its last heartbeat, which cannot include it yet."""
        heard = peer.last_heard or 0.0
        return sum(
            f.cost_s
            for f in self._forwards.values()
            if f.target == peer.node_id and f.sent_at > heard
        )

    def _enqueue(self, job: _Job) -> bool:
        """Queue a job for the worker; False (and `overloaded` sent) when the queue is full."""
        rid = job.msg.request_id
        try:
            self._queue.put_nowait(job)
            self._queued_s += job.predicted_s
            self._load_changed = True
        except asyncio.QueueFull:
            self._count("requests_overloaded")
            self.log.warning("request.failed", request_id=rid, code=P.OVERLOADED)
            self._reply_error(
                job.reply_to,
                rid,
                P.OVERLOADED,
                f"node {self.node_id} queue is full ({self.config.max_queue})",
            )
            return False
        self._jobs[job.scope, rid] = job
        return True

    async def _worker_loop(self) -> None:
        while True:
            job = await self._queue.get()
            self._queued_s = max(self._queued_s - job.predicted_s, 0.0)
            self._running, self._running_since = job, time.monotonic()
            self._load_changed = True
            try:
                await self._serve_job(job)
            except Exception as exc:
                self.log.exception("request.failed", request_id=job.msg.request_id, error=repr(exc))
                self._reply_error(job.reply_to, job.msg.request_id, P.INTERNAL, repr(exc))
            finally:
                self._flush_deltas()  # also after failures: a prefill may have cached
                self._running = None
                self._load_changed = True
                key = (job.scope, job.msg.request_id)
                self._jobs.pop(key, None)
                self._ids_inflight.discard(key)
                self._progress.pop(key, None)
                self._release(job.client)

    async def _serve_job(self, job: _Job) -> None:
        msg, rid = job.msg, job.msg.request_id
        if _expired(msg) or job.cancelled:
            if job.kv_pull is not None:
                job.kv_pull.cancel()
            if not job.cancelled:
                self._deadline_error(
                    job.reply_to,
                    rid,
                    f"deadline passed while the request was queued on {self.node_id}",
                )
            return
        if job.kv_pull is not None:
            await self._finish_pull(job)
        started = time.time()
        try:
            result = await self.loop.run_in_executor(self._executor, self._generate_blocking, job)
        except EngineError as exc:
            self._count("requests_failed")
            self.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            self._reply_error(job.reply_to, rid, exc.code, exc.message)
            return
        # Publish what this request cached before answering, so peers can know of it
        # by the time the client sends its next request.
        self._flush_deltas()
        if result.finish_reason == "cancelled" and not job.cancelled and _expired(msg):
            # Stopped by the deadline, not by a Cancel: an error, like a queued expiry.
            self._deadline_error(
                job.reply_to,
                rid,
                f"deadline passed on {self.node_id} after {result.completion_tokens} tokens",
            )
            return
        if result.evicted_tokens:
            self.log.info("cache.evicted", request_id=rid, tokens=result.evicted_tokens)
        done = P.Done(
            request_id=rid,
            text=result.text,
            finish_reason=result.finish_reason,
            served_by=self.node_id,
            hops=msg.hops,
            route_reason=job.route_reason,
            route_path=job.route_path,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_s=round(started - job.received_at + result.ttft_s, 6),
            prefill_s=round(result.prefill_s, 6),
            decode_tps=round(result.decode_tps, 2),
            queue_s=round(started - job.received_at, 6),
            shipped_tokens=job.shipped_tokens,
            pulled_from=job.pulled_from if job.shipped_tokens else None,
        )
        self._send(self.serve, job.reply_to, done)
        self._count("requests_served")
        self.metrics.answered(done, local=True, evicted_tokens=result.evicted_tokens)
        self._count("prompt_tokens", result.prompt_tokens)
        self._count("cached_tokens", result.cached_tokens)
        self.log.info(
            "request.completed",
            request_id=rid,
            served_by=self.node_id,
            route_reason=job.route_reason,
            hops=msg.hops,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_s=done.ttft_s,
            queue_s=done.queue_s,
            finish=result.finish_reason,
        )

    async def _finish_pull(self, job: _Job) -> None:
        """Wait for the job's pull (it has its own deadline); on failure the request is
        prefilled here like any other, reason "fallback"."""
        assert job.kv_pull is not None
        try:
            job.kv_state = await job.kv_pull
        except Exception as exc:  # KvFetchFailed, or a bug: either way, prefill here
            self._count("kv_fetch_failed")
            self.log.warning(
                "request.fallback",
                request_id=job.msg.request_id,
                target=job.pulled_from,
                why=f"KV pull failed: {exc}",
            )
            job.route_reason = "fallback"

    def _generate_blocking(self, job: _Job) -> GenerationResult:
        """Runs in the engine thread; chunks hop back to the loop thread to be sent."""
        msg = job.msg
        deadline = msg.deadline

        def on_text(text: str) -> None:
            if msg.stream:
                self.loop.call_soon_threadsafe(self._send_chunk, job, text)

        def should_stop() -> bool:
            return job.cancelled or (deadline is not None and time.time() > deadline)

        # Serving from the import on: a peer's KV fetch waits for a step, not for this.
        with self.engine.serving():
            if job.kv_state is not None:
                job.shipped_tokens = self.kv.import_state(job.kv_state, msg.tenant, msg.request_id)
                job.kv_state = None
                if not job.shipped_tokens:
                    job.route_reason = "fallback"
            return self.engine.generate(
                tokens=job.tokens,
                params=msg.params,
                namespace=self._namespace(msg.tenant),
                on_text=on_text,
                should_stop=should_stop,
            )

    def _send_progress(self, key: tuple[bytes, str], envelope: list[bytes]) -> None:
        rid = key[1]
        state = "accepted"  # being tokenized and routed
        if (r := self._running) is not None and (r.scope, r.msg.request_id) == key:
            state = "running"
        elif key in self._jobs:
            state = "queued"
        self._send(
            self.serve,
            envelope,
            P.Progress(
                request_id=rid,
                node_id=self.node_id,
                state=state,
                queue_depth=self.queue_depth(),
                interval_s=self.config.routing.progress_interval_s,
            ),
        )

    async def _progress_loop(self) -> None:
        """Keep-alives for the requests whose sender asked for them (forwarders): a
        request queued or running here for long is alive, not lost."""
        while True:
            await asyncio.sleep(self.config.routing.progress_interval_s)
            for key, envelope in list(self._progress.items()):
                self._send_progress(key, envelope)

    def _send_chunk(self, job: _Job, text: str) -> None:
        self._send(
            self.serve,
            job.reply_to,
            P.Chunk(
                request_id=job.msg.request_id, index=job.chunks, text=text, attempt=job.attempt
            ),
        )
        job.chunks += 1

    # ---- gossip ----------------------------------------------------------

    def _publish_cache_events(self) -> None:
        ev = self.engine.drain_events()
        if ev:
            self.advert.apply(ev.added, ev.removed)

    def _flush_deltas(self) -> None:
        self._publish_cache_events()
        drop = self.faults.current.drop_deltas
        while (batch := self.advert.flush()) is not None:
            if drop and self._fault_rng.random() < drop:
                self._count("deltas_dropped_on_purpose")
                continue
            self._send(
                self.pub,
                [],
                P.CacheDelta(
                    node_id=self.node_id,
                    epoch=self.epoch,
                    seq=batch.seq,
                    added=list(batch.added),
                    removed=list(batch.removed),
                ),
            )

    def _heartbeat(self) -> P.Heartbeat:
        st = self.engine.stats
        return P.Heartbeat(
            node_id=self.node_id,
            epoch=self.epoch,
            seq=self.advert.seq,
            sent_at=time.time(),
            serve_addr=self.serve_addr,
            gossip_addr=self.gossip_addr,
            queue_depth=self.queue_depth(),
            busy_slots=self.engine.busy_slots(),
            n_slots=self.engine.n_slots,
            n_blocks=self.advert.n_blocks,
            digest=self.advert.digest,
            prefill_s_per_token=st.prefill_s_per_token,
            service_s=st.service_s,
            backlog_s=round(self.backlog_s(), 4),
            block_size=self.engine.block_size,
            model_fingerprint=self.engine.fingerprint.hex(),
            peers=[
                P.PeerInfo(
                    node_id=p.node_id,
                    serve_addr=p.serve_addr,
                    gossip_addr=p.gossip_addr,
                    public_key=self._peer_keys.get(p.node_id),
                )
                for p in self.peers.alive()
            ],
            public_key=self.keys.public.decode() if self.keys else None,
        )

    async def _gossip_loop(self) -> None:
        g = self.config.gossip
        next_hb = 0.0
        while True:
            self._flush_deltas()
            now = time.monotonic()
            if now >= next_hb or self._load_changed:
                # Load changes go out at the next tick, not the next heartbeat period:
                # routing on a stale queue sends work to a node that is already free.
                self._load_changed = False
                self._send(self.pub, [], self._heartbeat())
            if now >= next_hb:
                next_hb = now + g.heartbeat_interval_s
                self._tick_peers(now)
                self._poll_faults()
            await asyncio.sleep(g.delta_interval_s)

    def _tick_peers(self, now: float) -> None:
        before = {p.node_id: p for p in self.peers.all()}
        for event in self.peers.tick(now):
            if event.kind == "forgotten":  # tick removed it; the sockets go here
                self._forget_peer(
                    before[event.node_id], f"silent over {self.peers.forget_after_s}s"
                )
                continue
            self.log.warning(f"peer.{event.kind}", peer=event.node_id)
            if event.kind in ("suspect", "dead"):
                self._fail_forwards_to(event.node_id)

    async def _sub_loop(self) -> None:
        while True:
            payload = await self.sub.recv()
            try:
                msg = P.decode(payload)
                if self._cut_off(getattr(msg, "node_id", None)):
                    continue
                if isinstance(msg, P.Heartbeat):
                    self._on_heartbeat(msg)
                elif isinstance(msg, P.CacheDelta):
                    self._on_delta(msg)
                else:
                    self.log.warning("frame.unexpected", socket="sub", type=type(msg).__name__)
            except P.ProtocolError as exc:
                self._count("frames_malformed")
                self.log.warning("frame.malformed", socket="sub", code=exc.code, error=exc.message)
            except Exception as exc:
                self.log.exception("gossip.handler_failed", error=repr(exc))

    def _on_heartbeat(self, hb: P.Heartbeat) -> None:
        if hb.node_id == self.node_id:
            return
        now = time.monotonic()
        if (
            hb.model_fingerprint != self.engine.fingerprint.hex()
            or hb.block_size != self.engine.block_size
        ):
            self._count("peers_incompatible")
            return  # another model: its ids can never match ours
        if self._bad_peer_address(hb.node_id, hb.serve_addr, hb.gossip_addr):
            return
        if not self._room_for(hb.node_id):
            return
        self.metrics.heartbeat(hb.node_id, hb.sent_at, hb.seq)
        if self.peers.upsert(hb.node_id, hb.serve_addr, hb.gossip_addr, now):
            self.log.info("peer.joined", peer=hb.node_id, serve=hb.serve_addr)
        self._connect_peer(hb.serve_addr, hb.gossip_addr, hb.public_key, hb.node_id)
        for info in hb.peers:
            if (
                info.node_id != self.node_id
                and self.peers.get(info.node_id) is None
                and not self._bad_peer_address(info.node_id, info.serve_addr, info.gossip_addr)
                and self._room_for(info.node_id)
            ):
                self.peers.upsert(info.node_id, info.serve_addr, info.gossip_addr, now, heard=False)
                self._connect_peer(info.serve_addr, info.gossip_addr, info.public_key, info.node_id)
        peer = self.peers.get(hb.node_id)
        assert peer is not None
        action = peer.on_heartbeat(
            epoch=hb.epoch,
            seq=hb.seq,
            digest=hb.digest,
            n_blocks=hb.n_blocks,
            now=now,
            queue_depth=hb.queue_depth,
            busy_slots=hb.busy_slots,
            n_slots=hb.n_slots,
            prefill_s_per_token=hb.prefill_s_per_token,
            service_s=hb.service_s,
            backlog_s=hb.backlog_s,
        )
        self._maybe_resync(peer, action, now)

    def _on_delta(self, d: P.CacheDelta) -> None:
        peer = self.peers.get(d.node_id)
        if peer is None or d.node_id == self.node_id:
            return
        now = time.monotonic()
        action = peer.on_delta(d.epoch, d.seq, d.added, d.removed, now)
        self._maybe_resync(peer, action, now)

    def _maybe_resync(self, peer: PeerEstimate, action: Any, now: float) -> None:
        if action.kind != NEED_SNAPSHOT or not peer.should_request_snapshot(now):
            return
        dealer = self._dealer_for(peer)
        rid = os.urandom(8).hex()
        if dealer is None or not self._send(
            dealer, [], P.SnapshotRequest(request_id=rid, node_id=self.node_id)
        ):
            return
        peer.begin_snapshot(rid, now)
        self._count("snapshots_requested")
        log = self.log.info if action.reason in ("new_peer", "epoch") else self.log.warning
        log(
            "gossip.gap" if action.reason in ("gap", "digest") else "peer.resync",
            peer=peer.node_id,
            reason=action.reason,
            seq=peer.seq,
        )

    def _send_snapshot(self, envelope: list[bytes], req: P.SnapshotRequest) -> None:
        self._flush_deltas()  # the snapshot must describe exactly the published seq
        parts = self.advert.snapshot_parts(P.SNAPSHOT_PART_BLOCKS)
        for part in parts:
            self._send(
                self.serve,
                envelope,
                P.Snapshot(
                    request_id=req.request_id,
                    node_id=self.node_id,
                    epoch=self.epoch,
                    seq=part.seq,
                    part=part.part,
                    parts=part.parts,
                    blocks=list(part.blocks),
                    digest=part.digest,
                    n_blocks=part.n_blocks,
                ),
            )
        self._count("snapshots_served")

    # ---- peer replies (DEALER) ---------------------------------------------

    async def _dealer_loop(self, dealer: zmq.asyncio.Socket, serve_addr: str) -> None:
        while True:
            payload = await dealer.recv()
            if self._partition and self._cut_off(self._peer_at(serve_addr)):
                continue
            try:
                self._on_peer_reply(P.decode(payload))
            except P.ProtocolError as exc:
                self._count("frames_malformed")
                self.log.warning(
                    "frame.malformed", socket="dealer", code=exc.code, error=exc.message
                )
            except Exception as exc:
                self.log.exception("dealer.handler_failed", error=repr(exc))

    def _on_peer_reply(self, msg: P.Message) -> None:
        if isinstance(msg, P.KvPart | P.Error) and self.kv.on_reply(msg):
            return  # an answer to one of our KV fetches (whatever its error code)
        if isinstance(msg, P.Chunk | P.Done | P.Error | P.Progress):
            fwd = self._forwards.get(msg.request_id or "")
            if fwd is not None:
                msg.request_id = fwd.request_id  # relayed under the caller's own id
                fwd.replies.put_nowait(msg)
        elif isinstance(msg, P.Snapshot):
            peer = self.peers.get(msg.node_id)
            if peer is None:
                return
            now = time.monotonic()
            action = peer.on_snapshot_part(
                msg.request_id,
                msg.epoch,
                msg.seq,
                msg.part,
                msg.parts,
                msg.blocks,
                msg.digest,
                msg.n_blocks,
                now,
            )
            if peer.synced and msg.part == msg.parts - 1:
                self.log.info(
                    "gossip.snapshot", peer=peer.node_id, seq=peer.seq, n_blocks=peer.n_blocks
                )
            self._maybe_resync(peer, action, now)
        elif isinstance(msg, P.Pong):
            peer = self.peers.get(msg.node_id)
            if peer is not None:
                peer.observe_rtt(time.time() - msg.sent_at)

    def _bad_peer_address(self, node_id: str, serve: str, gossip: str) -> bool:
        """Whether a peer's advertised addresses are unusable (then it is not learned:
        zmq would refuse to connect to them anyway)."""
        why = check_address(serve, bind=False) or check_address(gossip, bind=False)
        if why is None:
            return False
        self._count("peers_bad_address")
        self.log.warning("peer.bad_address", peer=node_id, error=why)
        return True

    def _room_for(self, node_id: str) -> bool:
        """Whether a peer may be kept: a known one always, a new one while the table is
        below gossip.max_peers. Refusals are counted; logged at most every 10 s, since
        every heartbeat that lists the refused peers would repeat them."""
        if node_id in self.peers or len(self.peers) < self.config.gossip.max_peers:
            return True
        # Full: a dead peer gives way (churn of short-lived names must not lock us).
        if (victim := self.peers.longest_dead()) is not None:
            peer = self.peers.get(victim)
            assert peer is not None
            self._forget_peer(peer, "table full")
            return True
        self._count("peers_refused_full")
        now = time.monotonic()
        if now - self._peer_refused_logged_at >= 10.0:
            self._peer_refused_logged_at = now
            self.log.warning(
                "peer.refused",
                peer=node_id,
                max_peers=self.config.gossip.max_peers,
                refused_so_far=self.counters["peers_refused_full"],
            )
        return False

    def _learn_of(self, info: P.PeerInfo) -> None:
        """A node we have not heard of pinged us: subscribe to it so its heartbeat comes."""
        if info.node_id == self.node_id or self.peers.get(info.node_id) is not None:
            return
        if self._bad_peer_address(info.node_id, info.serve_addr, info.gossip_addr):
            return
        if not self._room_for(info.node_id):
            return
        self.peers.upsert(
            info.node_id, info.serve_addr, info.gossip_addr, time.monotonic(), heard=False
        )
        self._connect_peer(info.serve_addr, info.gossip_addr, info.public_key, info.node_id)
        self.log.info("peer.announced", peer=info.node_id, serve=info.serve_addr)

    async def _ping_loop(self) -> None:
        me = P.PeerInfo(
            node_id=self.node_id,
            serve_addr=self.serve_addr,
            gossip_addr=self.gossip_addr,
            public_key=self.keys.public.decode() if self.keys else None,
        )
        while True:
            await asyncio.sleep(self.config.gossip.ping_interval_s)
            for peer in self.peers.alive():
                dealer = self._dealer_for(peer)
                if dealer is not None:
                    ping = P.Ping(request_id="ping", sent_at=time.time(), sender=me)
                    self._send(dealer, [], ping)

    # ---- status ------------------------------------------------------------

    def _status(self, rid: str) -> P.Status:
        now = time.monotonic()
        return P.Status(
            request_id=rid,
            node_id=self.node_id,
            epoch=self.epoch,
            seq=self.advert.seq,
            n_blocks=self.advert.n_blocks,
            queue_depth=self.queue_depth(),
            busy_slots=self.engine.busy_slots(),
            n_slots=self.engine.n_slots,
            peers=[
                P.PeerStatus(
                    node_id=p.node_id,
                    state=p.state.value if isinstance(p.state, PeerState) else str(p.state),
                    epoch=p.epoch or 0,
                    seq=p.seq,
                    n_blocks=p.n_blocks,
                    estimate_age_s=round(now - p.last_heard, 3) if p.last_heard else -1.0,
                    queue_depth=p.queue_depth,
                    link_delay_s=p.link_delay_s,
                )
                for p in self.peers.all()
            ],
            counters=dict(self.counters),
            inflight=self._inflight,
            inflight_clients=len(self._inflight_by_client),
            faults=self.faults.current,
        )


def _expired(msg: P.Generate) -> bool:
    """Whether the request's absolute deadline (unix time, carried across hops) passed."""
    return msg.deadline is not None and time.time() > msg.deadline


def run_node(config: NodeConfig, on_ready: Callable[[Node], None] | None = None) -> None:
    """Run a node in this process until SIGINT/SIGTERM."""
    import signal

    async def main() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        if on_ready:
            on_ready(node)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
