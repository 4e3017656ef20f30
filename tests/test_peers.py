"""PeerEstimate repair (gap, epoch, digest, snapshots) and PeerTable failure detection.

The publisher side is a real LocalAdvert; the "network" is two FIFO queues (PUB/SUB,
lossy; DEALER/ROUTER, for snapshot parts) driven by hand or by hypothesis.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.gossip import DeltaBatch, LocalAdvert, SnapshotPart, set_digest
from zmesh.peers import (
    IGNORED,
    NEED_SNAPSHOT,
    OK,
    PENDING,
    Action,
    PeerEstimate,
    PeerEvent,
    PeerState,
    PeerTable,
)

U64 = 2**64 - 1
TIMEOUT = 4.0


def parent_of(block_id: int) -> int:
    return (block_id * 0x9E3779B97F4A7C15) & U64


def adds(*ids: int) -> list[tuple[int, int]]:
    return [(i, parent_of(i)) for i in ids]


def delta(peer: PeerEstimate, epoch: int, b: DeltaBatch, now: float = 0.0) -> Action:
    return peer.on_delta(epoch, b.seq, b.added, b.removed, now)


def heartbeat(peer: PeerEstimate, a: LocalAdvert, now: float = 0.0, **load: Any) -> Action:
    return peer.on_heartbeat(a.epoch, a.seq, a.digest, a.n_blocks, now, **load)


def part(peer: PeerEstimate, rid: str, epoch: int, p: SnapshotPart, now: float = 0.0) -> Action:
    return peer.on_snapshot_part(
        rid, epoch, p.seq, p.part, p.parts, p.blocks, p.digest, p.n_blocks, now
    )


def snapshot(peer: PeerEstimate, a: LocalAdvert, rid: str = "r1", max_blocks: int = 4096) -> Action:
    """Request and fully receive a snapshot of ``a`` now."""
    peer.begin_snapshot(rid, 0.0)
    action = Action(PENDING)
    for p in a.snapshot_parts(max_blocks):
        action = part(peer, rid, a.epoch, p)
    return action


def publish(a: LocalAdvert, added: list[tuple[int, int]], removed: list[int]) -> DeltaBatch:
    a.apply(added, removed)
    batch = a.flush()
    assert batch is not None
    return batch


def assert_mirrors(peer: PeerEstimate, a: LocalAdvert) -> None:
    assert peer.synced
    assert (peer.epoch, peer.seq) == (a.epoch, a.seq)
    assert peer.blocks == dict(a.advertised)
    assert (peer.digest, peer.n_blocks) == (a.digest, a.n_blocks)


def synced_pair(*ids: int) -> tuple[LocalAdvert, PeerEstimate]:
    a = LocalAdvert(epoch=7)
    if ids:
        publish(a, adds(*ids), [])
    peer = PeerEstimate("b", "tcp://b:1", "tcp://b:2", snapshot_timeout_s=TIMEOUT)
    assert heartbeat(peer, a) == Action(NEED_SNAPSHOT, "new_peer")
    assert snapshot(peer, a) == Action(OK)
    assert_mirrors(peer, a)
    return a, peer


# ---- deltas ------------------------------------------------------------------


def test_new_peer_needs_a_snapshot_then_applies_deltas_in_order() -> None:
    a, peer = synced_pair(1, 2, 3)
    assert heartbeat(peer, a) == Action(OK)
    for added, removed in [(adds(4, 5), []), ([], [2]), (adds(6), [4, 5])]:
        assert delta(peer, a.epoch, publish(a, added, removed)) == Action(OK)
        assert_mirrors(peer, a)
    assert heartbeat(peer, a) == Action(OK)


def test_delta_before_any_snapshot_is_not_applied() -> None:
    a = LocalAdvert(7)
    peer = PeerEstimate("b")
    assert delta(peer, 7, publish(a, adds(1), [])) == Action(NEED_SNAPSHOT, "unsynced")
    assert peer.blocks == {} and not peer.synced


def test_duplicate_and_old_deltas_are_ignored() -> None:
    a, peer = synced_pair()
    d1 = publish(a, adds(1, 2), [])
    d2 = publish(a, [], [1])
    assert delta(peer, 7, d1).kind == OK
    assert delta(peer, 7, d2).kind == OK
    for old in (d1, d2):
        assert delta(peer, 7, old) == Action(IGNORED, "old")
    assert_mirrors(peer, a)


def test_heartbeat_behind_the_estimate_is_ignored() -> None:
    a, peer = synced_pair(1)
    old = (a.epoch, a.seq, a.digest, a.n_blocks)
    assert delta(peer, 7, publish(a, adds(2), [])).kind == OK
    assert peer.on_heartbeat(*old, now=0.0) == Action(IGNORED, "old")
    assert peer.synced


def test_gap_is_repaired_by_snapshot_plus_buffered_deltas() -> None:
    a, peer = synced_pair(1)
    publish(a, adds(2), [])  # seq 2: lost
    assert delta(peer, 7, publish(a, adds(3), [])) == Action(NEED_SNAPSHOT, "gap")
    assert not peer.synced
    assert peer.blocks == dict(adds(1))  # stale but still usable for routing
    assert peer.should_request_snapshot(1.0)
    peer.begin_snapshot("r2", 1.0)
    parts = a.snapshot_parts(max_blocks=1)  # taken at seq 3, three parts
    # deltas published after the snapshot overtake its parts: buffered, not lost
    d4 = publish(a, adds(4), [2])
    d5 = publish(a, adds(5), [])
    assert delta(peer, 7, d4, 1.5) == Action(PENDING, "buffered")
    assert delta(peer, 7, d5, 1.5) == Action(PENDING, "buffered")
    assert part(peer, "r2", 7, parts[0]) == Action(PENDING, "partial")
    assert part(peer, "r2", 7, parts[1]) == Action(PENDING, "partial")
    assert part(peer, "r2", 7, parts[2]) == Action(OK)
    assert_mirrors(peer, a)  # snapshot at 3 + buffered 4, 5
    assert heartbeat(peer, a) == Action(OK)


def test_buffered_deltas_covered_by_the_snapshot_are_discarded() -> None:
    a, peer = synced_pair(1)
    peer.begin_snapshot("r", 0.0)
    d2 = publish(a, adds(2), [])  # published before the snapshot is taken
    assert delta(peer, 7, d2) == Action(PENDING, "buffered")
    assert snapshot_parts_into(peer, "r", a) == Action(OK)
    assert_mirrors(peer, a)


def snapshot_parts_into(peer: PeerEstimate, rid: str, a: LocalAdvert) -> Action:
    action = Action(PENDING)
    for p in a.snapshot_parts():
        action = part(peer, rid, a.epoch, p)
    return action


def test_hole_in_buffered_deltas_asks_again() -> None:
    a, peer = synced_pair(1)
    peer.begin_snapshot("r", 0.0)
    parts = a.snapshot_parts()
    publish(a, adds(2), [])  # lost
    assert delta(peer, 7, publish(a, adds(3), [])).kind == PENDING
    assert part(peer, "r", 7, parts[0]) == Action(NEED_SNAPSHOT, "gap")
    assert peer.seq == 1 and not peer.synced
    assert peer.should_request_snapshot(0.0)  # the snapshot itself succeeded
    assert snapshot(peer, a, "r2").kind == OK
    assert_mirrors(peer, a)


def test_buffer_overflow_costs_one_more_snapshot() -> None:
    a = LocalAdvert(7)
    peer = PeerEstimate("b", buffer_limit=2)
    peer.begin_snapshot("r", 0.0)
    parts = a.snapshot_parts()
    batches = [publish(a, adds(i), []) for i in (1, 2, 3)]
    assert [delta(peer, 7, b).kind for b in batches] == [PENDING] * 3  # third one dropped
    assert part(peer, "r", 7, parts[0]) == Action(OK)
    assert peer.seq == 2 and peer.synced
    assert heartbeat(peer, a) == Action(NEED_SNAPSHOT, "gap")
    assert snapshot(peer, a, "r2").kind == OK
    assert_mirrors(peer, a)


def test_delta_during_a_timed_out_snapshot_asks_again() -> None:
    a, peer = synced_pair(1)
    peer.begin_snapshot("r", 0.0)
    b = publish(a, adds(2), [])
    assert delta(peer, 7, b, TIMEOUT - 0.5) == Action(PENDING, "buffered")
    assert delta(peer, 7, b, TIMEOUT) == Action(NEED_SNAPSHOT, "unsynced")


# ---- heartbeats: gap, digest, epoch --------------------------------------------


def test_heartbeat_reveals_a_lost_last_delta() -> None:
    a, peer = synced_pair(1)
    publish(a, adds(2), [])  # lost, and nothing follows it
    assert heartbeat(peer, a) == Action(NEED_SNAPSHOT, "gap")
    assert snapshot(peer, a).kind == OK
    assert_mirrors(peer, a)


def test_digest_mismatch_at_same_seq_is_detected() -> None:
    a, peer = synced_pair(1, 2)
    peer.blocks[3] = 0  # diverged somehow
    assert heartbeat(peer, a) == Action(NEED_SNAPSHOT, "digest")
    assert not peer.synced
    assert snapshot(peer, a).kind == OK
    assert_mirrors(peer, a)


def test_count_mismatch_with_equal_digest_is_detected() -> None:
    a, peer = synced_pair(1, 2)
    peer.blocks[0] = 0  # id 0 leaves the XOR unchanged: the count catches it
    assert heartbeat(peer, a) == Action(NEED_SNAPSHOT, "digest")


def test_new_epoch_drops_the_estimate_and_resyncs() -> None:
    _, peer = synced_pair(1, 2, 3)
    restarted = LocalAdvert(epoch=8)
    publish(restarted, adds(9), [])
    assert heartbeat(peer, restarted) == Action(NEED_SNAPSHOT, "epoch")
    assert (peer.epoch, peer.seq, peer.blocks, peer.digest, peer.synced) == (8, 0, {}, 0, False)
    assert snapshot(peer, restarted).kind == OK
    assert_mirrors(peer, restarted)


def test_delta_from_a_new_epoch_drops_the_estimate() -> None:
    _, peer = synced_pair(1)
    restarted = LocalAdvert(epoch=8)
    assert delta(peer, 8, publish(restarted, adds(5), [])) == Action(NEED_SNAPSHOT, "epoch")
    assert peer.blocks == {} and peer.epoch == 8
    # later deltas of the new epoch just wait for the snapshot
    assert delta(peer, 8, publish(restarted, adds(6), [])) == Action(NEED_SNAPSHOT, "unsynced")
    assert snapshot(peer, restarted).kind == OK
    assert_mirrors(peer, restarted)


def test_heartbeat_records_load() -> None:
    a, peer = synced_pair()
    heartbeat(peer, a, 3.0, queue_depth=4, busy_slots=2, n_slots=4, prefill_s_per_token=0.25)
    assert (peer.queue_depth, peer.busy_slots, peer.n_slots) == (4, 2, 4)
    assert (peer.prefill_s_per_token, peer.service_s, peer.last_heard) == (0.25, 0.0, 3.0)


# ---- snapshots -------------------------------------------------------------------


def test_multipart_snapshot_out_of_order_with_duplicates() -> None:
    a = LocalAdvert(7)
    publish(a, adds(*range(1, 11)), [])
    peer = PeerEstimate("b")
    peer.begin_snapshot("r", 0.0)
    parts = a.snapshot_parts(max_blocks=3)
    assert len(parts) == 4
    for p in (parts[2], parts[0], parts[2], parts[3]):
        assert part(peer, "r", 7, p) == Action(PENDING, "partial")
    assert not peer.synced
    assert part(peer, "r", 7, parts[1]) == Action(OK)
    assert_mirrors(peer, a)


def test_stale_snapshot_parts_are_ignored() -> None:
    a = LocalAdvert(7)
    publish(a, adds(1, 2), [])
    peer = PeerEstimate("b")
    (p,) = a.snapshot_parts()
    assert part(peer, "r0", 7, p) == Action(IGNORED, "stale")  # nothing requested
    peer.begin_snapshot("old", 0.0)
    peer.begin_snapshot("new", TIMEOUT)  # the old request timed out
    assert part(peer, "old", 7, p) == Action(IGNORED, "stale")
    assert not peer.synced
    assert part(peer, "new", 7, p) == Action(OK)
    assert part(peer, "new", 7, p) == Action(IGNORED, "stale")  # already installed
    assert_mirrors(peer, a)


def test_snapshot_with_bad_digest_is_rejected_and_retried_after_timeout() -> None:
    a, peer = synced_pair(1, 2)
    publish(a, adds(3), [])
    peer.begin_snapshot("r", 10.0)
    (p,) = a.snapshot_parts()
    action = peer.on_snapshot_part("r", 7, p.seq, 0, 1, p.blocks, p.digest ^ 1, p.n_blocks, 10.5)
    assert action == Action(NEED_SNAPSHOT, "bad_snapshot")
    assert not peer.synced and peer.seq == 1 and not peer.snapshot_in_flight
    assert not peer.should_request_snapshot(10.0 + TIMEOUT - 0.5)  # no request loop
    assert peer.should_request_snapshot(10.0 + TIMEOUT)


def test_snapshot_with_wrong_count_or_inconsistent_parts_is_rejected() -> None:
    a = LocalAdvert(7)
    publish(a, adds(1, 2, 3), [])
    peer = PeerEstimate("b")
    (p,) = a.snapshot_parts()
    peer.begin_snapshot("r", 0.0)
    bad = peer.on_snapshot_part("r", 7, p.seq, 0, 1, p.blocks, p.digest, 4, 0.0)
    assert bad == Action(NEED_SNAPSHOT, "bad_snapshot")

    p0, p1 = a.snapshot_parts(max_blocks=2)
    peer.begin_snapshot("r2", 0.0)
    assert part(peer, "r2", 7, p0).kind == PENDING
    bad = peer.on_snapshot_part("r2", 7, p1.seq + 1, 1, 2, p1.blocks, p1.digest, 3, 0.0)
    assert bad == Action(NEED_SNAPSHOT, "bad_snapshot")

    peer.begin_snapshot("r3", 0.0)
    bad = peer.on_snapshot_part("r3", 7, p0.seq, 2, 2, p0.blocks, p0.digest, 3, 0.0)
    assert bad == Action(NEED_SNAPSHOT, "bad_snapshot")
    assert not peer.synced


def test_snapshot_requests_are_rate_limited() -> None:
    peer = PeerEstimate("b", snapshot_timeout_s=TIMEOUT)
    assert peer.should_request_snapshot(0.0)
    peer.begin_snapshot("r", 1.0)
    assert peer.snapshot_in_flight
    assert not peer.should_request_snapshot(1.0)
    assert not peer.should_request_snapshot(1.0 + TIMEOUT - 0.25)
    assert peer.should_request_snapshot(1.0 + TIMEOUT)  # exact boundary: timed out


def test_empty_snapshot_syncs() -> None:
    a = LocalAdvert(7)
    peer = PeerEstimate("b")
    assert snapshot(peer, a).kind == OK
    assert_mirrors(peer, a)


# ---- match, link, inflight ---------------------------------------------------------


def test_match_blocks_counts_leading_hits_only() -> None:
    peer = PeerEstimate("b")
    peer.blocks = dict(adds(1, 2, 3, 5))
    assert peer.match_blocks([]) == 0
    assert peer.match_blocks([1, 2, 3]) == 3
    assert peer.match_blocks([1, 2, 4, 5]) == 2  # stops at the first miss
    assert peer.match_blocks([9, 1, 2]) == 0


def test_match_blocks_on_a_large_estimate() -> None:
    a = LocalAdvert(7)
    ids = [(i * 0x9E3779B97F4A7C15) & U64 for i in range(1, 100_001)]
    a.apply([(i, 0) for i in ids], [])
    peer = PeerEstimate("b")
    for b in iter(a.flush, None):
        peer.blocks.update(b.added)
    assert peer.n_blocks == 100_000
    query = [*ids[5000:5040], 12345, *ids[:23]]
    assert peer.match_blocks(query) == 40
    assert peer.match_blocks(ids[:64]) == 64


def test_observe_rtt_is_a_one_way_ewma() -> None:
    peer = PeerEstimate("b")
    assert peer.link_delay_s == 0.0
    peer.observe_rtt(0.5)
    assert peer.link_delay_s == 0.25
    peer.observe_rtt(1.5)  # sample 0.75
    assert peer.link_delay_s == pytest.approx(0.8 * 0.25 + 0.2 * 0.75)
    peer.observe_rtt(-1.0)  # ignored
    assert peer.link_delay_s == pytest.approx(0.35)


def test_inflight_counts_forwards_and_never_goes_negative() -> None:
    peer = PeerEstimate("b")
    peer.forward_started()
    peer.forward_started()
    peer.forward_finished()
    assert peer.inflight == 1
    peer.forward_finished()
    peer.forward_finished()
    assert peer.inflight == 0


# ---- PeerTable -----------------------------------------------------------------------


def table() -> PeerTable:
    return PeerTable("me", suspect_after_s=2.0, dead_after_s=8.0, snapshot_timeout_s=TIMEOUT)


def synced_peer(t: PeerTable, now: float, *blocks: int) -> tuple[PeerEstimate, LocalAdvert]:
    """Peer "b", heard at ``now``, whose advert holds ``blocks`` and which we have
    synced (its heartbeat, then a full snapshot)."""
    t.upsert("b", "s", "g", now)
    peer = t.get("b")
    assert peer is not None
    a = LocalAdvert(7)
    publish(a, adds(*blocks), [])
    heartbeat(peer, a, now)
    snapshot(peer, a)
    return peer, a


def test_table_never_includes_self() -> None:
    t = table()
    assert not t.upsert("me", "s", "g", 0.0)
    assert not t.upsert("me", "s", "g", 0.0, heard=False)
    assert "me" not in t and t.get("me") is None and len(t) == 0


def test_upsert_learns_refreshes_and_removes() -> None:
    t = table()
    assert t.upsert("b", "tcp://b:1", "tcp://b:2", 0.0)
    assert not t.upsert("b", "tcp://b:3", "tcp://b:4", 1.0)  # its own heartbeat: new addresses
    peer = t.get("b")
    assert peer is not None
    assert (peer.serve_addr, peer.gossip_addr, peer.last_heard) == ("tcp://b:3", "tcp://b:4", 1.0)
    assert not t.upsert("b", "tcp://x", "tcp://y", 2.0, heard=False)  # rumors change nothing
    assert (peer.serve_addr, peer.last_heard) == ("tcp://b:3", 1.0)
    assert peer.snapshot_timeout_s == TIMEOUT
    assert [p.node_id for p in t.all()] == [p.node_id for p in t.alive()] == ["b"]
    assert t.remove("b") and not t.remove("b")
    assert t.all() == []


def test_peer_heard_of_is_not_routable_until_heard() -> None:
    t = table()
    assert t.upsert("c", "tcp://c:1", "tcp://c:2", 0.0, heard=False)
    peer = t.get("c")
    assert peer is not None and peer.state is PeerState.SUSPECT and not peer.heard
    assert t.alive() == []
    assert t.tick(1.0) == []
    a = LocalAdvert(3)
    assert heartbeat(peer, a, 1.5) == Action(NEED_SNAPSHOT, "new_peer")
    assert t.alive() == [peer]
    assert t.tick(1.5) == [PeerEvent("alive", "c")]
    assert t.tick(1.5) == []


def test_peer_heard_of_but_never_heard_dies() -> None:
    t = table()
    t.upsert("c", "s", "g", 0.0, heard=False)
    assert t.tick(8.0) == []
    assert t.tick(8.5) == [PeerEvent("dead", "c")]


def test_failure_detector_boundaries_and_drop() -> None:
    t = table()
    peer, _ = synced_peer(t, 1.0, 1, 2)
    assert t.tick(3.0) == []  # silent exactly suspect_after: still alive
    assert peer.state is PeerState.ALIVE
    assert t.tick(3.25) == [PeerEvent("suspect", "b")]
    assert t.alive() == [] and peer.synced  # suspect keeps its estimate
    assert t.tick(9.0) == []  # silent exactly dead_after: still suspect
    assert t.tick(9.25) == [PeerEvent("dead", "b")]
    assert peer.state is PeerState.DEAD
    assert (peer.blocks, peer.n_blocks, peer.digest, peer.synced) == ({}, 0, 0, False)
    assert t.tick(100.0) == []


def test_suspect_peer_comes_back_with_its_estimate() -> None:
    t = table()
    peer, a = synced_peer(t, 0.0, 1)
    assert t.tick(2.5) == [PeerEvent("suspect", "b")]
    assert heartbeat(peer, a, 3.0) == Action(OK)
    assert t.tick(3.0) == [PeerEvent("alive", "b")]
    assert_mirrors(peer, a)


def test_silent_peer_goes_straight_to_dead_in_one_tick() -> None:
    t = table()
    t.upsert("b", "s", "g", 0.0)
    assert t.tick(50.0) == [PeerEvent("dead", "b")]


def test_returning_peer_is_resynced() -> None:
    t = table()
    peer, _ = synced_peer(t, 0.0, 1, 2)
    assert t.tick(20.0) == [PeerEvent("dead", "b")]
    new = LocalAdvert(8)  # restarted: new epoch
    publish(new, adds(5), [])
    assert t.upsert("b", "s", "g", 21.0) is False
    assert heartbeat(peer, new, 21.0) == Action(NEED_SNAPSHOT, "epoch")
    assert t.tick(21.0) == [PeerEvent("alive", "b")]
    assert peer.should_request_snapshot(21.0)
    assert snapshot(peer, new).kind == OK
    assert_mirrors(peer, new)

    # back from a partition with the same epoch: resynced too
    assert t.tick(40.0) == [PeerEvent("dead", "b")]
    assert heartbeat(peer, new, 41.0) == Action(NEED_SNAPSHOT, "unsynced")
    assert snapshot(peer, new).kind == OK
    assert_mirrors(peer, new)


def test_table_rejects_inconsistent_timeouts() -> None:
    with pytest.raises(ValueError):
        PeerTable("me", suspect_after_s=5.0, dead_after_s=1.0)
    with pytest.raises(ValueError, match="forget_after_s"):
        PeerTable("me", suspect_after_s=1.0, dead_after_s=5.0, forget_after_s=5.0)


def test_silent_peers_are_forgotten_and_learned_anew() -> None:
    t = PeerTable("me", suspect_after_s=2.0, dead_after_s=8.0, forget_after_s=20.0)
    t.upsert("b", "sb", "gb", 0.0)
    t.upsert("c", "sc", "gc", 0.0, heard=False)  # heard of only: forgotten alike
    t.upsert("d", "sd", "gd", 0.0)
    assert t.tick(9.0) == [PeerEvent("dead", "b"), PeerEvent("dead", "c"), PeerEvent("dead", "d")]
    t.upsert("d", "sd", "gd", 19.0)  # d comes back in time
    assert t.tick(20.0) == [PeerEvent("alive", "d")]  # silent exactly forget_after_s: kept
    assert t.tick(20.5) == [PeerEvent("forgotten", "b"), PeerEvent("forgotten", "c")]
    assert len(t) == 1 and "b" not in t and t.tick(100.0)[-1] == PeerEvent("forgotten", "d")
    assert t.upsert("b", "sb", "gb", 101.0)  # a returning peer is new again
    assert t.get("b") is not None and t.get("b").state is PeerState.ALIVE  # type: ignore[union-attr]


def test_longest_dead_names_the_first_to_make_room_for() -> None:
    t = table()
    t.upsert("b", "sb", "gb", 0.0)
    t.upsert("c", "sc", "gc", 1.0, heard=False)
    t.upsert("d", "sd", "gd", 5.0)
    assert t.longest_dead() is None
    t.tick(12.0)  # b and c dead, d suspect
    assert t.longest_dead() == "b"
    t.remove("b")
    assert t.longest_dead() == "c"
    assert t.forget_after_s is None and t.tick(1e9)[-1].kind == "dead"  # never forgets


# ---- lossy end-to-end property ----------------------------------------------------------


@dataclass
class Net:
    """A publisher and one subscriber's estimate, joined by two FIFO channels."""

    advert: LocalAdvert
    peer: PeerEstimate
    part_blocks: int
    now: float = 0.0
    pub: deque[Callable[[], Action]] = field(default_factory=deque)  # deliveries, in order
    dealer: deque[tuple[str, int, SnapshotPart]] = field(default_factory=deque)
    requests: deque[str] = field(default_factory=deque)
    history: dict[tuple[int, int], dict[int, int]] = field(default_factory=dict)
    rids: itertools.count[int] = field(default_factory=itertools.count)
    snapshots_requested: int = 0

    def record(self) -> None:
        a = self.advert
        self.history[(a.epoch, a.seq)] = dict(a.advertised)

    def flush(self, drop: list[bool] | None = None) -> None:
        for i, b in enumerate(iter(self.advert.flush, None)):
            self.record()
            if not (drop and drop[i % len(drop)]):
                self.pub.append(self._delta(self.advert.epoch, b))

    def _delta(self, epoch: int, b: DeltaBatch) -> Callable[[], Action]:
        return lambda: self.peer.on_delta(epoch, b.seq, b.added, b.removed, self.now)

    def heartbeat(self) -> None:
        a = self.advert
        epoch, seq, digest, n = a.epoch, a.seq, a.digest, a.n_blocks
        self.pub.append(lambda: self.peer.on_heartbeat(epoch, seq, digest, n, self.now))

    def react(self, action: Action) -> None:
        """What the node does: ask for a snapshot unless one is already on its way."""
        if action.kind == NEED_SNAPSHOT and self.peer.should_request_snapshot(self.now):
            rid = f"r{next(self.rids)}"
            self.peer.begin_snapshot(rid, self.now)
            self.requests.append(rid)
            self.snapshots_requested += 1

    def deliver_pub(self) -> None:
        self.react(self.pub.popleft()())
        self.check()

    def serve(self, flush_first: bool, lose: bool) -> None:
        rid = self.requests.popleft()
        if flush_first:  # as the node does; either way the snapshot matches its seq
            self.flush()
        if not lose:
            for p in self.advert.snapshot_parts(self.part_blocks):
                self.dealer.append((rid, self.advert.epoch, p))

    def deliver_part(self) -> None:
        rid, epoch, p = self.dealer.popleft()
        self.react(part(self.peer, rid, epoch, p, self.now))
        self.check()

    def drain(self) -> None:
        while self.pub or self.dealer or self.requests:
            if self.pub:
                self.deliver_pub()
            elif self.requests:
                self.serve(flush_first=False, lose=False)
            else:
                self.deliver_part()

    def check(self) -> None:
        """A synced estimate is exactly the publisher's set at that (epoch, seq)."""
        p = self.peer
        if p.synced:
            assert p.epoch is not None
            assert p.blocks == self.history[(p.epoch, p.seq)]
            assert (p.digest, p.n_blocks) == (set_digest(p.blocks), len(p.blocks))


