"""A zmesh node: one asyncio loop owns every socket; the batched engine has its own thread.

Sockets: ROUTER `serve` (clients and peers), one DEALER per peer (forwards, snapshot
pulls, pings, KV fetches), PUB `gossip` (heartbeats, cache deltas), SUB (peers'
gossip). A request is routed once (zmesh/routing/); a forward that fails, times out
or whose peer turns suspect is served locally, so no request is lost.

One reason to change per module:

- `actor`: `Node`, which builds the parts, runs and stops them, and hands each reply
  a peer sends on a DEALER to the part waiting for it; `run_node`.
- `context`: what every part reads (config, engine, peer table, log, counters).
- `transport`: sockets, CURVE, connecting and dropping peers, non-blocking sends
  (through `zmesh.faults.FaultInjector` while a fault is on), the DEALER readers.
- `admission`: the serve loop's dispatch, authorization per message, request scopes,
  duplicate ids and `max_inflight_per_client` (`InFlight`).
- `pipeline`: tokenize, route, forward (wire ids, keep-alives, fallback), deadlines,
  a caller's Cancel following its forward, starting a KV pull.
- `load`: the job queue, the running jobs, the predicted backlog, borrowed rates.
- `worker`: hands jobs to the batched engine (several run at once), finishing a KV
  pull first; chunks and Done from each engine step; Cancel; Progress keep-alives.
- `membership`: outgoing gossip (`Advertiser`: deltas, heartbeats, snapshots served)
  and the peer table's upkeep (`Membership`: heartbeats, deltas and snapshots in,
  resync, pings, learning and forgetting peers).
- `status`: the `Status` reply and the read-only view the metrics read.

Composition, not mixins: each part is an object that owns its state and is handed,
by the actor, the parts it calls (in dependency order: transport, load, KV,
advertiser, worker, pipeline, membership, status, admission), or a
callable where a dependency would point back (the worker gets the advertiser's
`flush_deltas` and `InFlight.done`; the pipeline the worker's `enqueue`; membership
the pipeline's `fail_forwards_to`). No part holds the `Node`, so what a part may touch
is what its constructor names, and each can be read alone.
"""

from zmesh.node.actor import Node, run_node
from zmesh.node.load import BORROW_FACTOR, DEFAULT_PREFILL_S_PER_TOKEN

__all__ = ["BORROW_FACTOR", "DEFAULT_PREFILL_S_PER_TOKEN", "Node", "run_node"]
