"""One DEALER to one node: its socket options, its monitor and its health (up, failed,
retrying, a CURVE refusal), and the per-request reply queues failover waits on."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any, cast

import zmq
import zmq.asyncio

from zmesh import protocol as P
from zmesh.client.errors import AuthenticationFailed
from zmesh.security import KeyPair, client_socket

_MONITOR_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

# ZMTP heartbeats on every client socket. libzmq's I/O thread answers PINGs whatever
# the node's Python is doing, so a node that is alive but busy keeps its connection,
# while one that is frozen (SIGSTOP) or whose host vanished without a FIN stops
# answering and the connection is dropped within IVL + TIMEOUT (about 2 s). A node
# that dies outright closes its sockets and is noticed at once.
HEARTBEAT_IVL_MS = 500
HEARTBEAT_TIMEOUT_MS = 1500
HEARTBEAT_TTL_MS = 10_000  # the node may drop us after this long without a sign of life


class Endpoint:
    """One DEALER to one node, its socket monitor and its health.

    The monitor drives failover: a dropped connection fails every request waiting on
    it at once (its replies would go to an identity the node's ROUTER no longer knows),
    and an endpoint whose connection failed stays `failed` (tried last) until libzmq's
    own reconnect attempts, which go on in the background, complete a handshake again.
    """

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        address: str,
        counters: Counter[str],
        keys: KeyPair | None = None,
        server_key: bytes | None = None,
    ) -> None:
        self.address = address
        self.counters = counters
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, P.MAX_FRAME_BYTES)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)
        self.curve = keys is not None and server_key is not None
        if keys is not None and server_key is not None:
            client_socket(self.sock, keys, server_key)
        self.monitor = self.sock.get_monitor_socket(_MONITOR_EVENTS)
        self.sock.connect(address)
        # request id -> queue of replies; None in the queue: the connection dropped.
        self.waiters: dict[str, asyncio.Queue[P.Message | None]] = {}
        self.up = False  # a handshake completed and the connection has not dropped since
        self.failed = False  # a request could not use it since it was last up
        self.retrying = False  # the last connect was refused; libzmq will try again
        self._connected = False
        self.auth_error: str | None = None
        self.tasks = [
            asyncio.create_task(self.read_loop()),
            asyncio.create_task(self.monitor_loop()),
        ]

    async def read_loop(self) -> None:
        while True:
            frame = await self.sock.recv()
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                continue  # nothing to route it to; the node logs its own side
            q = self.waiters.get(getattr(msg, "request_id", None) or "")
            if q is not None:
                q.put_nowait(msg)
            else:
                self.counters["late_replies"] += 1  # an abandoned attempt's: dropped

    async def monitor_loop(self) -> None:
        from zmq.utils.monitor import parse_monitor_message

        bad_handshake = (
            f"CURVE handshake with {self.address} failed: wrong server key, "
            "or the node runs without keys"
        )
        while True:
            kind = parse_monitor_message(await self.monitor.recv_multipart())["event"]
            if kind == zmq.EVENT_CONNECTED:
                self._connected, self.retrying = True, False
            elif kind == zmq.EVENT_CONNECT_RETRIED:
                self.retrying = True
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up, self.failed = True, False
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.curve and self._connected and not self.up:
                    self.auth_error = self.auth_error or bad_handshake
                self.up = self._connected = False
                for q in self.waiters.values():
                    q.put_nowait(None)
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self.auth_error = self.auth_error or (
                    f"{self.address} refused this client's key: "
                    "is its public key in the node's authorized_dir / authorized_keys?"
                )
            elif self.curve:  # HANDSHAKE_FAILED_PROTOCOL / _NO_DETAIL
                self.auth_error = self.auth_error or bad_handshake

    async def send(
        self, frame: bytes, rid: str, connect_timeout: float, patient: bool = True
    ) -> asyncio.Queue[P.Message | None] | None:
        """Send once connected and return the queue its replies arrive on; None if no
        connection came up in time (or, not `patient`, the node refused the connect)."""
        give_up = time.monotonic() + connect_timeout
        while True:
            # DONTWAIT: done at once, zmq.Again inside while not connected. Through the
            # asyncio socket (not a sync shadow), so the reader waiting on the same
            # socket is woken if the send consumed the edge of its zmq FD.
            fut = cast("asyncio.Future[Any]", self.sock.send(frame, flags=zmq.DONTWAIT))
            exc = fut.exception() if fut.done() else None
            if exc is None:
                # Registered with no await since the send: no reply can slip past, and
                # a drop seen from now on is this attempt's.
                q: asyncio.Queue[P.Message | None] = asyncio.Queue()
                self.waiters[rid] = q
                return q
            if not isinstance(exc, zmq.Again):
                raise exc
            if self.auth_error is not None:
                raise AuthenticationFailed(self.auth_error)
            if time.monotonic() >= give_up or (self.retrying and not patient):
                self.failed = True
                return None
            await asyncio.sleep(0.01)

    def cancel(self, rid: str) -> None:
        """Best effort: ask the node to stop working on a request nobody waits for."""
        if self.sock.closed:
            return
        fut = cast(
            "asyncio.Future[Any]",
            self.sock.send(P.encode(P.Cancel(request_id=rid)), flags=zmq.DONTWAIT),
        )
        if fut.done():
            fut.exception()  # zmq.Again when not connected: nothing to cancel there

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)