STEPS = ["mutate", "mutate", "hb", "deliver", "deliver", "deliver", "serve", "part", "part"]


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    universe=st.lists(st.integers(0, U64), min_size=1, max_size=30, unique=True),
    drop=st.lists(st.sampled_from([False, False, False, True]), min_size=1, max_size=16),
    batch=st.integers(1, 5),
    part_blocks=st.integers(1, 6),
)
def test_lossy_gossip_converges_after_one_heartbeat_and_snapshot(
    data: st.DataObject, universe: list[int], drop: list[bool], batch: int, part_blocks: int
) -> None:
    epochs = itertools.count(100)
    net = Net(
        LocalAdvert(next(epochs), max_batch_blocks=batch),
        PeerEstimate("pub", snapshot_timeout_s=TIMEOUT, buffer_limit=data.draw(st.integers(1, 8))),
        part_blocks,
    )
    net.record()
    truth: dict[int, int] = {}
    if data.draw(st.booleans()):  # start in sync, or meet mid-stream
        net.heartbeat()
        net.drain()
    for _ in range(data.draw(st.integers(1, 60))):
        step = data.draw(st.sampled_from([*STEPS, "time", "restart"]))
        if step == "mutate":
            added, removed = [], []
            for i in data.draw(st.lists(st.sampled_from(universe), max_size=8)):
                if truth.pop(i, None) is None:
                    truth[i] = parent_of(i)
                    added.append((i, truth[i]))
                else:
                    removed.append(i)
            net.advert.apply(added, removed)
            if data.draw(st.booleans()):
                net.flush(drop)
        elif step == "hb":
            if not data.draw(st.booleans()):  # heartbeats are lossy too
                net.heartbeat()
        elif step == "deliver" and net.pub:
            net.deliver_pub()
        elif step == "serve" and net.requests:
            lose = data.draw(st.integers(0, 3)) == 0
            net.serve(flush_first=data.draw(st.booleans()), lose=lose)
        elif step == "part" and net.dealer:
            net.deliver_part()
        elif step == "time":
            net.now += data.draw(st.sampled_from([0.5, 1.0, TIMEOUT]))
        elif step == "restart" and data.draw(st.integers(0, 7)) == 0:
            net.advert = LocalAdvert(next(epochs), max_batch_blocks=batch)  # empty cache
            net.record()
            truth = {}
    # quiesce: everything in flight arrives, pending changes are published (maybe lossily)
    net.flush(drop)
    net.drain()
    # the publisher's next heartbeat, and the snapshot it triggers, make the estimate exact
    net.now += TIMEOUT
    before = net.snapshots_requested
    net.heartbeat()
    net.drain()
    assert net.snapshots_requested - before <= 1
    assert_mirrors(net.peer, net.advert)
    assert net.peer.blocks == truth
    net.heartbeat()
    net.drain()
    assert net.snapshots_requested - before <= 1  # and it stays quiet
