"""Prometheus metrics of one node (prometheus-client), served on `metrics_port`.

Counters and the TTFT histogram are updated by the node's event loop as things
happen (`count`, `answered`, `heartbeat`). Gauges (queue depth, slots, per-peer
gossip lag and estimate age) are read at scrape time from a `StatusView` the node
makes *on its loop thread* (`zmesh.node.status`), so a scrape never walks a peer table
the loop is changing. This module knows nothing else of the node: the view is its
whole input, and it is declared here so that the node imports metrics, never the
other way round. Each node has its own registry: several nodes can share a process.

Every metric is listed, with its meaning, in README.md ("Metrics").
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from zmesh import protocol as P
    from zmesh.config import NodeConfig

__all__ = ["TTFT_BUCKETS", "NodeMetrics", "PeerView", "StatusView", "metrics_bind_host"]

# Seconds; from a warm cache hit (~30 ms) to a cold long prompt on a busy CPU node.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SNAPSHOT_TIMEOUT_S = 2.0  # a scrape waits this long for the loop, then skips the gauges

# NodeContext.count names with a metric of their own; any other name is counted in
# zmesh_events_total{event=name}, so a new counter is never silently dropped.
_FAILED = {
    "requests_invalid": "invalid_request",
    "requests_duplicate": "duplicate",
    "requests_failed": "engine_error",
    "requests_overloaded": "overloaded",
    "requests_deadline": "deadline_exceeded",
    "requests_client_limited": "too_many_requests",
}
_ROUTE_RE = re.compile(r"route_(?P<reason>\w+)")
_TCP_HOST_RE = re.compile(r"tcp://(?P<host>\[[^\]]*\]|[^:/]+):[0-9]+")


def metrics_bind_host(serve_addr: str) -> str:
    """The host the metrics server binds: the serve socket's (wildcards kept), else loopback.

    A node that serves on loopback keeps its metrics private too; one that binds
    every interface (a container) exposes them where Prometheus can scrape.
    """
    m = _TCP_HOST_RE.fullmatch(serve_addr)
    if m is None:  # ipc://
        return "127.0.0.1"
    host = m["host"]
    if host in ("*", "0.0.0.0"):
        return "0.0.0.0"
    return host.strip("[]").replace("*", "::") or "::"


@dataclass(frozen=True, slots=True)
class PeerView:
    """One peer as the node's table holds it, at the time of the view."""

    node_id: str
    state: str  # alive, suspect or dead
    last_heard: float | None  # monotonic; None: learned of, never heard
    learned_at: float  # monotonic
    epoch: int
    seq: int  # the delta seq our estimate of it has reached
    n_blocks: int  # prefix blocks our estimate says it holds
    link_delay_s: float
    queue_depth: int


@dataclass(frozen=True, slots=True)
class StatusView:
    """A node's state, read on its loop thread: what `Status` and the gauges report."""

    at: float  # time.monotonic() when the view was taken
    queue_depth: int
    backlog_s: float
    slots_used: int
    slots_total: int
    blocks: int  # prefix blocks this node advertises
    advert_seq: int
    peers: tuple[PeerView, ...] = ()


@dataclass(slots=True)
class _PeerGossip:
    lag_s: float  # receive time - heartbeat sent_at (one-way delay plus clock skew)
    seq: int  # the seq the peer's last heartbeat announced


@dataclass(slots=True)
class _PeerRow:
    peer: str
    state: str
    estimate_age_s: float
    seq_lag: int
    gossip_lag_s: float | None
    n_blocks: int
    link_delay_s: float
    queue_depth: int


@dataclass(slots=True)
class _Snapshot:
    queue_depth: int
    backlog_s: float
    slots_used: int
    slots_total: int
    blocks: int
    advert_seq: int
    peers: list[_PeerRow] = field(default_factory=list)


