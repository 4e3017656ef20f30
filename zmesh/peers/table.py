"""All peers but ourselves, and the failure detector over them. Sans-IO.

`PeerTable` holds the estimates and runs the failure detector: ALIVE -> SUSPECT after
``suspect_after_s`` without a heartbeat (strictly more), -> DEAD after
``dead_after_s`` (estimate dropped), -> forgotten (removed from the table) after
``forget_after_s``; a heartbeat makes a peer ALIVE again.
"""

from __future__ import annotations

from dataclasses import dataclass

from zmesh.peers.estimate import PeerEstimate, PeerState

_SEVERITY = {PeerState.ALIVE: 0, PeerState.SUSPECT: 1, PeerState.DEAD: 2}


@dataclass(frozen=True, slots=True)
class PeerEvent:
    """A state change seen by `PeerTable.tick`; ``kind`` is the new state's value."""

    kind: str  # "alive" | "suspect" | "dead" | "forgotten" (removed from the table)
    node_id: str


class PeerTable:
    """All peers but ourselves, with a heartbeat-timeout failure detector."""

    __slots__ = (
        "_peers",
        "dead_after_s",
        "forget_after_s",
        "self_id",
        "snapshot_timeout_s",
        "suspect_after_s",
    )

    def __init__(
        self,
        self_id: str,
        suspect_after_s: float = 3.0,
        dead_after_s: float = 10.0,
        snapshot_timeout_s: float = 5.0,
        forget_after_s: float | None = None,
    ) -> None:
        if not 0 < suspect_after_s <= dead_after_s:
            raise ValueError("need 0 < suspect_after_s <= dead_after_s")
        if forget_after_s is not None and not forget_after_s > dead_after_s:
            raise ValueError("need forget_after_s > dead_after_s")
        self.self_id = self_id
        self.suspect_after_s = suspect_after_s
        self.dead_after_s = dead_after_s
        # None: never (the simulator's tables); a node forgets, or churn fills its table.
        self.forget_after_s = forget_after_s
        self.snapshot_timeout_s = snapshot_timeout_s
        self._peers: dict[str, PeerEstimate] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def upsert(
        self, node_id: str, serve_addr: str, gossip_addr: str, now: float, heard: bool = True
    ) -> bool:
        """Learn or refresh a peer; True if it is new. Our own id is never added.

        ``heard=True``: the peer itself spoke (its heartbeat): it becomes ALIVE and its
        addresses are updated. ``heard=False``: only heard of (another peer's list or a
        seed): a new peer starts SUSPECT, i.e. not routed to until its own heartbeat.
        """
        if node_id == self.self_id:
            return False
        peer = self._peers.get(node_id)
        if peer is None:
            self._peers[node_id] = PeerEstimate(
                node_id,
                serve_addr,
                gossip_addr,
                now=now,
                heard=heard,
                snapshot_timeout_s=self.snapshot_timeout_s,
            )
            return True
        if heard:
            peer.serve_addr = serve_addr
            peer.gossip_addr = gossip_addr
            peer.mark_heard(now)
        return False

    def get(self, node_id: str) -> PeerEstimate | None:
        return self._peers.get(node_id)

    def remove(self, node_id: str) -> bool:
        return self._peers.pop(node_id, None) is not None

    def longest_dead(self) -> str | None:
        """The DEAD peer silent the longest (None if none): the first to make room for."""
        dead = [p for p in self._peers.values() if p.state is PeerState.DEAD]
        return min(dead, key=_silent_since).node_id if dead else None

    def all(self) -> list[PeerEstimate]:
        return list(self._peers.values())

    def alive(self) -> list[PeerEstimate]:
        """Routable peers: ALIVE only."""
        return [p for p in self._peers.values() if p.state is PeerState.ALIVE]

    def tick(self, now: float) -> list[PeerEvent]:
        """Demote silent peers; report every state change since the last tick.

        Silence is ``now - last_heard`` (``now - learned_at`` for a peer never heard):
        SUSPECT once it exceeds ``suspect_after_s``, DEAD (blocks dropped, unsynced)
        once it exceeds ``dead_after_s``, removed (a "forgotten" event) once it exceeds
        ``forget_after_s``. Promotion to ALIVE happens on a heartbeat; the next tick
        reports it as an "alive" event.
        """
        events: list[PeerEvent] = []
        for peer in list(self._peers.values()):
            silence = now - _silent_since(peer)
            if self.forget_after_s is not None and silence > self.forget_after_s:
                del self._peers[peer.node_id]
                events.append(PeerEvent("forgotten", peer.node_id))
                continue
            if silence > self.dead_after_s:
                target = PeerState.DEAD
            elif silence > self.suspect_after_s:
                target = PeerState.SUSPECT
            else:
                target = peer.state
            if _SEVERITY[target] > _SEVERITY[peer.state]:
                peer.state = target
                if target is PeerState.DEAD:
                    peer.drop()
            if peer.state is not peer.reported_state:
                peer.reported_state = peer.state
                events.append(PeerEvent(peer.state.value, peer.node_id))
        return events


def _silent_since(peer: PeerEstimate) -> float:
    """When the peer last spoke (when we learned of it, if it never did)."""
    return peer.last_heard if peer.last_heard is not None else peer.learned_at
