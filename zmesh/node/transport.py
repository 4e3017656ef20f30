"""A node's sockets: the serve ROUTER, the gossip PUB and SUB, one DEALER per peer.

Owns the ZeroMQ context, the CURVE key pair and allowlist, connecting to and
dropping peers, the DEALER reader tasks, and every send: never blocking, through the
fault injector (`zmesh.faults.FaultInjector`) while a fault is on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, cast

import zmq
import zmq.asyncio

from zmesh import protocol as P
from zmesh.faults import FaultControl, FaultInjector
from zmesh.node.context import NodeContext
from zmesh.peers import PeerEstimate
from zmesh.security import (
    DOMAIN_GOSSIP,
    DOMAIN_SERVE,
    AuthorizedKey,
    KeyPair,
    client_socket,
    load_authorized,
    load_keypair,
    load_public_key,
    server_socket,
)


class Transport:
    def __init__(self, ctx: NodeContext, faults: FaultControl) -> None:
        self._c = ctx
        config = ctx.config
        self.serve_addr = config.advertise_serve or config.serve_addr
        self.gossip_addr = config.advertise_gossip or config.gossip_addr
        self.zctx = zmq.asyncio.Context()
        self.faults = FaultInjector(faults, self.send_frames, ctx.count, ctx.log)
        self.dealers: dict[str, zmq.asyncio.Socket] = {}  # by peer serve address
        self._dealer_tasks: dict[str, asyncio.Task[None]] = {}  # their reader tasks
        self._dealer_addrs: dict[int, str] = {}  # id(dealer) -> the peer's serve address
        self._subscribed: set[str] = set()
        # Seeds' addresses stay connected when their peer is forgotten: a seed that
        # comes back is heard again, and a mesh cut apart finds itself through them.
        self.seed_addrs = frozenset(a for sd in config.seeds for a in (sd.serve, sd.gossip))
        # CurveZMQ (config [security]): our key pair, the allowlist, peers' keys.
        sec = config.security
        key_file = sec.secret_key_file
        self.keys: KeyPair | None = load_keypair(key_file) if key_file else None
        self.authorized: dict[bytes, AuthorizedKey] = {}
        if self.keys is not None:
            self.authorized = load_authorized(sec.authorized_dir, sec.authorized_keys)
            self.authorized.setdefault(
                self.keys.public, AuthorizedKey(public=self.keys.public, name=ctx.node_id)
            )
        self.peer_keys: dict[str, str] = {}  # node id -> its public key (Z85)
        self._on_reply: Callable[[P.Message], None] = lambda msg: None

    # ---- sockets -----------------------------------------------------------

    def bind(self, on_reply: Callable[[P.Message], None]) -> None:
        """Bind serve and gossip, open the SUB, connect the seeds; ``on_reply`` gets
        every message a peer sends back on a DEALER."""
        config = self._c.config
        self._on_reply = on_reply
        self.serve = self._socket(zmq.ROUTER)
        if self.keys is not None:
            server_socket(self.serve, self.keys, DOMAIN_SERVE)
        self.serve.bind(config.serve_addr)
        self.pub = self._socket(zmq.PUB)
        if self.keys is not None:
            server_socket(self.pub, self.keys, DOMAIN_GOSSIP)
        self.pub.bind(config.gossip_addr)
        self.sub = self._socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        for seed in config.seeds:
            key = load_public_key(seed.public_key).decode() if seed.public_key else None
            self.connect_peer(seed.serve, seed.gossip, key)

    def tasks(self) -> list[asyncio.Task[None]]:
        return list(self._dealer_tasks.values())

    def close(self) -> None:
        self.zctx.destroy(linger=0)

    def _socket(self, kind: int) -> zmq.asyncio.Socket:
        s = self.zctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        # ZMTP pings: a TCP connection to a peer that vanished without a FIN (partition,
        # container moved to a new IP) is dropped within seconds and reconnected, with
        # a fresh DNS lookup, instead of stalling until the kernel gives up (minutes).
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3000)
        return s

    def connect_peer(
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
                if serve_addr not in self.dealers:
                    self._c.count("peers_key_unknown")
                    self._c.log.warning(
                        "auth.peer_key_unknown",
                        peer=node_id,
                        serve=serve_addr,
                        key=public_key,
                    )
                return
            if node_id is not None:
                self.peer_keys[node_id] = public_key  # type: ignore[assignment]
        if serve_addr not in self.dealers:
            d = self._socket(zmq.DEALER)
            d.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not connected
            d.setsockopt(zmq.SNDHWM, 1000)
            if self.keys is not None and server_key is not None:
                client_socket(d, self.keys, server_key)
            d.connect(serve_addr)
            self.dealers[serve_addr] = d
            self._dealer_addrs[id(d)] = serve_addr
            self._dealer_tasks[serve_addr] = asyncio.create_task(
                self._dealer_loop(d, serve_addr), name=f"dealer {serve_addr}"
            )
        if gossip_addr not in self._subscribed and gossip_addr != self.gossip_addr:
            if self.keys is not None and server_key is not None:
                client_socket(self.sub, self.keys, server_key)  # applies to this connect
            self.sub.connect(gossip_addr)
            self._subscribed.add(gossip_addr)

    def disconnect_peer(self, peer: PeerEstimate) -> None:
        """Close a forgotten peer's DEALER and stop subscribing to it, unless a seed or
        another known peer uses the same address."""
        self.peer_keys.pop(peer.node_id, None)
        self.faults.forget(peer.node_id)
        in_use = self.seed_addrs | {
            a for p in self._c.peers.all() for a in (p.serve_addr, p.gossip_addr)
        }
        if peer.serve_addr not in in_use and (d := self.dealers.pop(peer.serve_addr, None)):
            self._dealer_tasks.pop(peer.serve_addr).cancel()
            self._dealer_addrs.pop(id(d), None)
            d.close(linger=0)
        if peer.gossip_addr not in in_use and peer.gossip_addr in self._subscribed:
            self._subscribed.discard(peer.gossip_addr)
            with contextlib.suppress(zmq.ZMQError):  # never connected (zmq says ENOENT)
                self.sub.disconnect(peer.gossip_addr)

    def dealer_for(self, peer: PeerEstimate) -> zmq.asyncio.Socket | None:
        return self.dealers.get(peer.serve_addr)

    async def _dealer_loop(self, dealer: zmq.asyncio.Socket, serve_addr: str) -> None:
        """Replies a peer sends back on our DEALER: forwards', snapshots, pongs, KV."""
        log = self._c.log
        while True:
            payload = await dealer.recv()
            if self.faults.partition and self.faults.cut_off(self.peer_at(serve_addr)):
                continue
            try:
                self._on_reply(P.decode(payload))
            except P.ProtocolError as exc:
                self._c.count("frames_malformed")
                log.warning("frame.malformed", socket="dealer", code=exc.code, error=exc.message)
            except Exception as exc:
                log.exception("dealer.handler_failed", error=repr(exc))

    # ---- sends -------------------------------------------------------------

    def send(self, sock: zmq.asyncio.Socket, envelope: list[bytes], msg: P.Message) -> bool:
        """Send without waiting; False when it cannot go out now (peer not connected)."""
        frames = [*envelope, P.encode(msg)]
        if self.faults.on and (peer := self._peer_of(sock, envelope)) is not None:
            return self.faults.send(sock, frames, peer)
        return self.send_frames(sock, frames)

    def send_frames(self, sock: zmq.asyncio.Socket, frames: list[bytes]) -> bool:
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
            self._c.log.warning("send.failed", error=str(exc))
        return False

    def reply(self, envelope: list[bytes], msg: P.Message) -> bool:
        """Send ``msg`` back to whoever is at ``envelope`` on the serve socket."""
        return self.send(self.serve, envelope, msg)

    def reply_error(self, envelope: list[bytes], rid: str | None, code: str, message: str) -> None:
        self.send(
            self.serve,
            envelope,
            P.Error(request_id=rid, code=code, message=message, node_id=self._c.node_id),
        )

    def deadline_error(self, envelope: list[bytes], rid: str, why: str) -> None:
        self._c.count("requests_deadline")
        self._c.log.warning("request.failed", request_id=rid, code=P.DEADLINE_EXCEEDED, error=why)
        self.reply_error(envelope, rid, P.DEADLINE_EXCEEDED, why)

    def _peer_of(self, sock: zmq.asyncio.Socket, envelope: list[bytes]) -> str | None:
        """The peer a send goes to: "" for gossip (every peer), None for a client."""
        if sock is self.pub:
            return ""
        if sock is self.serve:
            return self.faults.peer_idents.get(envelope[0]) if envelope else None
        addr = self._dealer_addrs.get(id(sock), "")
        return self.peer_at(addr) or addr

    def peer_at(self, serve_addr: str) -> str | None:
        return next((p.node_id for p in self._c.peers.all() if p.serve_addr == serve_addr), None)