class _StateCollector(Collector):
    """Gauges read at scrape time from the node's state."""

    def __init__(self, metrics: NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self._metrics.snapshot()
        if snap is None:
            return
        scalar = [
            ("zmesh_queue_depth", "Requests queued or running on this node.", snap.queue_depth),
            (
                "zmesh_backlog_seconds",
                "Predicted seconds until a request arriving now would start.",
                snap.backlog_s,
            ),
            ("zmesh_slots_used", "KV slots holding a cached prefix.", snap.slots_used),
            ("zmesh_slots_total", "KV slots of this node.", snap.slots_total),
            ("zmesh_cached_blocks", "Prefix blocks this node advertises.", snap.blocks),
            (
                "zmesh_advert_seq",
                "Sequence number of this node's last cache delta.",
                snap.advert_seq,
            ),
        ]
        for name, doc, value in scalar:
            yield GaugeMetricFamily(name, doc, value=value)
        states = GaugeMetricFamily("zmesh_peers", "Known peers by state.", labels=["state"])
        for state in ("alive", "suspect", "dead"):
            states.add_metric([state], sum(1 for p in snap.peers if p.state == state))
        yield states
        per_peer: list[tuple[str, str, Any]] = [
            (
                "zmesh_peer_estimate_age_seconds",
                "Seconds since this node last heard from the peer (estimate staleness).",
                lambda p: p.estimate_age_s,
            ),
            (
                "zmesh_peer_estimate_seq_lag",
                "Cache deltas the estimate is behind the peer's last heartbeat.",
                lambda p: p.seq_lag,
            ),
            (
                "zmesh_peer_gossip_lag_seconds",
                "Delay of the peer's last heartbeat (receive time - send time; "
                "includes clock skew between hosts).",
                lambda p: p.gossip_lag_s,
            ),
            (
                "zmesh_peer_estimate_blocks",
                "Prefix blocks this node believes the peer holds.",
                lambda p: p.n_blocks,
            ),
            (
                "zmesh_peer_link_delay_seconds",
                "One-way link delay to the peer, from pings (EWMA).",
                lambda p: p.link_delay_s,
            ),
            (
                "zmesh_peer_queue_depth",
                "The peer's queue depth, from its last heartbeat.",
                lambda p: p.queue_depth,
            ),
        ]
        for name, doc, get in per_peer:
            fam = GaugeMetricFamily(name, doc, labels=["peer"])
            for p in snap.peers:
                value = get(p)
                if value is not None:
                    fam.add_metric([p.peer], value)
            yield fam


class NodeMetrics:
    """The metrics of one node; `start()` serves them over HTTP when `metrics_port` > 0."""

    def __init__(self, config: NodeConfig, model: str, log: Any = None) -> None:
        self.registry = CollectorRegistry()
        self.port = config.metrics_port
        self.host = metrics_bind_host(config.serve_addr)
        self.log = log
        self._view: Callable[[], StatusView] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._server: WSGIServer | None = None
        self._gossip: dict[str, _PeerGossip] = {}
        r = self.registry
        info = Gauge(
            "zmesh_node_info",
            "Always 1; labels name the node, its routing policy and model.",
            ["node_id", "policy", "model"],
            registry=r,
        )
        info.labels(config.node_id, config.routing.policy, model).set(1)
        self.received = Counter(
            "zmesh_requests_received", "Generate requests accepted for routing.", registry=r
        )
        self.requests = Counter(
            "zmesh_requests",
            "Requests answered through this node, by outcome (served here, or forwarded and "
            "answered by a peer) and route reason (local_best, prefix, load, hop_limit, "
            "fallback, ...).",
            ["outcome", "route_reason"],
            registry=r,
        )
        self.failed = Counter(
            "zmesh_requests_failed",
            "Requests answered with an error, by cause.",
            ["reason"],
            registry=r,
        )
        self.decisions = Counter(
            "zmesh_route_decisions", "Routing decisions by reason.", ["reason"], registry=r
        )
        self.forwards = Counter("zmesh_forwards", "Requests forwarded to a peer.", registry=r)
        self.forwards_ok = Counter(
            "zmesh_forwards_answered", "Forwards the peer answered.", registry=r
        )
        self.fallbacks = Counter(
            "zmesh_forward_fallbacks",
            "Forwards that failed, timed out or lost their peer and were served here.",
            registry=r,
        )
        self.ttft = Histogram(
            "zmesh_ttft_seconds",
            "Time to first token of requests served here, from arrival at this node.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "zmesh_prompt_tokens", "Prompt tokens of requests served here.", registry=r
        )
        self.cached_tokens = Counter(
            "zmesh_cached_tokens",
            "Prompt tokens found in the KV cache (not prefilled) of requests served here.",
            registry=r,
        )
        self.completion_tokens = Counter(
            "zmesh_completion_tokens", "Tokens generated by requests served here.", registry=r
        )
        self.evictions = Counter(
            "zmesh_evictions", "Requests that evicted a cached prefix to get a slot.", registry=r
        )
        self.evicted_tokens = Counter(
            "zmesh_evicted_tokens", "Cached tokens evicted from KV slots.", registry=r
        )
        self.events = Counter(
            "zmesh_events",
            "Other node events (malformed frames, snapshots, dropped deltas, ...).",
            ["event"],
            registry=r,
        )
        r.register(_StateCollector(self))

    # ---- updates (event loop thread) ---------------------------------------------

    def count(self, name: str, n: int = 1) -> None:
        """Mirror of `NodeContext.count`: each counter name lands in its metric."""
        if name == "requests_received":
            self.received.inc(n)
        elif name in _FAILED:
            self.failed.labels(_FAILED[name]).inc(n)
        elif name == "forwards":
            self.forwards.inc(n)
        elif name == "requests_forwarded_ok":
            self.forwards_ok.inc(n)
        elif name == "forward_fallbacks":
            self.fallbacks.inc(n)
        elif name == "prompt_tokens":
            self.prompt_tokens.inc(n)
        elif name == "cached_tokens":
            self.cached_tokens.inc(n)
        elif name == "requests_served":
            pass  # counted with its route reason by answered()
        elif m := _ROUTE_RE.fullmatch(name):
            self.decisions.labels(m["reason"]).inc(n)
        else:
            self.events.labels(name).inc(n)

    def answered(self, done: P.Done, *, local: bool, evicted_tokens: int = 0) -> None:
        """A Done went back to whoever asked: served here (`local`) or relayed from a peer."""
        self.requests.labels("served" if local else "forwarded", done.route_reason).inc()
        if not local:
            return  # the peer that served it counts its tokens and TTFT
        self.ttft.observe(max(done.ttft_s, 0.0))
        self.completion_tokens.inc(done.completion_tokens)
        if evicted_tokens > 0:
            self.evictions.inc()
            self.evicted_tokens.inc(evicted_tokens)

    def heartbeat(self, peer: str, sent_at: float, seq: int) -> None:
        self._gossip[peer] = _PeerGossip(lag_s=max(time.time() - sent_at, 0.0), seq=seq)

    # ---- scrape-time state ---------------------------------------------------------

    def _take_snapshot(self) -> _Snapshot | None:
        if self._view is None:
            return None
        view = self._view()
        rows = []
        for p in view.peers:
            g = self._gossip.get(p.node_id)
            rows.append(
                _PeerRow(
                    peer=p.node_id,
                    state=p.state,
                    estimate_age_s=view.at
                    - (p.last_heard if p.last_heard is not None else p.learned_at),
                    seq_lag=max(g.seq - p.seq, 0) if g is not None else 0,
                    gossip_lag_s=g.lag_s if g is not None else None,
                    n_blocks=p.n_blocks,
                    link_delay_s=p.link_delay_s,
                    queue_depth=p.queue_depth,
                )
            )
        # Peers dropped from the table leave no stale series behind.
        for gone in set(self._gossip) - {r.peer for r in rows}:
            del self._gossip[gone]
        return _Snapshot(
            queue_depth=view.queue_depth,
            backlog_s=view.backlog_s,
            slots_used=view.slots_used,
            slots_total=view.slots_total,
            blocks=view.blocks,
            advert_seq=view.advert_seq,
            peers=rows,
        )

    def snapshot(self) -> _Snapshot | None:
        """The node's state, read on its loop thread; None if the loop does not answer."""
        loop = self._loop
        if loop is None or loop.is_closed() or threading.get_ident() == self._loop_thread:
            return self._take_snapshot()
        fut: Future[_Snapshot | None] = Future()

        def take() -> None:
            try:
                fut.set_result(self._take_snapshot())
            except Exception as exc:  # reported to the scrape, not lost in the loop
                fut.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return fut.result(timeout=SNAPSHOT_TIMEOUT_S)
        except (RuntimeError, FutureTimeout):  # loop closing, or stuck: counters only
            return None

    # ---- HTTP server -----------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, view: Callable[[], StatusView]) -> None:
        """Serve /metrics on (host, metrics_port) from a daemon thread; port 0: off.
        ``view`` is called on ``loop``'s thread (this one) at each scrape."""
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._view = view
        if self.port <= 0 or self._server is not None:
            return
        try:
            self._server, _ = start_http_server(self.port, addr=self.host, registry=self.registry)
        except OSError as exc:
            raise OSError(
                exc.errno, f"metrics: cannot listen on {self.host}:{self.port}: {exc.strerror}"
            ) from exc
        if self.log is not None:
            self.log.info("metrics.started", host=self.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._loop = None
