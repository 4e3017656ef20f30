"""One peer's estimate: its liveness, load, link delay and a mirror of its advertised
block set, kept exact by deltas and repaired by snapshots. Sans-IO (see zmesh/peers/).

A `PeerEstimate` mirrors one peer's advertised block set (``id -> parent``) at
``(epoch, seq)``. It is ``synced`` only while it is known to equal the peer's set at
that seq; then in-order deltas keep it exact. Anything else - first contact, a new
epoch (restart), a seq gap (lost delta), a heartbeat whose digest disagrees at the same
seq - returns `NEED_SNAPSHOT` with a reason. The stale blocks stay usable for routing
meanwhile: a stale estimate costs a cache miss, never a wrong answer.

Snapshot repair: `begin_snapshot` marks the estimate unsynced; from then on deltas are
buffered (bounded). When every part of that request has arrived, the snapshot taken at
seq S replaces the estimate if its digest and count check out, and the buffered deltas
S+1, S+2, ... of the same epoch are applied in order.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from zmesh.gossip import set_digest

# Action kinds.
OK = "ok"  # applied
IGNORED = "ignored"  # old, duplicate or stale input: nothing to do
PENDING = "pending"  # kept for later: a buffered delta or part of a snapshot
NEED_SNAPSHOT = "need_snapshot"  # ask the peer for a snapshot (if should_request_snapshot)

DEFAULT_BUFFER_LIMIT = 1024  # deltas kept while a snapshot is in flight
RTT_ALPHA = 0.2  # EWMA weight of a new link-delay sample
_MISSING = -1  # never a block id (ids are unsigned)


@dataclass(frozen=True, slots=True)
class Action:
    """What the node should do after feeding an input to an estimate."""

    kind: str
    reason: str = ""


_APPLIED = Action(OK)
_OLD = Action(IGNORED, "old")
_STALE = Action(IGNORED, "stale")
_BUFFERED = Action(PENDING, "buffered")
_PARTIAL = Action(PENDING, "partial")


class PeerState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"  # silent too long, or only heard of: not routed to
    DEAD = "dead"  # estimate dropped


@dataclass(frozen=True, slots=True)
class _SnapshotMeta:
    epoch: int
    seq: int
    parts: int
    digest: int
    n_blocks: int


class PeerEstimate:
    """One peer: addresses, liveness, load, link delay and its estimated block set."""

    __slots__ = (
        "_buffer",
        "_ever_synced",
        "_parts",
        "_snap_at",
        "_snap_meta",
        "_snap_rid",
        "backlog_s",
        "blocks",
        "buffer_limit",
        "busy_slots",
        "digest",
        "epoch",
        "evict_tokens",
        "gossip_addr",
        "inflight",
        "last_delta_at",
        "last_heard",
        "learned_at",
        "link_delay_s",
        "n_slots",
        "node_id",
        "places",
        "prefill_s_per_token",
        "queue_depth",
        "reported_state",
        "seq",
        "serve_addr",
        "service_s",
        "snapshot_timeout_s",
        "state",
        "synced",
    )

    def __init__(
        self,
        node_id: str,
        serve_addr: str = "",
        gossip_addr: str = "",
        *,
        now: float = 0.0,
        heard: bool = True,
        snapshot_timeout_s: float = 5.0,
        buffer_limit: int = DEFAULT_BUFFER_LIMIT,
    ) -> None:
        self.node_id = node_id
        self.serve_addr = serve_addr
        self.gossip_addr = gossip_addr
        self.snapshot_timeout_s = snapshot_timeout_s
        self.buffer_limit = buffer_limit
        # estimate
        self.epoch: int | None = None
        self.seq = 0
        self.blocks: dict[int, int] = {}
        self.digest = 0
        self.synced = False
        self._ever_synced = False
        # liveness: a peer only heard of (another peer's list) is not routable yet
        self.learned_at = now
        self.last_heard: float | None = now if heard else None
        self.last_delta_at: float | None = None
        self.state = PeerState.ALIVE if heard else PeerState.SUSPECT
        self.reported_state = self.state  # last state announced by PeerTable.tick
        # load (0 / 0.0: not reported yet)
        self.queue_depth = 0
        self.busy_slots = 0
        self.n_slots = 0
        self.prefill_s_per_token = 0.0
        self.service_s = 0.0
        self.backlog_s = 0.0  # the peer's predicted seconds of queued + running work
        self.places = 0  # requests it runs at once (0: not said)
        self.evict_tokens = 0  # cached tokens a miss there would overwrite (0: not said)
        self.link_delay_s = 0.0  # one-way, EWMA; 0.0 until measured
        self.inflight = 0  # requests we forwarded there that have not finished
        # snapshot in flight
        self._snap_rid: str | None = None
        self._snap_at: float | None = None  # when the last unanswered request went out
        self._snap_meta: _SnapshotMeta | None = None
        self._parts: dict[int, Sequence[tuple[int, int]]] = {}
        self._buffer: dict[int, tuple[int, Sequence[tuple[int, int]], Sequence[int]]] = {}

    def __repr__(self) -> str:
        return (
            f"PeerEstimate({self.node_id!r}, state={self.state.value}, epoch={self.epoch}, "
            f"seq={self.seq}, n_blocks={self.n_blocks}, synced={self.synced})"
        )

    # ---- queries ---------------------------------------------------------------

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def heard(self) -> bool:
        """Whether the peer itself was ever heard (not only heard of)."""
        return self.last_heard is not None

    @property
    def snapshot_in_flight(self) -> bool:
        return self._snap_rid is not None

    def match_blocks(self, block_ids: Sequence[int]) -> int:
        """Number of leading ``block_ids`` in the estimate (sets are prefix-closed)."""
        blocks = self.blocks
        n = 0
        for block_id in block_ids:
            if block_id not in blocks:
                break
            n += 1
        return n

    # ---- load and link ---------------------------------------------------------

    def observe_rtt(self, rtt_s: float) -> None:
        """Fold one ping round trip into the one-way link delay (EWMA, alpha 0.2)."""
        if rtt_s < 0:
            return  # clock trouble: no information
        sample = rtt_s / 2
        if self.link_delay_s <= 0.0:
            self.link_delay_s = sample
        else:
            self.link_delay_s += RTT_ALPHA * (sample - self.link_delay_s)

    def forward_started(self) -> None:
        self.inflight += 1

    def forward_finished(self) -> None:
        self.inflight = max(0, self.inflight - 1)

    def mark_heard(self, now: float) -> None:
        """The peer itself spoke: it is alive and routable."""
        self.last_heard = now
        self.state = PeerState.ALIVE

    # ---- gossip inputs ---------------------------------------------------------

    def on_heartbeat(
        self,
        epoch: int,
        seq: int,
        digest: int,
        n_blocks: int,
        now: float,
        queue_depth: int = 0,
        busy_slots: int = 0,
        n_slots: int = 0,
        prefill_s_per_token: float | None = None,
        service_s: float | None = None,
        backlog_s: float = 0.0,
        places: int = 0,
        evict_tokens: int = 0,
    ) -> Action:
        """Refresh liveness and load; check our estimate against the peer's (seq, digest)."""
        self.mark_heard(now)
        self.backlog_s = max(backlog_s, 0.0)
        self.places = max(places, 0)
        self.evict_tokens = max(evict_tokens, 0)
        self.queue_depth = queue_depth
        self.busy_slots = busy_slots
        self.n_slots = n_slots
        self.prefill_s_per_token = prefill_s_per_token or 0.0
        self.service_s = service_s or 0.0
        if self.epoch is None:
            self.epoch = epoch
        elif epoch != self.epoch:
            self._reset(epoch)
            return Action(NEED_SNAPSHOT, "epoch")
        if not self.synced:
            return Action(NEED_SNAPSHOT, "unsynced" if self._ever_synced else "new_peer")
        if seq < self.seq:
            return _OLD  # reordered behind a delta we already applied
        if seq > self.seq:
            self.synced = False
            return Action(NEED_SNAPSHOT, "gap")
        if digest != self.digest or n_blocks != len(self.blocks):
            self.synced = False
            return Action(NEED_SNAPSHOT, "digest")
        return _APPLIED

    def on_delta(
        self,
        epoch: int,
        seq: int,
        added: Sequence[tuple[int, int]],
        removed: Sequence[int],
        now: float,
    ) -> Action:
        """Apply delta ``seq`` if it continues the estimate; buffer it during a snapshot.

        ``added`` holds ``(id, parent)`` pairs. A delta does not count as a heartbeat:
        liveness and routability come from heartbeats only.
        """
        self.last_delta_at = now
        reason = "unsynced"
        if epoch != self.epoch:
            if self.epoch is not None:
                reason = "epoch"
            self._reset(epoch)
        if not self.synced:
            if self._snap_rid is not None:
                self._buffer_delta(epoch, seq, added, removed)
                if reason == "unsynced" and not self.should_request_snapshot(now):
                    return _BUFFERED
            return Action(NEED_SNAPSHOT, reason)
        if seq <= self.seq:
            return _OLD
        if seq != self.seq + 1:
            self.synced = False
            return Action(NEED_SNAPSHOT, "gap")
        self._apply(added, removed)
        self.seq = seq
        return _APPLIED

    def _apply(self, added: Sequence[tuple[int, int]], removed: Sequence[int]) -> None:
        blocks = self.blocks
        digest = self.digest
        for block_id in removed:
            if blocks.pop(block_id, _MISSING) != _MISSING:
                digest ^= block_id
        for block_id, parent in added:
            if block_id not in blocks:
                digest ^= block_id
            blocks[block_id] = parent
        self.digest = digest

    def _buffer_delta(
        self, epoch: int, seq: int, added: Sequence[tuple[int, int]], removed: Sequence[int]
    ) -> None:
        # Keeps references, no copies. When full, later deltas are dropped: after the
        # snapshot lands they show up as a gap, i.e. one more snapshot.
        if seq in self._buffer or len(self._buffer) < self.buffer_limit:
            self._buffer[seq] = (epoch, added, removed)

    def _reset(self, epoch: int | None) -> None:
        """Forget the estimate (new epoch or dead peer); a snapshot request stays valid."""
        self.epoch = epoch
        self.seq = 0
        self.blocks = {}
        self.digest = 0
        self.synced = False

    def drop(self) -> None:
        """Forget the blocks and any snapshot in progress (the peer is dead)."""
        self._reset(self.epoch)
        self._abort_snapshot()
        self._snap_at = None

    # ---- snapshots -------------------------------------------------------------

    def should_request_snapshot(self, now: float) -> bool:
        """Rate limit: no request unanswered for less than ``snapshot_timeout_s``."""
        return self._snap_at is None or now - self._snap_at >= self.snapshot_timeout_s

    def begin_snapshot(self, request_id: str, now: float) -> None:
        """A snapshot request went out: only its parts count; deltas buffer until it lands."""
        self._snap_rid = request_id
        self._snap_at = now
        self._snap_meta = None
        self._parts = {}
        self.synced = False

    def _abort_snapshot(self) -> None:
        self._snap_rid = None
        self._snap_meta = None
        self._parts = {}
        self._buffer = {}

    def on_snapshot_part(
        self,
        request_id: str,
        epoch: int,
        seq: int,
        part: int,
        parts: int,
        blocks: Sequence[tuple[int, int]],
        digest: int,
        n_blocks: int,
        now: float,
    ) -> Action:
        """Collect one part; install the snapshot when all parts of the request are in."""
        if self._snap_rid is None or request_id != self._snap_rid:
            return _STALE
        meta = _SnapshotMeta(epoch, seq, parts, digest, n_blocks)
        if self._snap_meta is None:
            self._snap_meta = meta
        if meta != self._snap_meta or not 0 <= part < parts:
            self._abort_snapshot()  # keep _snap_at: retry after the timeout, not in a loop
            return Action(NEED_SNAPSHOT, "bad_snapshot")
        self._parts.setdefault(part, blocks)
        if len(self._parts) < parts:
            return _PARTIAL
        return self._install(meta)

    def _install(self, meta: _SnapshotMeta) -> Action:
        new: dict[int, int] = {}
        for i in range(meta.parts):
            new.update(self._parts[i])
        buffered = self._buffer
        self._abort_snapshot()
        if len(new) != meta.n_blocks or set_digest(new) != meta.digest:
            return Action(NEED_SNAPSHOT, "bad_snapshot")  # retried after the timeout
        self._snap_at = None
        self.epoch = meta.epoch
        self.seq = meta.seq
        self.blocks = new
        self.digest = meta.digest
        self.synced = True
        self._ever_synced = True
        return self._replay(buffered, meta.epoch)

    def _replay(
        self, buffered: dict[int, tuple[int, Sequence[tuple[int, int]], Sequence[int]]], epoch: int
    ) -> Action:
        """Apply buffered deltas that continue the snapshot; a hole means resync."""
        while (entry := buffered.pop(self.seq + 1, None)) is not None:
            if entry[0] != epoch:
                break
            self._apply(entry[1], entry[2])
            self.seq += 1
        if any(s > self.seq and e == epoch for s, (e, _, _) in buffered.items()):
            self.synced = False
            return Action(NEED_SNAPSHOT, "gap")
        return _APPLIED
