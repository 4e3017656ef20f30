"""What a node says about itself: the `Status` reply and the read-only `StatusView`.

Both are read on the loop thread. The view (`zmesh.metrics.StatusView`, a frozen
dataclass) is what the Prometheus gauges read at scrape time, so the metrics module
never touches the node's own objects.
"""

from __future__ import annotations

import time

from zmesh import protocol as P
from zmesh.faults import FaultInjector
from zmesh.metrics import PeerView, StatusView
from zmesh.node.admission import InFlight
from zmesh.node.context import NodeContext
from zmesh.node.load import Load
from zmesh.node.membership import Advertiser
from zmesh.peers import PeerState


class NodeStatus:
    def __init__(
        self,
        ctx: NodeContext,
        load: Load,
        advertiser: Advertiser,
        inflight: InFlight,
        faults: FaultInjector,
    ) -> None:
        self._c = ctx
        self._load = load
        self._adv = advertiser
        self._inflight = inflight
        self._faults = faults

    def message(self, rid: str) -> P.Status:
        c, adv = self._c, self._adv
        now = time.monotonic()
        return P.Status(
            request_id=rid,
            node_id=c.node_id,
            epoch=adv.epoch,
            seq=adv.advert.seq,
            n_blocks=adv.advert.n_blocks,
            queue_depth=self._load.depth(),
            busy_slots=c.engine.busy_slots(),
            n_slots=c.engine.n_slots,
            peers=[
                P.PeerStatus(
                    node_id=p.node_id,
                    state=p.state.value if isinstance(p.state, PeerState) else str(p.state),
                    epoch=p.epoch or 0,
                    seq=p.seq,
                    n_blocks=p.n_blocks,
                    estimate_age_s=round(now - p.last_heard, 3) if p.last_heard else -1.0,
                    queue_depth=p.queue_depth,
                    link_delay_s=p.link_delay_s,
                )
                for p in c.peers.all()
            ],
            counters=dict(c.counters),
            inflight=self._inflight.count,
            inflight_clients=len(self._inflight.by_client),
            faults=self._faults.current,
        )

    def view(self) -> StatusView:
        c, adv = self._c, self._adv
        return StatusView(
            at=time.monotonic(),
            queue_depth=self._load.depth(),
            backlog_s=self._load.backlog_s(),
            slots_used=c.engine.busy_slots(),
            slots_total=c.engine.n_slots,
            blocks=adv.advert.n_blocks,
            advert_seq=adv.advert.seq,
            peers=tuple(
                PeerView(
                    node_id=p.node_id,
                    state=p.state.value if isinstance(p.state, PeerState) else str(p.state),
                    last_heard=p.last_heard,
                    learned_at=p.learned_at,
                    epoch=p.epoch or 0,
                    seq=p.seq,
                    n_blocks=p.n_blocks,
                    link_delay_s=p.link_delay_s,
                    queue_depth=p.queue_depth,
                )
                for p in c.peers.all()
            ),
        )
