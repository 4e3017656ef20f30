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

from zmesh import candidates as cm
from zmesh import protocol as P
from zmesh.candidates import (
    BORROW_FACTOR,
    DEFAULT_DECODE_S_PER_TOKEN,
    DEFAULT_PREFILL_S_PER_TOKEN,
    DEFAULT_SERVICE_S,
)
from zmesh.engine import Engine
from zmesh.kvstate import KvState
from zmesh.peers import PeerEstimate

# The start values and the borrowing rule are zmesh.candidates' (shared with the
# simulator); re-exported here for the node's parts and tests.
__all__ = [
    "BORROW_FACTOR",
    "DEFAULT_DECODE_S_PER_TOKEN",
    "DEFAULT_PREFILL_S_PER_TOKEN",
    "DEFAULT_SERVICE_S",
    "Job",
    "Load",
    "expired",
    "peer_median",
]


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
        return cm.queue_depth(self.queue.qsize(), self.running is not None)

    def backlog_s(self) -> float:
        """Predicted seconds until a request arriving now would start here."""
        running = self.running
        return cm.backlog_s(
            self.queued_s,
            running.predicted_s if running is not None else None,
            time.monotonic() - self.running_since,
        )

    def predict_s(self, new_tokens: int, max_tokens: int) -> float:
        st = self._engine.stats
        return cm.predict_s(
            new_tokens,
            max_tokens,
            st.prefill_s_per_token or DEFAULT_PREFILL_S_PER_TOKEN,
            st.decode_s_per_token or DEFAULT_DECODE_S_PER_TOKEN,
            st.completion_tokens,
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
    """A rate this node has not measured yet, borrowed from its peers' ``field``
    (`zmesh.candidates.borrowed_rate`)."""
    return cm.borrowed_rate((getattr(p, field) for p in peers), default)
