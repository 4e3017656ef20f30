"""The simulator's state: a request (`Job`), a modelled node (`SimNode`), a peer table (`View`)."""

from __future__ import annotations

from collections import deque
from typing import Any

from zmesh.gossip import LocalAdvert
from zmesh.peers import PeerEstimate, PeerTable
from zmesh.routing import (
    Candidate,
    PolicyState,
)
from zmesh.sim.cache import SlotCache, TokenCache
from zmesh.sim.config import (
    WAIT,
)


class Job:
    __slots__ = (
        "bar",
        "best",
        "best_nodes",
        "cached",
        "claim",
        "done_at",
        "done_due",
        "entry",
        "first_at",
        "first_left",
        "forwarded",
        "fwd_cost",
        "fwd_sent",
        "ids",
        "index",
        "node",
        "paused",
        "predicted",
        "predicted_prefill",
        "progress_at",
        "pull_from",
        "pull_got",
        "pull_n",
        "reason",
        "refused_by",
        "ret_delay",
        "run_node",
        "sent_at",
        "started_at",
        "state",
        "stream",
        "tokens",
        "work_left",
    )

    def __init__(self, index: int, tokens: tuple[int, ...], ids: list[int], entry: int) -> None:
        self.index = index
        self.tokens = tokens
        self.ids = ids
        self.entry = entry
        self.node = entry
        self.sent_at = 0.0
        self.started_at = 0.0  # when it got its place on the node that runs it
        # Running in a batch (serving.py): alone-seconds of work left, and until its
        # first token; when they were last brought up to date; when it will end.
        self.work_left = 0.0
        self.first_left = 0.0
        self.progress_at = 0.0
        self.done_due = 0.0
        self.state = WAIT
        self.forwarded = False
        self.fwd_sent = 0.0
        self.fwd_cost = 0.0
        self.predicted = 0.0
        self.predicted_prefill = 0.0  # of which its prompt (batching nodes read one at a time)
        self.first_at = 0.0
        self.done_at = 0.0
        self.ret_delay = 0.0
        self.cached = 0
        self.claim: Any = None
        self.reason = ""
        self.stream = -1
        self.run_node = -1
        # KV shipping: the holder pulled from (-1: none), the tokens asked, what came
        # (PULL_PENDING until the answer; 0: nothing usable), and how long a peer's
        # export paused this request while it ran on the holder.
        self.pull_from = -1
        self.pull_n = 0
        self.pull_got = 0
        self.paused = 0.0
        self.best = 0  # diagnose: longest real cached match over the nodes at arrival
        self.best_nodes: tuple[int, ...] = ()  # ... and the nodes holding it
        self.bar: float | None = None  # admission: the forwarder's bar (routing/admission.py)
        self.refused_by: tuple[int, ...] = ()  # peers that refused it as busy

    def retry_at(self, node: int) -> Job:
        """A copy of this request to serve at ``node`` (the original is abandoned)."""
        job = Job(self.index, self.tokens, self.ids, self.entry)
        job.node = node
        job.sent_at = self.sent_at
        job.stream = self.stream
        job.best, job.best_nodes = self.best, self.best_nodes
        return job


class SimNode:
    __slots__ = (
        "advert",
        "alive",
        "busy",
        "cache",
        "epoch",
        "flush_pending",
        "fwd_out",
        "gen",
        "idx",
        "incoming",
        "inflight",
        "load_changed",
        "name",
        "phase",
        "policy_state",
        "queue",
        "queued_s",
        "running",
        "served",
        "service_ewma",
        "shadow",
        "shadow_free",
        "shadow_lane",
        "view",
    )

    # Set by the simulator when the node (re)starts, not at construction.
    advert: LocalAdvert
    cache: SlotCache | TokenCache
    epoch: int
    phase: float
    policy_state: PolicyState
    shadow: SlotCache | TokenCache

    def __init__(self, idx: int, name: str) -> None:
        self.idx = idx
        self.name = name
        self.alive = True
        self.gen = 0  # bumps on crash: events of an older life are ignored
        self.queue: deque[Job] = deque()
        self.running: list[Job] = []  # up to SimConfig.max_running, in start order
        self.queued_s = 0.0
        self.busy = False
        self.flush_pending = False
        self.load_changed = False
        self.served = 0
        self.service_ewma = 0.0
        self.inflight: dict[int, int] = {}  # peer -> our forwards not finished
        self.fwd_out: dict[int, list[Job]] = {}  # peer -> forwards not finished
        # The oracle's mirror: when each of the node's places (max_running) frees.
        self.shadow_free: list[float] = [0.0]
        self.shadow_lane = 0.0  # ... and when it will have read every prompt sent there
        self.incoming = 0  # forwards on their way here (diagnose: the real load)


class View:
    """A real `PeerTable`: one node's knowledge of its peers, or everyone's (shared)."""

    __slots__ = ("alive", "holders", "indexed", "owner", "static", "static_key", "table")

    def __init__(self, owner: int, table: PeerTable, index: bool) -> None:
        self.owner = owner  # node index, or -1 for the shared view
        self.table = table
        self.alive: list[tuple[int, PeerEstimate]] = []
        self.holders: dict[int, set[int]] | None = {} if index else None
        self.indexed: dict[int, tuple[object, set[int]]] = {}
        self.static: list[Candidate] = []
        self.static_key: tuple[int, ...] = ()
