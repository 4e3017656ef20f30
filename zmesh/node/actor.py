"""The node actor: one asyncio loop owns every socket; the engine runs on its own thread.

`Node` builds the parts (see the package docstring), binds, starts their loops, routes
each reply a peer sends on a DEALER to the part that waits for it, and stops them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from typing import Any

import zmq.asyncio

from zmesh import protocol as P
from zmesh.config import NodeConfig
from zmesh.engine import Engine
from zmesh.faults import FaultControl
from zmesh.kvpeer import KvPeer
from zmesh.log import get_logger
from zmesh.metrics import NodeMetrics
from zmesh.node.admission import Admission, InFlight
from zmesh.node.context import NodeContext
from zmesh.node.load import Load
from zmesh.node.membership import Advertiser, Membership
from zmesh.node.pipeline import Pipeline
from zmesh.node.push import KvPush
from zmesh.node.runtime import Runtime
from zmesh.node.status import NodeStatus
from zmesh.node.transport import Transport
from zmesh.node.worker import Worker, on_engine
from zmesh.peers import PeerTable
from zmesh.security import ZapHandler


class Node:
    def __init__(self, config: NodeConfig, engine: Engine | None = None) -> None:
        self.config = config
        self.node_id = config.node_id
        self.log = get_logger("zmesh.node").bind(node_id=self.node_id)
        self._own_engine = engine is None  # closed on stop; a given one is the giver's
        self.engine = engine or Engine(config.engine)
        self.epoch = random.getrandbits(62)
        g = config.gossip
        self.peers = PeerTable(
            self.node_id,
            g.suspect_after_s,
            g.dead_after_s,
            g.snapshot_timeout_s,
            forget_after_s=g.forget_s,
        )
        # Prometheus; served when metrics_port > 0.
        self.metrics = NodeMetrics(config, str(getattr(self.engine, "model_path", "")), self.log)
        self.context = c = NodeContext(
            config=config,
            engine=self.engine,
            peers=self.peers,
            metrics=self.metrics,
            log=self.log,
            shared_tenants=frozenset(config.tenant_shared),
        )
        self.counters = c.counters
        self.count = c.count
        # Fault injection (config [faults], zmesh/faults.py); off: one bool test per send.
        self.faults = FaultControl(
            P.FaultSettings(
                delay_ms=config.faults.delay_ms,
                partition=list(config.faults.partition),
                drop_deltas=config.gossip.drop_deltas,
            ),
            config.faults.control_file,
        )
        # The parts, each given what it uses (no part reaches back into the Node).
        self.transport = t = Transport(c, self.faults)
        self.load = Load(config.max_queue, self.engine)
        self.kv = KvPeer(
            self.engine,
            config.routing,
            c.namespace,
            on_engine(self.engine),
            t.send,
            lambda: t.serve,
            c.count,
            self.log,
        )
        self.inflight = InFlight()
        self.advertiser = Advertiser(c, t, self.load, self.epoch)
        self.advert = self.advertiser.advert
        self.worker = Worker(
            c,
            t,
            self.load,
            self.kv,
            self.advertiser.flush_deltas,
            self.inflight.done,
        )
        self.pipeline = Pipeline(
            c, t, self.load, self.kv, self.worker.enqueue, self.worker.acknowledge
        )
        self.routing = self.pipeline.settings
        self.policy_state = self.pipeline.policy_state
        self.membership = Membership(
            c, t, self.load, self.advertiser, self.kv, self.pipeline.fail_forwards_to
        )
        self.push = KvPush(c, t, self.load, self.kv, self.routing, on_engine(self.engine))
        self.status = NodeStatus(c, self.load, self.advertiser, self.inflight, t.faults)
        self.admission = Admission(
            c,
            t,
            self.inflight,
            self.pipeline,
            self.worker,
            self.advertiser,
            self.membership,
            self.kv,
            self.status.message,
            self.push,
        )
        # What other modules (the HTTP front, tests, the CLI) read of a node.
        self.serve_addr = t.serve_addr
        self.gossip_addr = t.gossip_addr
        self.keys = t.keys
        self.authorized = t.authorized
        self.ctx: zmq.asyncio.Context = t.zctx
        self.ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._zap: ZapHandler | None = None
        self.runtime = Runtime(config.runtime)  # GIL switch interval, gc.freeze

    @property
    def serve(self) -> zmq.asyncio.Socket:
        """The serve ROUTER (bound by `run`)."""
        return self.transport.serve

    def queue_depth(self) -> int:
        return self.load.depth()

    def backlog_s(self) -> float:
        """Predicted seconds until a request arriving now would start here."""
        return self.load.backlog_s()

    # ---- lifecycle -------------------------------------------------------

    async def run(self) -> None:
        """Bind, join the mesh and serve until `stop()`."""
        self.loop = asyncio.get_running_loop()
        t = self.transport
        if self.keys is not None:
            # The ZAP handler is bound before any CURVE server socket exists.
            self._zap = ZapHandler(
                self.ctx,
                self.authorized,
                self.admission.on_auth_denied,
                on_suppressed=self.admission.on_auth_suppressed,
            )
            self._tasks.append(asyncio.create_task(self._zap.run(), name="zap"))
        t.bind(self._on_peer_reply)  # also connects the seeds
        self.metrics.start(self.loop, self.status.view)
        t.faults.apply(self.faults.current, "config")
        t.faults.poll()  # a lab's control file may be there before we start
        self._tasks += [
            asyncio.create_task(coro, name=name)
            for name, coro in [
                ("serve", self.admission.serve_loop()),
                ("sub", self.membership.sub_loop()),
                ("worker", self.worker.run()),
                ("gossip", self.membership.gossip_loop()),
                ("ping", self.membership.ping_loop()),
                ("progress", self.worker.progress_loop()),
                ("delay", t.faults.delayed.run()),
                ("push", self.push.loop()),
            ]
        ]
        # Up (model loaded, parts built); no request was read yet (no await since bind).
        self.runtime.apply()
        self.log.info(
            "node.started",
            serve=self.serve_addr,
            gossip=self.gossip_addr,
            epoch=self.epoch,
            policy=self.routing.policy,
            slots=self.engine.n_slots,
            model=str(self.engine.model_path),
            **self.runtime.log_fields(),
        )
        if self.keys is None:
            # Said in every keyless node's log (compose labs included): who is trusted.
            self.log.warning(
                "security.off",
                note="no [security] keys: anyone who can reach the serve and gossip ports "
                "is trusted as a client and as a peer (docs/security.md)",
            )
        self.ready.set()
        http = None
        try:
            if self.config.http.port:  # the OpenAI-compatible API (zmesh/http/)
                from zmesh.http import HttpFront

                http = HttpFront(self)
                await http.start()
            await self._stopping.wait()
        finally:
            if http is not None:
                await http.stop()
            # No heartbeat after this: cancelling the running requests empties the
            # queue, and a last "idle" heartbeat would draw forwards to a node that is
            # about to vanish (its peers find it dead instead, as after a crash).
            gossip = [task for task in self._tasks if task.get_name() == "gossip"]
            for task in gossip:
                task.cancel()
            await asyncio.gather(*gossip, return_exceptions=True)
            # Running requests end (cancelled) before the sockets close.
            await self.worker.stop()
            await self.push.stop()
            tasks = [*self._tasks, *t.tasks()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.metrics.stop()
            if self._zap is not None:
                self._zap.close()
            t.close()
            if self._own_engine:
                await asyncio.get_running_loop().run_in_executor(None, self.engine.close)
            self.pipeline.tokenizer.shutdown(wait=True, cancel_futures=True)
            self.runtime.restore()
            self.log.info("node.stopped")

    def stop(self) -> None:
        self._stopping.set()

    def _on_peer_reply(self, msg: P.Message) -> None:
        """A message a peer sent back on one of our DEALERs, to the part awaiting it."""
        if isinstance(msg, P.KvPart | P.Error) and self.kv.on_reply(msg):
            return  # an answer to one of our KV fetches (whatever its error code)
        if isinstance(msg, P.KvOfferReply | P.Error) and self.push.on_reply(msg):
            return  # an answer to our KV offer (holder push)
        if isinstance(msg, P.Chunk | P.Done | P.Error | P.Progress):
            self.pipeline.relay.on_reply(msg)
        elif isinstance(msg, P.Snapshot):
            self.membership.on_snapshot(msg)
        elif isinstance(msg, P.Pong):
            self.membership.on_pong(msg)


def run_node(config: NodeConfig, on_ready: Callable[[Node], None] | None = None) -> None:
    """Run a node in this process until SIGINT/SIGTERM."""
    import signal

    async def main() -> None:
        node = Node(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, node.stop)
        task = asyncio.create_task(node.run())
        await node.ready.wait()
        if on_ready:
            on_ready(node)
        await task

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
