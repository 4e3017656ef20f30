"""Discrete-event simulator of a zmesh cluster, on the real routing, gossip and cache code.

What is real (imported, not copied): `RadixTree` and `BlockHasher` (each node's cache
and the block ids it advertises), `LocalAdvert` (sequenced deltas, digest, snapshot
parts), `PeerTable` / `PeerEstimate` (estimates, gap/epoch/digest repair, failure
detection) and `routing.decide` (every policy). What is modelled: time (a cost model
calibrated from the engine benchmark), the engine's slot policy (`cache.py`), links
(per-message delay with jitter, FIFO per link, loss of gossip messages), node crashes.

A node here behaves like `node.py`: an entry node routes the request (candidates
built as `Node._route` builds them: local tree match, each alive peer's estimated
match, heard queue + our in-flight forwards, heard backlog + forwards the peer has
not reported yet, measured link delay), forwards at most once, serves FIFO, flushes
its cache deltas every ``delta_s`` and heartbeats every ``heartbeat_s`` and at the next
tick after its load changed. A failed or timed-out forward is served by the entry.

Scale (1,000 nodes): ``estimates="shared"`` keeps one estimate per node that every
peer reads (each message delivered once, with a sampled delay) instead of one per
(receiver, sender) pair; ``max_candidates`` routes among the peers with the longest
estimated matches (found through an index of the shared estimates) plus a random
sample, instead of all peers. Both are documented approximations; below 64 nodes
the defaults are exact (per-receiver estimates for up to 8 nodes, all peers as
candidates).

Policies: the five of `routing.POLICIES`, plus ``paper`` (the P2P paper's design:
the longest estimated prefix wins, blind to delay and load; run through
`decide` with delays and queues zeroed and the balance rule off) and ``oracle`` (a
client-side router with exact, instant knowledge of every node's cache - including
what queued requests will leave in it - and of every queue).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zmesh.blocks import BlockHasher
from zmesh.candidates import (
    PeerRow,
    backlog_s,
    contenders,
    head_key,
    local_candidate,
    peer_candidate,
    predict_s,
    queue_depth,
    row_estimate_s,
    unreported_s,
)
from zmesh.gossip import DEFAULT_SNAPSHOT_PART_BLOCKS, LocalAdvert
from zmesh.oracle import OracleNode, choose, replay
from zmesh.peers import NEED_SNAPSHOT, OK, PeerEstimate, PeerState, PeerTable
from zmesh.routing import (
    ALL_POLICIES,
    ORACLE,
    PAPER,
    Candidate,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
)
from zmesh.sim.cache import SlotCache, TokenCache
from zmesh.sim.costmodel import PRESETS, CostModel
from zmesh.sim.tokens import PromptTable
from zmesh.stats import ewma
from zmesh.workload import Arrivals, Workload

__all__ = ["SIM_POLICIES", "SimConfig", "SimResult", "Simulator", "simulate"]

SIM_POLICIES = ALL_POLICIES
_FINGERPRINT = b"zmesh-sim-model"
_NO_BALANCE = 10**9  # balance_abs that never triggers (paper policy)

# Event kinds (ints: heap tuples compare them only on time ties).
_ARRIVE, _FWD, _DONE, _FLUSH, _HB, _DELIVER, _SNAPREQ, _SNAPPARTS = range(8)
_TICK, _FAIL, _RECOVER, _FWD_TIMEOUT, _STREAM, _OPEN = range(8, 14)

# Job states.
_WAIT, _QUEUED, _RUNNING, _FINISHED, _DROPPED = range(5)


@dataclass
class SimConfig:
    nodes: int = 8
    policy: str = "zmesh"
    n_slots: int = 8
    cache: str = "slots"  # "slots": the engine's slot pool; "tokens": radix LRU, token budget
    cache_tokens: int = 16384
    block_size: int = 16
    delay_s: float = 0.001  # one-way inter-node delay (mean of the base)
    jitter: float = 0.2  # extra delay per message: delay * jitter * Exp(1)
    delay_spread: float = 0.0  # per-link base delay = delay_s * lognormal(0, spread)
    loss: float = 0.0  # probability that a gossip message (heartbeat, delta) is lost
    heartbeat_s: float = 0.2
    delta_s: float = 0.03
    suspect_after_s: float = 1.0
    dead_after_s: float = 3.0
    snapshot_timeout_s: float = 2.0
    forward_timeout_s: float = 5.0
    # Nodes send Progress keep-alives for forwarded work, so a forward to a live peer
    # is waited for; False models nodes before that: a forward whose first token has
    # not reached its entry within forward_timeout_s is served again there.
    forward_keepalive: bool = True
    hash_prefix_tokens: int = 64
    max_queue: int = 64
    routing: dict[str, Any] = field(default_factory=dict)  # RoutingSettings overrides
    estimates: str = "auto"  # "per_node" | "shared" | "auto" (per_node up to 8 nodes)
    max_candidates: int = 0  # peers considered per decision; 0: all up to 64 nodes, else 16
    cost: CostModel = field(default_factory=lambda: PRESETS["cpu"])
    service_noise: float = 0.0  # service time *= lognormal(0, noise)
    failures: int = 0  # node crashes, spread evenly over the requests
    downtime_s: float = 5.0
    seed: int = 0
    # Tests: decide every request on the full candidate list too, and keep both
    # decisions (`Simulator.checked`) for the test to compare.
    verify: bool = False
    # A proposed change, not what node.py does: count the prefixes of requests already
    # queued here, or forwarded by us to a peer, as matched (they will be cached by then).
    pending_prefixes: bool = False
    # Diagnosis (`sim run`): per request, which nodes' real caches matched it best when
    # it arrived, and whether the chosen node looked idle; costs a match per node.
    diagnose: bool = False
    # "one": every request enters at node 0, which then sees all its own decisions
    # (what the picture lacks when a burst enters at several nodes at once).
    entry: str = "random"

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError("nodes must be >= 1")
        if self.policy not in SIM_POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; known: {', '.join(SIM_POLICIES)}")
        if self.cache not in ("slots", "tokens"):
            raise ValueError("cache must be slots or tokens")
        if self.entry not in ("random", "one"):
            raise ValueError("entry must be random or one")
        if self.estimates not in ("auto", "shared", "per_node"):
            raise ValueError("estimates must be auto, shared or per_node")
        if self.delay_s < 0 or self.jitter < 0 or not 0 <= self.loss < 1:
            raise ValueError("delay_s and jitter must be >= 0, loss in [0, 1)")

    def shared_estimates(self) -> bool:
        return self.estimates == "shared" or (self.estimates == "auto" and self.nodes > 8)

    def candidate_limit(self) -> int:
        if self.max_candidates > 0:
            return self.max_candidates
        return 0 if self.nodes <= 64 else 16


@dataclass
class SimResult:
    config: dict[str, Any]
    figures: dict[str, Any]
    ttft_s: list[float]
    e2e_s: list[float]
    served_by: list[int]
    wall_s: float
    events: int


class _Job:
    __slots__ = (
        "best",
        "best_nodes",
        "cached",
        "claim",
        "done_at",
        "entry",
        "first_at",
        "forwarded",
        "fwd_cost",
        "fwd_sent",
        "ids",
        "index",
        "node",
        "predicted",
        "reason",
        "ret_delay",
        "run_node",
        "sent_at",
        "state",
        "stream",
        "tokens",
    )

    def __init__(self, index: int, tokens: tuple[int, ...], ids: list[int], entry: int) -> None:
        self.index = index
        self.tokens = tokens
        self.ids = ids
        self.entry = entry
        self.node = entry
        self.sent_at = 0.0
        self.state = _WAIT
        self.forwarded = False
        self.fwd_sent = 0.0
        self.fwd_cost = 0.0
        self.predicted = 0.0
        self.first_at = 0.0
        self.done_at = 0.0
        self.ret_delay = 0.0
        self.cached = 0
        self.claim: Any = None
        self.reason = ""
        self.stream = -1
        self.run_node = -1
        self.best = 0  # diagnose: longest real cached match over the nodes at arrival
        self.best_nodes: tuple[int, ...] = ()  # ... and the nodes holding it

    def retry_at(self, node: int) -> _Job:
        """A copy of this request to serve at ``node`` (the original is abandoned)."""
        job = _Job(self.index, self.tokens, self.ids, self.entry)
        job.node = node
        job.sent_at = self.sent_at
        job.stream = self.stream
        job.best, job.best_nodes = self.best, self.best_nodes
        return job


class _Node:
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
        "running_since",
        "served",
        "service_ewma",
        "shadow",
        "shadow_free_at",
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
        self.queue: deque[_Job] = deque()
        self.running: _Job | None = None
        self.running_since = 0.0
        self.queued_s = 0.0
        self.busy = False
        self.flush_pending = False
        self.load_changed = False
        self.served = 0
        self.service_ewma = 0.0
        self.inflight: dict[int, int] = {}  # peer -> our forwards not finished
        self.fwd_out: dict[int, list[_Job]] = {}  # peer -> forwards not finished
        self.shadow_free_at = 0.0
        self.incoming = 0  # forwards on their way here (diagnose: the real load)


class _View:
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


class Simulator:
    def __init__(
        self,
        config: SimConfig,
        workload: Workload,
        arrivals: Arrivals,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg = config
        self.workload = workload
        self.arrivals = arrivals
        self.progress = progress
        self.cost = cfg.cost
        self.rng = random.Random(cfg.seed)
        self.net_rng = random.Random(cfg.seed ^ 0x9E7)
        self.hasher = BlockHasher(_FINGERPRINT, "default", cfg.block_size)
        self.prompts = PromptTable(workload, self.hasher)
        self.names = [f"n{i}" for i in range(cfg.nodes)]
        self.by_name = {n: i for i, n in enumerate(self.names)}
        self.policy = cfg.policy
        # A real node's routing defaults (RoutingSettings'), then this run's overrides.
        # Without keep-alives a node gives a forward up after forward_timeout_s, so it
        # does not forward where it expects to wait longer than that.
        give_up = 0.0 if cfg.forward_keepalive else cfg.forward_timeout_s
        overrides = {"give_up_s": give_up, **cfg.routing}
        if cfg.policy in (PAPER, ORACLE):
            # Neither has thresholds, a balance rule or placement; `contenders` prunes
            # the paper's candidates by these.
            overrides.update(
                min_gain_s=0.0,
                min_gain_frac=0.0,
                balance_abs=_NO_BALANCE,
                place_slack_frac=0.0,
                give_up_s=0.0,
            )
        self.settings = RoutingSettings(policy=cfg.policy, **overrides)
        self.uses_matches = cfg.policy in ("zmesh", PAPER)
        self.limit = cfg.candidate_limit()
        self.shared = cfg.shared_estimates() or self.limit > 0
        self.nodes = [_Node(i, n) for i, n in enumerate(self.names)]
        self._heap: list[tuple[float, int, int, Any, Any]] = []
        self._seq = itertools.count()
        self.now = 0.0
        self.events = 0
        self._fifo: dict[tuple[int, int], float] = {}
        self._link_base: dict[tuple[int, int], float] = {}
        self._rid = itertools.count(1)
        self._mean_delay = cfg.delay_s * (1.0 + cfg.jitter)
        self._tail = itertools.count(1)
        for node in self.nodes:
            self._boot(node)
            node.policy_state = PolicyState.seeded(1000 + node.idx)
            node.phase = self.rng.random() * cfg.delta_s
        self.views: list[_View] = []
        if self.shared:
            table = PeerTable(
                "@mesh", cfg.suspect_after_s, cfg.dead_after_s, cfg.snapshot_timeout_s
            )
            self.views.append(_View(-1, table, index=True))
            self.view_of = [0] * cfg.nodes
        else:
            for node in self.nodes:
                t = PeerTable(
                    node.name, cfg.suspect_after_s, cfg.dead_after_s, cfg.snapshot_timeout_s
                )
                self.views.append(_View(node.idx, t, index=False))
            self.view_of = list(range(cfg.nodes))
        # The oracle's exact mirror of each node: its cache after every request already
        # dispatched there, and when the node will be free.
        self.oracle_index: dict[int, set[int]] = {}
        if cfg.policy == ORACLE:
            for node in self.nodes:
                node.shadow = self._new_cache()
        # Client side: the entry node of each request, the same for every policy.
        entry_rng = random.Random(cfg.seed ^ 0xE47)
        self.entries = [entry_rng.randrange(cfg.nodes) for _ in workload.requests]
        if cfg.entry == "one":
            self.entries = [0] * len(self.entries)
        self.noise_rng = random.Random(cfg.seed ^ 0x7015E)
        n = len(workload.requests)
        self.ttft = [math.nan] * n
        self.e2e = [math.nan] * n
        self.served_by = [-1] * n
        self.cached = [0] * n
        self.prompt_len = [0] * n
        self.forwarded = [False] * n
        self.fallbacks = 0
        self.failed = 0
        self.rejected = 0
        self.reasons: dict[str, int] = {}
        # diagnose: per final reason [requests, away from the best match, tokens lost, ttft]
        self.by_reason: dict[str, list[float]] = {}
        self.idle_picks = 0  # decisions whose target the picture called idle
        self.stale_idle = 0  # ... while it already had work (queued, running, on its way)
        self.idle_sent: dict[tuple[float, int], int] = {}  # (arrival instant, node) -> picks
        # verify: (decision on the candidates passed, decision on the full list)
        self.checked: list[tuple[tuple[str, str], tuple[str, str]]] = []
        self.done = 0
        self.snapshots = 0
        self.deltas_lost = 0
        self._streams = workload.streams()
        self._stream_pos = [0] * len(self._streams)
        self._next_stream = 0
        self._open_rng = random.Random(0)  # Poisson starts (see _open_next)
        self._open_at = 0.0
        self._due = arrivals.due(n, cfg.seed)  # bursts: when each request is due
        self._fail_plan: list[int] = []
        if cfg.failures:
            step = n / (cfg.failures + 1)
            self._fail_plan = [int(step * (k + 1)) for k in range(cfg.failures)]
        self._arrived = 0

    # ---- setup ---------------------------------------------------------------

    def _new_cache(self) -> SlotCache | TokenCache:
        if self.cfg.cache == "slots":
            return SlotCache(self.cfg.n_slots, self.hasher)
        return TokenCache(self.cfg.cache_tokens, self.hasher)

    def _boot(self, node: _Node) -> None:
        node.cache = self._new_cache()
        node.epoch = self.rng.getrandbits(62)
        node.advert = LocalAdvert(node.epoch)

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    # ---- links ---------------------------------------------------------------

    def _base_delay(self, a: int, b: int) -> float:
        if self.cfg.delay_spread <= 0:
            return self.cfg.delay_s
        key = (a, b) if a < b else (b, a)
        d = self._link_base.get(key)
        if d is None:
            d = self._link_base[key] = self.cfg.delay_s * self.net_rng.lognormvariate(
                0.0, self.cfg.delay_spread
            )
        return d

    def _delay(self, a: int, b: int) -> float:
        base = self._base_delay(a, b)
        if self.cfg.jitter > 0 and base > 0:
            return base * (1.0 + self.cfg.jitter * self.net_rng.expovariate(1.0))
        return base

    def _measured_delay(self, a: int, b: int) -> float:
        """What a node's ping EWMA converges to: the link's mean one-way delay."""
        if self.cfg.delay_spread <= 0:
            return self._mean_delay
        return self._base_delay(a, b) * (1.0 + self.cfg.jitter)

    # ---- run -----------------------------------------------------------------

    def run(self) -> SimResult:
        import time

        t0 = time.perf_counter()
        cfg = self.cfg
        for node in self.nodes:
            self._push(node.phase + cfg.heartbeat_s * self.rng.random(), _HB, node.idx, 0)
        for v, _ in enumerate(self.views):
            self._push(cfg.heartbeat_s, _TICK, v)
        self._start_arrivals()
        handlers: list[Callable[[Any, Any], None]] = [
            self._on_arrive,
            self._on_fwd,
            self._on_done,
            self._on_flush,
            self._on_hb,
            self._on_deliver,
            self._on_snapreq,
            self._on_snapparts,
            self._on_tick,
            self._on_fail,
            self._on_recover,
            self._on_fwd_timeout,
            self._on_stream,
            self._on_open,
        ]
        heap = self._heap
        pop = heapq.heappop
        total = len(self.workload.requests)
        report_every = max(total // 20, 1)
        next_report = report_every
        events = 0
        while heap and self.done < total:
            t, _, kind, a, b = pop(heap)
            self.now = t
            handlers[kind](a, b)
            events += 1
            if self.progress is not None and self.done >= next_report:
                next_report += report_every
                self.progress(
                    f"{self.done}/{total} requests, sim {t:.1f}s, "
                    f"wall {time.perf_counter() - t0:.1f}s"
                )
        self.events = events
        return self._result(time.perf_counter() - t0)

    # ---- arrivals --------------------------------------------------------------

    def _start_arrivals(self) -> None:
        arr = self.arrivals
        if arr.mode == "bursts":
            self._open_next()
        elif arr.mode == "closed":
            for _ in range(min(arr.concurrency, len(self._streams))):
                self._launch_stream(0.0)
        else:
            self._open_rng = random.Random(self.cfg.seed ^ 0xA441)
            self._open_at = 0.0
            self._open_next()

    def _open_next(self) -> None:
        """Poisson: schedule the next stream's start, one at a time.

        Drawn from the same generator in the same order as scheduling them all up
        front, but the heap stays small (a million pending starts made every push and
        pop of the run pay for them).
        """
        if self._next_stream < len(self._streams):
            if self._due:  # bursts: streams open when their first request is due
                self._open_at = self._due[self._streams[self._next_stream][0]]
            else:
                self._open_at += self._open_rng.expovariate(self.arrivals.rate)
            self._push(self._open_at, _OPEN, self._next_stream)
            self._next_stream += 1

    def _on_open(self, s: int, _: Any) -> None:
        self._open_next()
        self._on_stream(s, None)

    def _launch_stream(self, t: float) -> None:
        if self._next_stream < len(self._streams):
            s = self._next_stream
            self._next_stream += 1
            self._push(t, _STREAM, s)

    def _on_stream(self, s: int, _: Any) -> None:
        pos = self._stream_pos[s]
        stream = self._streams[s]
        if pos >= len(stream):
            if self.arrivals.mode == "closed":
                self._launch_stream(self.now)
            return
        self._stream_pos[s] = pos + 1
        self._on_arrive(stream[pos], s)

    def _stream_step(self, job: _Job, client_time: float) -> None:
        """The client got its answer (or gave up): the stream's next request follows."""
        self._next_turn(job.stream, client_time)

    def _next_turn(self, s: int, client_time: float) -> None:
        """Stream ``s`` sends its next request after ``think_s``, and not before it is due."""
        if s < 0:
            return
        t = client_time + self.arrivals.think_s
        pos = self._stream_pos[s]
        if self._due and pos < len(self._streams[s]):
            t = max(t, self._due[self._streams[s][pos]])
        self._push(t, _STREAM, s)

    def _on_arrive(self, i: int, stream: int) -> None:
        tokens, ids = self.prompts.get(i)
        entry = self.entries[i]
        n = self.cfg.nodes
        for k in range(n):  # the client fails over to the next node it can reach
            if self.nodes[(entry + k) % n].alive:
                entry = (entry + k) % n
                break
        else:
            self._finish_failed(i, stream)
            return
        job = _Job(i, tokens, ids, entry)
        job.stream = stream
        job.sent_at = self.now
        if self.cfg.diagnose:
            self._best_match(job)
        self.prompt_len[i] = len(tokens)
        self._arrived += 1
        if self._fail_plan and self._arrived >= self._fail_plan[0]:
            self._fail_plan.pop(0)
            self._push(self.now, _FAIL, self.rng.randrange(n))
        if self.policy == ORACLE:
            self._oracle_dispatch(job)
            return
        node = self.nodes[entry]
        target, reason = self._route(node, job)
        job.reason = reason
        if target == entry:
            self._enqueue(node, job)
            return
        self._forward(node, job, target)

    def _finish_failed(self, i: int, stream: int) -> None:
        self.failed += 1
        self.done += 1
        self._next_turn(stream, self.now)

    # ---- routing (as Node._route builds its candidates) ---------------------------

    def _route(self, node: _Node, job: _Job) -> tuple[int, str]:
        """The entry node's decision: `routing.decide` on the candidates `Node._route` builds.

        Only candidates that can change the outcome are passed (see `_zmesh_candidates`,
        `_least_loaded_candidates`); the decision is the one the full list gives.
        """
        cost = self.cost
        tokens, ids = job.tokens, job.ids
        service = node.service_ewma or cost.service_s(len(tokens), 1)
        paper = self.policy == PAPER
        local_match = node.cache.match(tokens)
        if self.cfg.pending_prefixes:
            queued = list(node.queue) + ([node.running] if node.running is not None else [])
            local_match = max(local_match, self._pending_match(ids, queued))
        local = local_candidate(
            node.name,
            local_match,
            0 if paper else self._queue_depth(node),
            0.0 if paper else self._backlog(node),
            cost.prefill_s_per_token,
            service,
        )
        view = self.views[self.view_of[node.idx]]
        policy = self.policy
        if policy in ("zmesh", PAPER):
            cands = self._zmesh_candidates(node, view, job, local)
        elif policy == "least_loaded":
            cands = self._least_loaded_candidates(node, view, local)
        else:
            cands = [local, *(c for c in self._static_candidates(view) if c.node_id != node.name)]
        bs = self.cfg.block_size
        head = head_key(ids, tokens, bs, self.cfg.hash_prefix_tokens)
        req = RouteRequest(
            prompt_tokens=len(tokens), hops=0, head_key=head, block_ids=ids, block_size=bs
        )
        if self.cfg.verify:
            self._verify(node, view, job, local, req, cands)
        d = decide(req, cands, self.settings, node.policy_state)
        self.reasons[d.reason] = self.reasons.get(d.reason, 0) + 1
        target = self.by_name[d.target]
        if self.cfg.diagnose:
            picked = next(c for c in cands if c.node_id == d.target)
            self._note_pick(job, target, picked.queue_depth == 0)
        return target, d.reason

    # ---- diagnosis -----------------------------------------------------------------

    def _best_match(self, job: _Job) -> None:
        """The longest prefix of the prompt that any node's real cache holds, and where."""
        best, where = 0, []
        for n in self.nodes:
            if n.alive:
                m = n.cache.match(job.tokens)
                if m > best:
                    best, where = m, [n.idx]
                elif m == best and best > 0:
                    where.append(n.idx)
        job.best, job.best_nodes = min(best, len(job.tokens) - 1), tuple(where)

    def _note_pick(self, job: _Job, target: int, looked_idle: bool) -> None:
        """Count a decision for a node the load picture called idle, and whether it was."""
        if not looked_idle:
            return
        self.idle_picks += 1
        t = self.nodes[target]
        if self._queue_depth(t) + t.incoming > 0:
            self.stale_idle += 1
        key = (job.sent_at, target)
        self.idle_sent[key] = self.idle_sent.get(key, 0) + 1

    def _note_done(self, job: _Job, node: _Node) -> None:
        row = self.by_reason.setdefault(job.reason or "?", [0, 0, 0, 0.0])
        row[0] += 1
        if job.best > 0 and node.idx not in job.best_nodes:
            row[1] += 1
        row[2] += max(job.best - job.cached, 0)
        row[3] += self.ttft[job.index]

    def _diagnosis(self) -> dict[str, Any]:
        prefill = self.cost.prefill_s_per_token
        reasons = {}
        for reason, (n, away, lost, ttft) in sorted(self.by_reason.items()):
            reasons[reason] = {
                "requests": int(n),
                "away_from_best_match": int(away),
                "tokens_lost": int(lost),
                "prefill_lost_s": round(lost * prefill, 3),
                "ttft_mean_s": round(ttft / n, 4) if n else 0.0,
            }
        herds = [k for k in self.idle_sent.values() if k >= 2]
        return {
            "by_reason": reasons,
            "idle_picks": self.idle_picks,
            "idle_picks_already_busy": self.stale_idle,
            "herds": len(herds),
            "herded_requests": sum(herds),
        }

    def _verify(
        self,
        node: _Node,
        view: _View,
        job: _Job,
        local: Candidate,
        req: RouteRequest,
        pruned: list[Candidate],
    ) -> None:
        """Decide on every alive peer too, built as `Node._route` builds them (tests)."""
        if self.policy not in ("zmesh", PAPER, "least_loaded"):
            return
        if self.limit and len(view.alive) > self.limit:
            return  # a sampled subset: nothing exact to compare with
        full = [local]
        bs = self.cfg.block_size
        for p, est in self._candidate_peers(view, node.idx, job.ids):
            full.append(
                peer_candidate(
                    est,
                    est.match_blocks(job.ids) * bs,
                    inflight=node.inflight.get(p, 0),
                    unreported_s=self._unreported_s(node, p, est),
                    link_delay_s=self._measured_delay(node.idx, p),
                    prefill_s_per_token=local.prefill_s_per_token,
                    service_s=local.service_s,
                )
            )
        state = PolicyState.seeded(0)
        a = decide(req, pruned, self.settings, state)
        b = decide(req, full, self.settings, state)
        self.checked.append(((a.target, a.reason), (b.target, b.reason)))

    def _pending_match(self, ids: list[int], jobs: list[_Job]) -> int:
        """Tokens of the longest block prefix shared with any of ``jobs``."""
        best = 0
        for j in jobs:
            n = 0
            for a, b in zip(ids, j.ids, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best * self.cfg.block_size

    def _unreported_s(self, node: _Node, p: int, est: PeerEstimate) -> float:
        return unreported_s(
            ((f.fwd_sent, f.fwd_cost) for f in node.fwd_out.get(p, ())), est.last_heard
        )

    def _peer_load(self, node: _Node, p: int, est: PeerEstimate) -> tuple[int, float]:
        """(queue, wait) as `peer_candidate` makes them: heard load + our own forwards."""
        return est.queue_depth + node.inflight.get(p, 0), est.backlog_s + self._unreported_s(
            node, p, est
        )

    def _zmesh_candidates(
        self, node: _Node, view: _View, job: _Job, local: Candidate
    ) -> list[Candidate]:
        """Local plus the peers that can win (`candidates.contenders`)."""
        ids = job.ids
        me = node.idx
        peers = self._candidate_peers(view, me, ids)
        paper = self.policy == PAPER
        prompt = len(job.tokens)
        bs = self.cfg.block_size
        prefill = self.cost.prefill_s_per_token
        # Exact mode reads every peer's match off the index; a subset asks each estimate.
        exact = len(peers) + 1 >= len(view.alive)
        use_index = view.holders is not None and exact
        matches = self._index_matches(view.holders, ids) if use_index else None  # type: ignore[arg-type]
        mget = matches.get if matches is not None else None
        fwd_out = node.fwd_out
        inflight = node.inflight
        link = 0.0 if paper else self._mean_delay
        spread = self.cfg.delay_spread > 0
        pending = self.cfg.pending_prefixes
        rows = []
        for p, est in peers:
            m = mget(p, 0) if mget is not None else est.match_blocks(ids)
            if pending and p in fwd_out:
                m = max(m, self._pending_match(ids, fwd_out[p]) // bs)
            if paper:
                q, wait = 0, 0.0
            else:
                q = est.queue_depth
                wait = est.backlog_s
                if inflight:
                    q += inflight.get(p, 0)
                    if p in fwd_out:
                        q, wait = self._peer_load(node, p, est)
                if spread:
                    link = self._measured_delay(me, p)
            pf = est.prefill_s_per_token or prefill
            missing = prompt - min(m * bs, prompt)
            score = row_estimate_s(link, wait, missing, pf)
            rows.append(PeerRow(m, q, score, est.node_id, (p, est), wait, link, pf))
        cands = [local]
        service = local.service_s
        for row in contenders(rows, local, prompt, self.settings):
            est = row.ref[1]  # type: ignore[index]
            # The real estimate's match; the index only told us which peers to look at.
            matched = est.match_blocks(ids) * bs if use_index and not pending else row.blocks * bs
            cands.append(
                Candidate(
                    row.node_id,
                    False,
                    matched,
                    row.queue,
                    row.link_s,
                    row.prefill_s_per_token,
                    est.service_s or service,
                    True,
                    row.wait_s,
                )
            )
        return cands

    def _least_loaded_candidates(
        self, node: _Node, view: _View, local: Candidate
    ) -> list[Candidate]:
        """Local plus the least-queued peer (lowest id on ties): the only one that can win."""
        best: tuple[int, str, int, PeerEstimate, float] | None = None
        for p, est in self._candidate_peers(view, node.idx, []):
            q, wait = self._peer_load(node, p, est)
            if best is None or q < best[0] or (q == best[0] and est.node_id < best[1]):
                best = (q, est.node_id, p, est, wait)
        if best is None:
            return [local]
        _, _, p, est, _ = best
        peer = peer_candidate(
            est,
            0,
            inflight=node.inflight.get(p, 0),
            unreported_s=self._unreported_s(node, p, est),
            link_delay_s=self._measured_delay(node.idx, p),
            prefill_s_per_token=local.prefill_s_per_token,
            service_s=local.service_s,
        )
        return [local, peer]

    def _static_candidates(self, view: _View) -> list[Candidate]:
        """Every alive node as a load- and cache-blind candidate (random, round robin, hash).

        Those policies read only the candidates' ids; the list is rebuilt when the set
        of alive nodes changes.
        """
        key = tuple(p for p, _ in view.alive)
        if view.static_key != key:
            c = self.cost
            view.static_key = key
            view.static = [
                Candidate(
                    est.node_id,
                    False,
                    0,
                    0,
                    self.cfg.delay_s,
                    c.prefill_s_per_token,
                    c.base_s,
                    True,
                    0.0,
                )
                for _, est in view.alive
            ]
        return view.static

    def _candidate_peers(
        self, view: _View, me: int, ids: list[int]
    ) -> list[tuple[int, PeerEstimate]]:
        """Every alive peer; above ``max_candidates`` (zmesh, paper): a documented subset.

        The subset is the peers whose estimates hold the longest prefixes of the prompt
        (half of it, from the shared estimates' index) and a uniform random sample of
        the others, so load can still be balanced (power of d choices).
        """
        alive = view.alive
        if not self.limit or len(alive) <= self.limit or not self.uses_matches:
            return [pe for pe in alive if pe[0] != me]
        table = view.table
        names = self.names
        chosen: dict[int, PeerEstimate] = {}
        if view.holders is not None:
            want = self.limit // 2
            for p in self._best_holders(view.holders, ids, want + 1):
                if p != me:
                    est = table.get(names[p])
                    if est is not None and est.state is PeerState.ALIVE:
                        chosen[p] = est
                if len(chosen) >= want:
                    break
        # A uniform sample of the rest (power of d choices for load).
        rand = self.rng.random
        n_alive = len(alive)
        for _ in range(2 * self.limit):
            if len(chosen) >= self.limit:
                break
            p, est = alive[int(rand() * n_alive)]
            if p != me and p not in chosen:
                chosen[p] = est
        return list(chosen.items())

    @staticmethod
    def _index_matches(holders: dict[int, set[int]], ids: list[int]) -> dict[int, int]:
        """node -> leading ``ids`` in its estimate, for every node with at least one."""
        out: dict[int, int] = {}
        if not ids:
            return out
        cur = holders.get(ids[0])
        if not cur:
            return out
        for i in range(1, len(ids)):
            h = holders.get(ids[i])
            nxt = cur & h if h else set()
            if len(nxt) != len(cur):
                for p in cur - nxt:
                    out[p] = i
            if not nxt:
                return out
            cur = nxt
        for p in cur:
            out[p] = len(ids)
        return out

    @staticmethod
    def _best_holders(holders: dict[int, set[int]], ids: list[int], k: int) -> list[int]:
        """Up to ``k`` nodes whose estimates hold the longest prefixes of ``ids``."""
        # Estimates are prefix-closed: the held levels are a prefix of ids; bisect it.
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if holders.get(ids[mid - 1]):
                lo = mid
            else:
                hi = mid - 1
        depth = lo
        out: list[int] = []
        seen: set[int] = set()
        for level in range(depth - 1, -1, -1):
            held = holders[ids[level]]
            if len(held) <= len(out):
                continue  # prefix-closed sets: no one new at this level
            for h in held:
                if h not in seen:
                    seen.add(h)
                    out.append(h)
                    if len(out) >= k:
                        return out
        return out

    def _queue_depth(self, node: _Node) -> int:
        return queue_depth(len(node.queue), node.running is not None)

    def _backlog(self, node: _Node) -> float:
        running = node.running
        predicted = running.predicted if running is not None else None
        return backlog_s(node.queued_s, predicted, self.now - node.running_since)

    def _predict(self, new_tokens: int, max_tokens: int) -> float:
        # Answers here always run to max_tokens: no completion-length estimate.
        c = self.cost
        return predict_s(new_tokens, max_tokens, c.prefill_s_per_token, c.decode_s_per_token)

    # ---- forwarding ---------------------------------------------------------------

    def _forward(self, node: _Node, job: _Job, target: int) -> None:
        job.forwarded = True
        job.fwd_sent = self.now
        job.node = target
        view = self.views[self.view_of[node.idx]]
        est = view.table.get(self.names[target])
        matched = est.match_blocks(job.ids) * self.cfg.block_size if est is not None else 0
        mt = self.workload.requests[job.index].max_tokens
        job.fwd_cost = self._predict(len(job.tokens) - matched, mt)
        node.inflight[target] = node.inflight.get(target, 0) + 1
        node.fwd_out.setdefault(target, []).append(job)
        self.nodes[target].incoming += 1
        self._push(self.now + self._delay(node.idx, target), _FWD, job, self.nodes[target].gen)
        if not self.cfg.forward_keepalive:
            self._push(self.now + self.cfg.forward_timeout_s, _FWD_TIMEOUT, job, None)

    def _forward_over(self, job: _Job) -> None:
        """The entry's forward bookkeeping ends (answer relayed, or fell back)."""
        entry = self.nodes[job.entry]
        t = job.node
        left = entry.inflight.get(t, 0) - 1
        if left > 0:
            entry.inflight[t] = left
        else:
            entry.inflight.pop(t, None)
        lst = entry.fwd_out.get(t)
        if lst is not None:
            with contextlib.suppress(ValueError):
                lst.remove(job)
            if not lst:
                del entry.fwd_out[t]

    def _on_fwd(self, job: _Job, gen: int) -> None:
        target = self.nodes[job.node]
        target.incoming = max(target.incoming - 1, 0)
        if job.state != _WAIT:
            return  # fell back already, or its entry died
        if not target.alive or target.gen != gen:
            return  # lost with the node: the entry falls back on timeout or suspicion
        self._enqueue(target, job)

    def _fallback(self, job: _Job) -> None:
        """Serve a forwarded request at its entry (the peer failed or timed out)."""
        if job.state in (_FINISHED, _DROPPED) or not job.forwarded:
            return
        target = self.nodes[job.node]
        if job.state == _QUEUED:
            try:
                target.queue.remove(job)
                target.queued_s = max(target.queued_s - job.predicted, 0.0)
            except ValueError:
                pass
        # A running one keeps running (a prefill cannot be cancelled); its answer is dropped.
        job.state = _DROPPED
        self._forward_over(job)
        self.fallbacks += 1
        entry = self.nodes[job.entry]
        if not entry.alive:
            self._finish_failed(job.index, job.stream)
            return
        retry = job.retry_at(entry.idx)
        retry.reason = "fallback"
        self._enqueue(entry, retry)

    def _on_fwd_timeout(self, job: _Job, _: Any) -> None:
        if job.state in (_FINISHED, _DROPPED):
            return
        if job.state == _RUNNING and job.first_at + job.ret_delay <= self.now:
            return  # its first token reached the entry in time
        self._fallback(job)

    # ---- serving ------------------------------------------------------------------

    def _enqueue(self, node: _Node, job: _Job) -> None:
        if len(node.queue) >= self.cfg.max_queue:
            if job.forwarded:
                self._fallback(job)
            else:
                self.rejected += 1
                job.state = _DROPPED
                self._finish_failed(job.index, job.stream)
            return
        mt = self.workload.requests[job.index].max_tokens
        job.predicted = self._predict(len(job.tokens) - node.cache.match(job.tokens), mt)
        job.state = _QUEUED
        node.queue.append(job)
        node.queued_s += job.predicted
        self._load_changed(node)
        if node.running is None:
            self._start_next(node)

    def _start_next(self, node: _Node) -> None:
        while node.queue:
            job = node.queue.popleft()
            node.queued_s = max(node.queued_s - job.predicted, 0.0)
            if job.state != _QUEUED:
                continue
            self._start(node, job)
            return
        node.running = None

    def _start(self, node: _Node, job: _Job) -> None:
        job.state = _RUNNING
        job.run_node = node.idx
        node.running = job
        node.running_since = self.now
        claim = node.cache.claim(job.tokens)
        job.claim = claim
        job.cached = claim.reuse
        mt = self.workload.requests[job.index].max_tokens
        cost = self.cost
        ttft = cost.ttft_s(len(job.tokens) - claim.reuse)
        service = ttft + max(mt - 1, 0) * cost.decode_s_per_token
        if self.cfg.service_noise > 0:
            f = self.noise_rng.lognormvariate(0.0, self.cfg.service_noise)
            ttft *= f
            service *= f
        job.first_at = self.now + ttft
        if job.forwarded:
            job.ret_delay = self._delay(node.idx, job.entry)
        self._load_changed(node)
        self._cache_changed(node)
        self._push(self.now + service, _DONE, job, node.gen)

    def _on_done(self, job: _Job, gen: int) -> None:
        node = self.nodes[job.run_node]
        if node.gen != gen or node.running is not job:
            return  # the node crashed meanwhile
        mt = self.workload.requests[job.index].max_tokens
        tail = tuple(-next(self._tail) for _ in range(max(mt - 1, 0)))
        seq = job.tokens + tail
        ids = job.ids
        n_full = len(seq) // self.cfg.block_size
        if n_full > len(ids):
            more = (
                self.hasher.block_ids(seq, len(ids), ids[-1]) if ids else self.hasher.block_ids(seq)
            )
            ids = ids + more
        node.cache.finish(job.claim.slot, seq, ids, self.now)
        node.service_ewma = ewma(node.service_ewma, self.now - node.running_since)
        node.served += 1
        node.running = None
        self._cache_changed(node)
        self._load_changed(node)
        if job.state == _RUNNING:
            self._complete(job, node)
        self._start_next(node)

    def _complete(self, job: _Job, node: _Node) -> None:
        job.state = _FINISHED
        job.done_at = self.now
        i = job.index
        self.ttft[i] = job.first_at + job.ret_delay - job.sent_at
        self.e2e[i] = self.now + job.ret_delay - job.sent_at
        self.served_by[i] = node.idx
        self.cached[i] = job.cached
        self.forwarded[i] = job.forwarded
        if self.cfg.diagnose:
            self._note_done(job, node)
        if job.forwarded:
            self._forward_over(job)
        self.done += 1
        self._stream_step(job, self.now + job.ret_delay)

    # ---- gossip --------------------------------------------------------------------

    def _load_changed(self, node: _Node) -> None:
        node.load_changed = True
        self._schedule_flush(node)

    def _cache_changed(self, node: _Node) -> None:
        self._schedule_flush(node)

    def _schedule_flush(self, node: _Node) -> None:
        if node.flush_pending or not node.alive:
            return
        node.flush_pending = True
        ds = self.cfg.delta_s
        k = math.floor((self.now - node.phase) / ds) + 1
        self._push(node.phase + k * ds, _FLUSH, node.idx, node.gen)

    def _drain(self, node: _Node) -> None:
        ev = node.cache.drain_events()
        if ev:
            node.advert.apply(ev.added, ev.removed)

    def _flush_deltas(self, node: _Node) -> None:
        self._drain(node)
        while (batch := node.advert.flush()) is not None:
            self._send(node, (1, node.epoch, batch.seq, batch.added, batch.removed))

    def _on_flush(self, idx: int, gen: int) -> None:
        node = self.nodes[idx]
        if node.gen != gen or not node.alive:
            return
        node.flush_pending = False
        self._flush_deltas(node)
        if node.load_changed:
            node.load_changed = False
            self._send(node, self._heartbeat(node))

    def _heartbeat(self, node: _Node) -> tuple[Any, ...]:
        a = node.advert
        return (
            0,
            node.epoch,
            a.seq,
            a.digest,
            a.n_blocks,
            self._queue_depth(node),
            self._backlog(node),
            node.service_ewma,
        )

    def _on_hb(self, idx: int, gen: int) -> None:
        node = self.nodes[idx]
        if node.gen != gen or not node.alive:
            return
        self._flush_deltas(node)
        node.load_changed = False
        self._send(node, self._heartbeat(node))
        self._push(self.now + self.cfg.heartbeat_s, _HB, idx, gen)

    def _send(self, node: _Node, msg: tuple[Any, ...]) -> None:
        loss = self.cfg.loss
        src = node.idx
        for v, view in enumerate(self.views):
            if view.owner == src:
                continue
            if loss and self.net_rng.random() < loss:
                if msg[0] == 1:
                    self.deltas_lost += 1
                continue
            dst = view.owner if view.owner >= 0 else src
            key = (src, v)
            t = self.now + self._delay(src, dst)
            last = self._fifo.get(key, 0.0)
            if t < last:
                t = last  # one TCP connection per link: messages arrive in order
            self._fifo[key] = t
            self._push(t, _DELIVER, v, (src, msg))

    def _on_deliver(self, v: int, payload: tuple[int, tuple[Any, ...]]) -> None:
        src, msg = payload
        view = self.views[v]
        table = view.table
        name = self.names[src]
        now = self.now
        if msg[0] == 0:
            _, epoch, seq, digest, n_blocks, queue, backlog, service = msg
            new = table.upsert(name, "", "", now)
            est = table.get(name)
            assert est is not None
            was_alive = not new and est.state.value == "alive"
            before = est.blocks
            action = est.on_heartbeat(
                epoch=epoch,
                seq=seq,
                digest=digest,
                n_blocks=n_blocks,
                now=now,
                queue_depth=queue,
                busy_slots=0,
                n_slots=self.cfg.n_slots,
                prefill_s_per_token=self.cost.prefill_s_per_token,
                service_s=service,
                backlog_s=backlog,
            )
            if not was_alive:
                self._refresh_alive(view)
            if est.blocks is not before:
                self._reindex(view, src, est)
            self._maybe_resync(view, v, src, est, action)
            return
        _, epoch, seq, added, removed = msg
        est = table.get(name)
        if est is None:
            return
        before = est.blocks
        action = est.on_delta(epoch, seq, added, removed, now)
        if view.holders is not None:
            if est.blocks is not before:
                self._reindex(view, src, est)
            elif action.kind == OK:
                self._index_delta(view, src, est, added, removed)
        self._maybe_resync(view, v, src, est, action)

    def _maybe_resync(self, view: _View, v: int, src: int, est: PeerEstimate, action: Any) -> None:
        if action.kind != NEED_SNAPSHOT or not est.should_request_snapshot(self.now):
            return
        rid = f"s{next(self._rid)}"
        est.begin_snapshot(rid, self.now)
        self.snapshots += 1
        dst = view.owner if view.owner >= 0 else src
        self._push(self.now + self._delay(dst, src), _SNAPREQ, src, (v, rid))

    def _on_snapreq(self, src: int, payload: tuple[int, str]) -> None:
        v, rid = payload
        node = self.nodes[src]
        if not node.alive:
            return  # lost; the estimate asks again after snapshot_timeout_s
        self._flush_deltas(node)  # as Node._send_snapshot: describe exactly the published seq
        parts = node.advert.snapshot_parts(DEFAULT_SNAPSHOT_PART_BLOCKS)
        view = self.views[v]
        dst = view.owner if view.owner >= 0 else src
        self._push(self.now + self._delay(src, dst), _SNAPPARTS, v, (src, rid, node.epoch, parts))

    def _on_snapparts(self, v: int, payload: tuple[int, str, int, list[Any]]) -> None:
        src, rid, epoch, parts = payload
        view = self.views[v]
        est = view.table.get(self.names[src])
        if est is None:
            return
        for part in parts:
            before = est.blocks
            action = est.on_snapshot_part(
                rid,
                epoch,
                part.seq,
                part.part,
                part.parts,
                part.blocks,
                part.digest,
                part.n_blocks,
                self.now,
            )
            if est.blocks is not before:
                self._reindex(view, src, est)
            self._maybe_resync(view, v, src, est, action)

    def _on_tick(self, v: int, _: Any) -> None:
        view = self.views[v]
        events = view.table.tick(self.now)
        if events:
            for ev in events:
                p = self.by_name[ev.node_id]
                if ev.kind in ("suspect", "dead"):
                    self._fail_forwards_to(view, p)
                if ev.kind == "dead":
                    self._reindex(view, p, None)
            self._refresh_alive(view)
        self._push(self.now + self.cfg.heartbeat_s, _TICK, v)

    def _refresh_alive(self, view: _View) -> None:
        by_name = self.by_name
        view.alive = [(by_name[p.node_id], p) for p in view.table.alive()]

    def _fail_forwards_to(self, view: _View, peer: int) -> None:
        owners = [view.owner] if view.owner >= 0 else range(len(self.nodes))
        for o in owners:
            for job in list(self.nodes[o].fwd_out.get(peer, ())):
                self._fallback(job)

    # ---- the holder index (shared view, candidate subsets) -------------------------------

    def _index_delta(
        self,
        view: _View,
        src: int,
        est: PeerEstimate,
        added: list[tuple[int, int]],
        removed: list[int],
    ) -> None:
        holders = view.holders
        assert holders is not None
        mine = view.indexed.setdefault(src, (est.blocks, set()))[1]
        blocks = est.blocks
        for b in removed:
            if b not in blocks and b in mine:
                mine.discard(b)
                s = holders.get(b)
                if s is not None:
                    s.discard(src)
                    if not s:
                        del holders[b]
        for b, _ in added:
            if b in blocks and b not in mine:
                mine.add(b)
                holders.setdefault(b, set()).add(src)

    def _reindex(self, view: _View, src: int, est: PeerEstimate | None) -> None:
        holders = view.holders
        if holders is None:
            return
        old = view.indexed.get(src, (None, set()))[1]
        new = set(est.blocks) if est is not None else set()
        for b in old - new:
            s = holders.get(b)
            if s is not None:
                s.discard(src)
                if not s:
                    del holders[b]
        for b in new - old:
            holders.setdefault(b, set()).add(src)
        view.indexed[src] = (est.blocks if est is not None else None, new)

    # ---- failures --------------------------------------------------------------------

    def _on_fail(self, idx: int, _: Any) -> None:
        node = self.nodes[idx]
        if not node.alive or sum(n.alive for n in self.nodes) <= 1:
            return
        node.alive = False
        node.gen += 1
        lost = list(node.queue) + ([node.running] if node.running is not None else [])
        node.queue.clear()
        node.queued_s = 0.0
        node.running = None
        for job in lost:
            if job.forwarded:
                job.state = _WAIT  # its entry falls back once it notices
            else:
                job.state = _DROPPED
                self._finish_failed(job.index, job.stream)
        # Forwards this node had sent die with it (their clients were connected here).
        for lst in node.fwd_out.values():
            for job in lst:
                if job.state == _QUEUED:
                    owner = self.nodes[job.node]
                    try:
                        owner.queue.remove(job)
                        owner.queued_s = max(owner.queued_s - job.predicted, 0.0)
                    except ValueError:
                        pass
                if job.state in (_WAIT, _QUEUED, _RUNNING):
                    job.state = _DROPPED
                    self._finish_failed(job.index, job.stream)
        node.fwd_out.clear()
        node.inflight.clear()
        self._push(self.now + self.cfg.downtime_s, _RECOVER, idx)

    def _on_recover(self, idx: int, _: Any) -> None:
        node = self.nodes[idx]
        node.alive = True
        node.gen += 1
        node.flush_pending = False
        node.service_ewma = 0.0
        self._boot(node)  # a restart: empty cache, new epoch
        if self.policy == ORACLE:
            node.shadow = self._new_cache()
            node.shadow_free_at = self.now
        self._push(self.now + self.cfg.heartbeat_s * self.rng.random(), _HB, idx, node.gen)

    # ---- oracle ------------------------------------------------------------------------

    def _oracle_dispatch(self, job: _Job) -> None:
        """`zmesh.oracle.choose` on every node's mirror; its wait: when it will be free."""
        cost = self.cost
        mt = self.workload.requests[job.index].max_tokens
        alive = [n for n in self.nodes if n.alive]
        pool = alive
        if self.limit and len(alive) > self.limit:
            pool = self._oracle_pool(alive, job)
        now = self.now
        known = [
            OracleNode(
                n.name, n.idx, n.shadow, self._queue_depth(n), max(n.shadow_free_at - now, 0.0)
            )
            for n in pool
        ]
        chosen, _ = choose(
            known, job.tokens, cost.prefill_s_per_token, self.nodes[0].policy_state, self.settings
        )
        target = self.nodes[chosen.order]
        tail = tuple(-next(self._tail) for _ in range(max(mt - 1, 0)))
        claim = replay(target.shadow, job.tokens, tail, now)
        self._drain_shadow(target)
        start = max(target.shadow_free_at, now)
        target.shadow_free_at = start + cost.service_s(len(job.tokens) - claim.reuse, mt)
        job.node = target.idx
        job.reason = "oracle"
        self._enqueue(target, job)

    def _drain_shadow(self, node: _Node) -> None:
        ev = node.shadow.drain_events()
        idx = self.oracle_index
        for b in ev.removed:
            s = idx.get(b)
            if s is not None:
                s.discard(node.idx)
                if not s:
                    del idx[b]
        for b, _ in ev.added:
            idx.setdefault(b, set()).add(node.idx)

    def _oracle_pool(self, alive: list[_Node], job: _Job) -> list[_Node]:
        want = self.limit // 2
        chosen: dict[int, _Node] = {}
        for p in self._best_holders(self.oracle_index, job.ids, want):
            if self.nodes[p].alive:
                chosen[p] = self.nodes[p]
        # and the least busy nodes of a random sample (power of d choices)
        sample = self.rng.sample(alive, min(len(alive), 2 * self.limit))
        sample.sort(key=lambda n: n.shadow_free_at)
        for n in sample:
            if len(chosen) >= self.limit:
                break
            chosen.setdefault(n.idx, n)
        return list(chosen.values())

    # ---- results ---------------------------------------------------------------------

    def _result(self, wall: float) -> SimResult:
        from zmesh.workload.report import summarize

        ok = [i for i in range(len(self.ttft)) if not math.isnan(self.ttft[i])]
        per_node = [0] * self.cfg.nodes
        for i in ok:
            per_node[self.served_by[i]] += 1
        end = max((self.e2e[i] + 0.0 for i in ok), default=0.0)
        figures = summarize(
            ttft=[self.ttft[i] for i in ok],
            e2e=[self.e2e[i] for i in ok],
            prompt_tokens=[self.prompt_len[i] for i in ok],
            cached_tokens=[self.cached[i] for i in ok],
            per_node=per_node,
            wall_s=self.now if self.now > 0 else end,
            forwards=sum(self.forwarded[i] for i in ok),
            fallbacks=self.fallbacks,
            errors=self.failed,
        )
        figures["rejected"] = self.rejected
        figures["snapshots"] = self.snapshots
        figures["deltas_lost"] = self.deltas_lost
        figures["reasons"] = dict(sorted(self.reasons.items()))
        if self.cfg.diagnose:
            figures["diagnosis"] = self._diagnosis()
        figures["sim_s"] = round(self.now, 3)
        figures["events"] = self.events
        figures["wall_s"] = round(wall, 3)
        cfg = {
            k: v
            for k, v in self.cfg.__dict__.items()
            if k not in ("cost",) and not k.startswith("_")
        }
        cfg["cost"] = self.cost.as_dict()
        cfg["estimates"] = "shared" if self.shared else "per_node"
        cfg["max_candidates"] = self.limit
        return SimResult(cfg, figures, self.ttft, self.e2e, self.served_by, wall, self.events)


def simulate(
    config: SimConfig,
    workload: Workload,
    arrivals: Arrivals,
    progress: Callable[[str], None] | None = None,
) -> SimResult:
    return Simulator(config, workload, arrivals, progress).run()
