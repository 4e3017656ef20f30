"""A node's load model: the job queue, the running job and the predicted backlog.

What routing and heartbeats say about this node's load comes from here: the queue
depth, the predicted seconds until a request arriving now would start (`backlog_s`,
from the engine's measured rates), and whether that changed since the last heartbeat.
Also the rates a node borrows from its peers until it has measured its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from zmesh import protocol as P
from zmesh.engine import Engine
from zmesh.kvstate import KvState
from zmesh.peers import PeerEstimate

DEFAULT_PREFILL_S_PER_TOKEN = 0.002  # until measured: about what 2 CPU cores do
DEFAULT_SERVICE_S = 0.5
DEFAULT_DECODE_S_PER_TOKEN = 0.015
# Until a node has measured its own rates it borrows its peers' median (of two peers at
# least), kept within this factor of the start values: one peer's claim must not set it.
BORROW_FACTOR = 10.0


@dataclass(slots=True)
class Job:
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
    scope: bytes = b""  # the sender's scope: (scope, request id) is the job's key
    # KV shipping: the pull under way for this job, its result, and what it brought.
    kv_pull: asyncio.Task[KvState] | None = None
    pulled_from: str | None = None
    kv_state: KvState | None = None
    shipped_tokens: int = 0

    @property
    def key(self) -> tuple[bytes, str]:
        return self.scope, self.msg.request_id


def expired(msg: P.Generate) -> bool:
    """Whether the request's absolute deadline (unix time, carried across hops) passed."""
    return msg.deadline is not None and time.time() > msg.deadline


class Load:
    """The jobs waiting for the engine and the one it runs, with their predicted cost."""

    def __init__(self, max_queue: int, engine: Engine) -> None:
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=max_queue)
        self.running: Job | None = None
        self.running_since = 0.0
        self.queued_s = 0.0  # predicted seconds of the jobs waiting in the queue
        self.changed = False  # send a heartbeat at the next gossip tick
        self._engine = engine

    def depth(self) -> int:
        return self.queue.qsize() + (1 if self.running else 0)

    def backlog_s(self) -> float:
        """Predicted seconds until a request arriving now would start here."""
        running = 0.0
        if self.running is not None:
            elapsed = time.monotonic() - self.running_since
            running = max(self.running.predicted_s - elapsed, 0.0)
        return self.queued_s + running

    def predict_s(self, new_tokens: int, max_tokens: int) -> float:
        return self._engine.stats.predict_s(
            new_tokens, max_tokens, DEFAULT_PREFILL_S_PER_TOKEN, DEFAULT_DECODE_S_PER_TOKEN
        )

    def put(self, job: Job) -> None:
        """Queue ``job``; raises asyncio.QueueFull when the queue is full."""
        self.queue.put_nowait(job)
        self.queued_s += job.predicted_s
        self.changed = True

    async def next(self) -> Job:
        """The next job, now counted as running."""
        job = await self.queue.get()
        self.queued_s = max(self.queued_s - job.predicted_s, 0.0)
        self.running, self.running_since = job, time.monotonic()
        self.changed = True
        return job

    def finished(self) -> None:
        self.running = None
        self.changed = True


def peer_median(peers: Iterable[PeerEstimate], field: str, default: float) -> float:
    """A rate this node has not measured yet: peers on like hardware are a better
    guess than a constant, but only the median of two or more of them, kept within
    BORROW_FACTOR of ``default``; with fewer, ``default``."""
    values = sorted(v for p in peers if (v := getattr(p, field)) > 0)
    if len(values) < 2:
        return default
    median = values[len(values) // 2]
    return min(max(median, default / BORROW_FACTOR), default * BORROW_FACTOR)
