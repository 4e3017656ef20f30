"""The simulator's state and set-up (`SimBase`), which every mixin extends.

`SimBase.__init__` builds the nodes, their peer tables (one per node, or one shared
view at scale), the routing settings (a real node's defaults, this run's overrides),
the client-side entry of each request and the arrival plan. The mixins each add one
job: `arrivals`, `routing`, `serving` (forwarding, queues, crashes), `gossip` (links,
heartbeats, deltas, snapshots, the holder index), `mirror` (the oracle) and
`results`.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zmesh.blocks import BlockHasher
from zmesh.gossip import LocalAdvert
from zmesh.peers import PeerEstimate, PeerTable
from zmesh.routing import (
    ORACLE,
    PAPER,
    ZMESH,
    Candidate,
    PolicyState,
    RouteRequest,
    RoutingSettings,
)
from zmesh.sim.cache import SlotCache, TokenCache
from zmesh.sim.config import (
    FINGERPRINT,
    NO_BALANCE,
    ZMESH_SHIP,
    SimConfig,
    SimResult,
)
from zmesh.sim.state import Job, SimNode, View
from zmesh.sim.tokens import PromptTable
from zmesh.workload import Arrivals, Workload


class SimBase:
    """The simulator's state and set-up; each mixin adds one job's events and rules."""

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
        self.hasher = BlockHasher(FINGERPRINT, "default", cfg.block_size)
        self.prompts = PromptTable(workload, self.hasher)
        self.names = [f"n{i}" for i in range(cfg.nodes)]
        self.by_name = {n: i for i, n in enumerate(self.names)}
        # zmesh_ship is the zmesh policy with shipping on; the rest route as named.
        self.policy = ZMESH if cfg.policy == ZMESH_SHIP else cfg.policy
        # A real node's routing defaults (RoutingSettings'), then this run's overrides.
        # Without keep-alives a node gives a forward up after forward_timeout_s, so it
        # does not forward where it expects to wait longer than that.
        give_up = 0.0 if cfg.forward_keepalive else cfg.forward_timeout_s
        ship = {"ship": True} if cfg.policy == ZMESH_SHIP else {}
        overrides = {
            "give_up_s": give_up,
            "ship_max_tokens": cfg.ship_max_tokens,
            **ship,
            **cfg.routing,
        }
        if cfg.policy in (PAPER, ORACLE):
            # Neither has thresholds, a balance rule or placement; `contenders` prunes
            # the paper's candidates by these.
            overrides.update(
                min_gain_s=0.0,
                min_gain_frac=0.0,
                balance_abs=NO_BALANCE,
                place_slack_frac=0.0,
                give_up_s=0.0,
                admission=False,
            )
        self.settings = RoutingSettings(policy=self.policy, **overrides)
        self.uses_matches = self.policy in (ZMESH, PAPER)
        self.limit = cfg.candidate_limit()
        self.shared = cfg.shared_estimates() or self.limit > 0
        self.nodes = [SimNode(i, n) for i, n in enumerate(self.names)]
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
        self.views: list[View] = []
        if self.shared:
            table = PeerTable(
                "@mesh", cfg.suspect_after_s, cfg.dead_after_s, cfg.snapshot_timeout_s
            )
            self.views.append(View(-1, table, index=True))
            self.view_of = [0] * cfg.nodes
        else:
            for node in self.nodes:
                t = PeerTable(
                    node.name, cfg.suspect_after_s, cfg.dead_after_s, cfg.snapshot_timeout_s
                )
                self.views.append(View(node.idx, t, index=False))
            self.view_of = list(range(cfg.nodes))
        # The oracle's exact mirror of each node: its cache after every request already
        # dispatched there, and when the node will be free.
        self.oracle_index: dict[int, set[int]] = {}
        if cfg.policy == ORACLE:
            for node in self.nodes:
                node.shadow = self._new_cache()
                node.shadow_free = [0.0] * cfg.max_running
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
        # KV shipping: counts, and when each direction of a link is free (shipping.py).
        self.ship_stats = {"pulls": 0, "imported": 0, "failed": 0, "tokens": 0, "bytes": 0.0}
        self.link_free: dict[tuple[int, int], float] = {}
        self.refusals = 0  # forwards a peer refused as busy (admission)
        self._refused: tuple[int, ...] = ()  # peers that refused the request being routed
        self.failed = 0
        self.rejected = 0
        self.reasons: dict[str, int] = {}
        # diagnose: per final reason [requests, away from the best match, tokens lost, ttft]
        self.by_reason: dict[str, list[float]] = {}
        self.idle_picks = 0  # decisions whose target the picture called idle
        self.stale_idle = 0  # ... while it already had work (queued, running, on its way)
        self.idle_sent: dict[tuple[float, int], int] = {}  # (arrival instant, node) -> picks
        self.herd_queued = 0  # forwards queued behind their instant's other entries' requests
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

    def _new_cache(self) -> SlotCache | TokenCache:
        if self.cfg.cache == "slots":
            return SlotCache(self.cfg.n_slots, self.hasher)
        return TokenCache(self.cfg.cache_tokens, self.hasher)

    def _boot(self, node: SimNode) -> None:
        node.cache = self._new_cache()
        node.epoch = self.rng.getrandbits(62)
        node.advert = LocalAdvert(node.epoch)

    def _push(self, t: float, kind: int, a: Any = None, b: Any = None) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, a, b))

    if TYPE_CHECKING:
        # What the mixins (gossip, arrivals, routing, serving, mirror, results) provide.
        def _base_delay(self, a: int, b: int) -> float: ...
        def _delay(self, a: int, b: int) -> float: ...
        def _measured_delay(self, a: int, b: int) -> float: ...
        def _load_changed(self, node: SimNode) -> None: ...
        def _cache_changed(self, node: SimNode) -> None: ...
        def _schedule_flush(self, node: SimNode) -> None: ...
        def _drain(self, node: SimNode) -> None: ...
        def _flush_deltas(self, node: SimNode) -> None: ...
        def _on_flush(self, idx: int, gen: int) -> None: ...
        def _heartbeat(self, node: SimNode) -> tuple[Any, ...]: ...
        def _on_hb(self, idx: int, gen: int) -> None: ...
        def _send(self, node: SimNode, msg: tuple[Any, ...]) -> None: ...
        def _on_deliver(self, v: int, payload: tuple[int, tuple[Any, ...]]) -> None: ...
        def _maybe_resync(
            self, view: View, v: int, src: int, est: PeerEstimate, action: Any
        ) -> None: ...
        def _on_snapreq(self, src: int, payload: tuple[int, str]) -> None: ...
        def _on_snapparts(self, v: int, payload: tuple[int, str, int, list[Any]]) -> None: ...
        def _on_tick(self, v: int, _: Any) -> None: ...
        def _refresh_alive(self, view: View) -> None: ...
        def _fail_forwards_to(self, view: View, peer: int) -> None: ...
        def _index_delta(
            self,
            view: View,
            src: int,
            est: PeerEstimate,
            added: list[tuple[int, int]],
            removed: list[int],
        ) -> None: ...
        def _reindex(self, view: View, src: int, est: PeerEstimate | None) -> None: ...
        def _start_arrivals(self) -> None: ...
        def _open_next(self) -> None: ...
        def _on_open(self, s: int, _: Any) -> None: ...
        def _launch_stream(self, t: float) -> None: ...
        def _on_stream(self, s: int, _: Any) -> None: ...
        def _stream_step(self, job: Job, client_time: float) -> None: ...
        def _next_turn(self, s: int, client_time: float) -> None: ...
        def _on_arrive(self, i: int, stream: int) -> None: ...
        def _finish_failed(self, i: int, stream: int) -> None: ...
        def _route(self, node: SimNode, job: Job) -> tuple[int, str]: ...
        def _verify(
            self,
            node: SimNode,
            view: View,
            job: Job,
            local: Candidate,
            req: RouteRequest,
            pruned: list[Candidate],
        ) -> None: ...
        def _pending_match(self, ids: list[int], jobs: list[Job]) -> int: ...
        def _unreported_s(self, node: SimNode, p: int, est: PeerEstimate) -> float: ...
        def _peer_load(self, node: SimNode, p: int, est: PeerEstimate) -> tuple[int, float]: ...
        def _zmesh_candidates(
            self, node: SimNode, view: View, job: Job, local: Candidate
        ) -> list[Candidate]: ...
        def _least_loaded_candidates(
            self, node: SimNode, view: View, local: Candidate
        ) -> list[Candidate]: ...
        def _static_candidates(self, view: View) -> list[Candidate]: ...
        def _candidate_peers(
            self, view: View, me: int, ids: list[int]
        ) -> list[tuple[int, PeerEstimate]]: ...
        @staticmethod
        def _index_matches(holders: dict[int, set[int]], ids: list[int]) -> dict[int, int]: ...
        @staticmethod
        def _best_holders(holders: dict[int, set[int]], ids: list[int], k: int) -> list[int]: ...
        def _queue_depth(self, node: SimNode) -> int: ...
        def _backlog(self, node: SimNode) -> float: ...
        def _predict(self, new_tokens: int, max_tokens: int, batch: int = 1) -> float: ...
        def _advance(self, node: SimNode) -> None: ...
        def _reschedule(self, node: SimNode) -> None: ...
        def _batch_event(self, node: SimNode, job: Job) -> bool: ...
        def _forward(self, node: SimNode, job: Job, target: int) -> None: ...
        def _forward_over(self, job: Job) -> None: ...
        def _on_fwd(self, job: Job, gen: int) -> None: ...
        def _refuses(self, node: SimNode, job: Job) -> bool: ...
        def _on_refused(self, job: Job, _: Any) -> None: ...
        def _fallback(self, job: Job) -> None: ...
        def _on_fwd_timeout(self, job: Job, _: Any) -> None: ...
        def _enqueue(self, node: SimNode, job: Job) -> None: ...
        def _start_next(self, node: SimNode) -> bool: ...
        def _start(self, node: SimNode, job: Job) -> None: ...
        def _on_done(self, job: Job, gen: int) -> None: ...
        def _complete(self, job: Job, node: SimNode) -> None: ...
        def _on_fail(self, idx: int, _: Any) -> None: ...
        def _on_recover(self, idx: int, _: Any) -> None: ...
        def _ship_terms(self, me: int, holder: int, link_s: float) -> tuple[float, float]: ...
        def _start_pull(self, node: SimNode, job: Job, holder: int, tokens: int) -> None: ...
        def _on_kv_fetch(self, job: Job, gen: int) -> None: ...
        def _on_kv_ready(self, job: Job, n: int) -> None: ...
        def _wait_for_pull(self, node: SimNode, job: Job) -> None: ...
        def _import_pull(self, node: SimNode, job: Job) -> float: ...
        def _ship_figures(self) -> dict[str, Any]: ...
        def _export(self, holder: SimNode, back: int, n: int) -> float: ...
        def _maybe_push(self, node: SimNode) -> None: ...
        def _push_figures(self) -> dict[str, Any]: ...
        def _oracle_dispatch(self, job: Job) -> None: ...
        def _drain_shadow(self, node: SimNode) -> None: ...
        def _oracle_pool(self, alive: list[SimNode], job: Job) -> list[SimNode]: ...
        def _best_match(self, job: Job) -> None: ...
        def _note_pick(self, job: Job, target: int, looked_idle: bool) -> None: ...
        def _note_done(self, job: Job, node: SimNode) -> None: ...
        def _note_herd(self, node: SimNode, job: Job) -> None: ...
        def _diagnosis(self) -> dict[str, Any]: ...
        def _result(self, wall: float) -> SimResult: ...
