"""A node's load model: the job queue, the running jobs and the predicted backlog.

What routing and heartbeats say about this node's load comes from here: the queue
depth, the predicted seconds until a request arriving now would start (`backlog_s`,
from the engine's measured rates), and whether that changed since the last heartbeat.
Also the rates a node borrows from its peers until it has measured its own.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from zmesh import candidates as cm
from zmesh import protocol as P
from zmesh.candidates import (
    BORROW_FACTOR,
    DEFAULT_DECODE_S_PER_TOKEN,
    DEFAULT_PREFILL_S_PER_TOKEN,
    DEFAULT_SERVICE_S,
    Work,
    batch_depth,
    batch_wait_s,
)
from zmesh.engine import Engine, Handle
from zmesh.kvstate import KvState
from zmesh.node.request import RequestContext
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
    """A request accepted for local service: its context and how its service goes."""

    req: RequestContext
    route_reason: str
    route_path: list[str]
    predicted_s: float = 0.0  # predicted service time, for the advertised backlog
    prefill_s: float = 0.0  # of which, its prefill (the engine prefills one at a time)
    attempt: int = 0
    chunks: int = 0
    cancelled: bool = False
    # KV shipping: the pull under way for this job, its result, and what it brought.
    kv_pull: asyncio.Task[KvState] | None = None
    pulled_from: str | None = None
    kv_state: KvState | None = None
    shipped_tokens: int = 0
    started_at: float = 0.0  # monotonic: when it got its place in the engine
    handle: Handle | None = None  # once submitted to the engine

    # The request's own facts, read from its context.
    @property
    def msg(self) -> P.Generate:
        return self.req.msg

    @property
    def reply_to(self) -> list[bytes]:
        return self.req.envelope

    @property
    def tokens(self) -> list[int]:
        return self.req.tokens

    @property
    def received_at(self) -> float:
        return self.req.received_at

    @property
    def client(self) -> bytes | None:
        return self.req.client

    @property
    def scope(self) -> bytes:
        return self.req.scope

    @property
    def key(self) -> tuple[bytes, str]:
        return self.req.key


def expired(msg: P.Generate) -> bool:
    """Whether the request's absolute deadline (unix time, carried across hops) passed."""
    return msg.deadline is not None and time.time() > msg.deadline


class Load:
    """The jobs waiting for a place in the engine and those it runs (up to the engine's
    ``max_running`` at once), with their predicted cost."""

    def __init__(self, max_queue: int, engine: Engine) -> None:
        self.max_queue = max_queue
        self.queue: deque[Job] = deque()
        self.running: dict[tuple[bytes, str], Job] = {}
        self.queued_s = 0.0  # predicted seconds of the jobs waiting in the queue
        self.changed = False  # send a heartbeat at the next gossip tick
        self._engine = engine
        self._wake = asyncio.Event()  # a job queued or a place freed

    def places(self) -> int:
        """Requests the engine runs at once (its ``max_running``, settable; never more
        than its slots: a job beyond them would only wait inside the engine)."""
        return max(min(self._engine.max_running, self._engine.n_slots), 1)

    def depth(self) -> int:
        return batch_depth(len(self.queue), len(self.running))

    def backlog_s(self) -> float:
        """Predicted seconds until a request arriving now would start its prefill here:
        a place, and the prompts ahead of it prefilled (`candidates.batch_wait_s`)."""
        now = time.monotonic()
        running = [(now - j.started_at, _work(j)) for j in self.running.values()]
        return batch_wait_s(running, [_work(j) for j in self.queue], self.places())

    def miss_evict_tokens(self) -> int:
        """Cached tokens a miss would overwrite here (0: a slot is free), as the engine's
        slot policy says (`Engine.miss_evict_tokens`: running slots pinned): what this
        node advertises, and counts for itself, for the eviction charge."""
        return self._engine.miss_evict_tokens()

    def predict_s(self, new_tokens: int, max_tokens: int) -> float:
        st = self._engine.stats
        return cm.predict_s(
            new_tokens,
            max_tokens,
            st.prefill_s_per_token or DEFAULT_PREFILL_S_PER_TOKEN,
            st.decode_s_per_token or DEFAULT_DECODE_S_PER_TOKEN,
            st.completion_tokens,
        )

    def predict_prefill_s(self, new_tokens: int) -> float:
        """The prefill part of `predict_s`."""
        rate = self._engine.stats.prefill_s_per_token or DEFAULT_PREFILL_S_PER_TOKEN
        return cm.predict_prefill_s(new_tokens, rate)

    def put(self, job: Job) -> None:
        """Queue ``job``; raises asyncio.QueueFull when the queue is full."""
        if len(self.queue) >= self.max_queue:
            raise asyncio.QueueFull
        self.queue.append(job)
        self.queued_s += job.predicted_s
        self.changed = True
        self._wake.set()

    async def next(self) -> Job:
        """The next job once the engine has a place for it, now counted as running."""
        while not self.queue or len(self.running) >= self.places():
            self._wake.clear()
            await self._wake.wait()
        job = self.queue.popleft()
        self.queued_s = max(self.queued_s - job.predicted_s, 0.0)
        job.started_at = time.monotonic()
        self.running[job.key] = job
        self.changed = True
        return job

    def finished(self, job: Job) -> None:
        self.running.pop(job.key, None)
        self.changed = True
        self._wake.set()


def _work(job: Job) -> Work:
    return Work(min(job.prefill_s, job.predicted_s), job.predicted_s)


def peer_median(peers: Iterable[PeerEstimate], field: str, default: float) -> float:
    """A rate this node has not measured yet, borrowed from its peers' ``field``
    (`zmesh.candidates.borrowed_rate`)."""
    return cm.borrowed_rate((getattr(p, field) for p in peers), default)
