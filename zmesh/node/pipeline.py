"""A request's way through a node once admitted: route, forward or queue, deadlines.

`accept` tokenizes (off the loop) and makes the request's `RequestContext` (block ids
and local match, once); `route` builds the routing candidates (this node from its
engine and load, each live peer from its estimate), asks `routing.decide` and returns
both. A forward goes through the `Relay` (zmesh/node/relay.py: wire ids, keep-alive
waits, relaying, a caller's Cancel); when it cannot be sent, errs, times out or its
peer turns suspect the request is served here (unless its deadline has passed). A
"shipped" decision starts the KV pull while the job queues.

Holder-side admission (`zmesh.routing.admission`): a forward carries a bar
(`Generate.admit_bar_s`); a node receiving one estimates its own first token from the
local candidate `route` would build and, past the bar, answers `busy` before queueing.
The forwarder then decides again without the peers that refused (the runner-up under
a fresh wire id), up to ``admit_retries``, else serves it here (reason ``refused``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from zmesh import protocol as P
from zmesh.candidates import (
    DEFAULT_LINK_DELAY_S,
    DEFAULT_PREFILL_S_PER_TOKEN,
    DEFAULT_SERVICE_S,
    free_places,
    head_key,
    local_candidate,
    peer_candidate,
    ship_fixed_s,
    unreported_s,
)
from zmesh.engine import EngineError
from zmesh.kvpeer import KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.load import Job, Load, expired, peer_median
from zmesh.node.relay import Relay, Route
from zmesh.node.request import RequestContext, prompt_tokens
from zmesh.node.transport import Transport
from zmesh.peers import PeerEstimate
from zmesh.routing import Candidate, PolicyState, RouteRequest, RoutingSettings, decide
from zmesh.routing.admission import admit, after_refusal
from zmesh.routing.shipping import evict_held, evict_log_fields


class Pipeline:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        kv: KvPeer,
        enqueue: Callable[[Job], bool],
        acknowledge: Callable[[tuple[bytes, str]], None],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._kv = kv
        self._enqueue = enqueue
        # A forwarder waiting on us hears first when we hold its request (Worker.watch).
        self._acknowledge = acknowledge
        # No give-up: a forward is waited for while the peer sends Progress.
        self.settings: RoutingSettings = ctx.config.routing.settings(
            ship_max_tokens=ctx.engine.max_ship_tokens, give_up_s=0.0
        )
        self.policy_state = PolicyState.seeded(int.from_bytes(ctx.node_id.encode()[:8], "little"))
        # Forwards to peers (zmesh/node/relay.py): the bar carries our evictions' prefill.
        self.relay = Relay(
            ctx,
            transport,
            load,
            self.settings,
            lambda req: self._evict_tokens(req) * self._rates()[0],
        )
        # Tokenizing a long prompt is off the loop (it takes seconds; a short one is done
        # on the loop, `request.prompt_tokens`) and not queued behind the engine's work:
        # routing needs the tokens before the request is queued.
        self.tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")

    async def accept(
        self,
        envelope: list[bytes],
        msg: P.Generate,
        received: float,
        client: bytes | None,
        scope: bytes,
    ) -> bool:
        """Route and serve or relay an admitted request; True once queued for the worker
        (which then owns its in-flight count)."""
        c = self._c
        rid = msg.request_id
        c.count("requests_received")
        c.log.info(
            "request.received", request_id=rid, hops=msg.hops, origin=msg.origin, tenant=msg.tenant
        )
        if expired(msg):
            self._t.deadline_error(envelope, rid, "deadline passed before the request arrived")
            return False
        try:
            tokens = await prompt_tokens(c.engine, self.tokenizer, msg)
        except EngineError as exc:
            c.count("requests_failed")
            c.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            self._t.reply_error(envelope, rid, exc.code, exc.message)
            return False
        # The request's facts, once: tokens, block ids, local match.
        req = RequestContext.build(
            c.engine, msg, envelope, scope, client, c.namespace(msg.tenant), tokens, received
        )
        if self._refuse_busy(req):
            return False
        path = [*((msg.origin and [msg.origin]) or []), c.node_id]
        route = self.route(req)
        decision = route.decision
        attempt = 0
        reason = decision.reason
        refused: list[str] = []
        while decision.forward:
            self._acknowledge(req.key)  # forwarded on (max_hops > 1): in hand here
            outcome = await self.relay.forward(req, route)
            if outcome == "done":
                return False
            # The cache moved on while the forward was out: match again before
            # deciding again or predicting the local service.
            req = req.rematched(c.engine)
            if outcome == "busy":
                # Refused before any token: ask the runner-up (its own wire id), or
                # serve it here once admit_retries refusals are spent.
                refused.append(decision.target)
                route = self.route(req, refused=refused)
                decision = route.decision
                reason = decision.reason
                continue
            attempt = 1 if outcome == "partial" else 0
            c.count("forward_fallbacks")
            reason = "fallback"
            break
        new_tokens = len(tokens) - req.local_match
        kv_pull = None
        if decision.pull_from is not None:  # "shipped": pull while the job queues
            peer = c.peers.get(decision.pull_from)
            dealer = self._t.dealer_for(peer) if peer else None
            kv_pull = self._kv.start_pull(
                decision.pull_from, peer, dealer, req.tokens[: decision.pull_tokens], msg
            )
        if kv_pull is not None:
            new_tokens = len(tokens) - decision.pull_tokens
        elif decision.pull_from is not None:
            reason = "fallback"  # the pull could not start: prefilled here, so said
        job = Job(
            req=req,
            route_reason=reason,
            route_path=path,
            attempt=attempt,
            predicted_s=self._load.predict_s(max(new_tokens, 1), msg.params.max_tokens),
            prefill_s=self._load.predict_prefill_s(new_tokens),
            kv_pull=kv_pull,
            pulled_from=decision.pull_from if kv_pull is not None else None,
        )
        if not self._enqueue(job):  # refused (overloaded): nothing will release it
            if kv_pull is not None:
                kv_pull.cancel()
            return False
        return True

    def _refuse_busy(self, req: RequestContext) -> bool:
        """Holder-side admission: refuse (``busy``, before queueing) a forward whose first
        token this node predicts later than its forwarder's bar; True when refused."""
        msg = req.msg
        if msg.hops == 0 or msg.admit_bar_s is None or not self.settings.admission:
            return False
        prefill, service = self._rates()
        local = self._local_candidate(req, prefill, service)
        evict = self._evict_tokens(req)
        ok, est = admit(local, len(req.tokens), msg.admit_bar_s, self.settings, evict)
        c = self._c
        if ok:
            c.count("forwards_admitted")
            return False
        c.count("forwards_refused_busy")
        c.log.info(
            "request.refused_busy",
            request_id=msg.request_id,
            est_s=round(est, 4),
            bar_s=round(msg.admit_bar_s, 4),
            origin=msg.origin,
        )
        self._t.reply_error(
            req.envelope,
            msg.request_id,
            P.BUSY,
            f"first token in {est:.3f}s here, past the bar of {msg.admit_bar_s:.3f}s",
        )
        return True

    # ---- routing -----------------------------------------------------------

    def _rates(self) -> tuple[float, float]:
        """(prefill s/token, service s): measured here, else borrowed from peers."""
        c = self._c
        st = c.engine.stats
        prefill = st.prefill_s_per_token or peer_median(
            c.peers.alive(), "prefill_s_per_token", DEFAULT_PREFILL_S_PER_TOKEN
        )
        service = st.service_s or peer_median(c.peers.alive(), "service_s", DEFAULT_SERVICE_S)
        return prefill, service

    def _evict_tokens(self, req: RequestContext) -> int:
        """Cached tokens serving ``req`` here would overwrite, when admission counts them."""
        if not (self.settings.admission and self.settings.admit_evictions):
            return 0
        return self._c.engine.evict_tokens(req.tokens, req.namespace)

    def _local_candidate(self, req: RequestContext, prefill: float, service: float) -> Candidate:
        """This node as routing (and admission) sees it: real match, queue and backlog."""
        c = self._c
        return local_candidate(
            c.node_id,
            req.local_match,
            self._load.depth(),
            self._load.backlog_s(),
            prefill,
            service,
        )

    def route(self, req: RequestContext, refused: Sequence[str] = ()) -> Route:
        """Decide where the request goes; ``refused``: peers that refused it as busy, in
        order (`after_refusal`: left out, and past admit_retries it is served here)."""
        c = self._c
        t0 = time.perf_counter()
        msg, tokens = req.msg, req.tokens
        ids, bs = req.block_ids, req.block_size
        prefill, service = self._rates()
        local = self._local_candidate(req, prefill, service)
        # At the hop limit the request is served here whatever the peers hold
        # (`decide`): their candidates would only be logged, so they are not built.
        # This is the holder's side of every forward, on its way to the engine.
        at_limit = msg.hops >= self.settings.max_hops
        if self.settings.evict_charge and not at_limit:  # what a miss here overwrites
            local = dataclasses.replace(local, evict_tokens=self._load.miss_evict_tokens())
        ship = self.settings.ship and not at_limit
        if ship:  # a pull's import overwrites a slot here: charged to it, less what peers hold
            evicts, victim = c.engine.import_victim(tokens, req.namespace)
            held = evict_held(c.peers.alive(), victim, bs)
            local = dataclasses.replace(local, ship_evict_tokens=evicts, ship_evict_held=held)
        local_match = local.matched_tokens
        cands = [local]
        for peer in () if at_limit else c.peers.alive():
            link = peer.link_delay_s or DEFAULT_LINK_DELAY_S
            cands.append(
                peer_candidate(
                    peer,
                    peer.match_blocks(ids) * bs,
                    inflight=peer.inflight,
                    unreported_s=self._unreported_forwards_s(peer),
                    link_delay_s=link,
                    prefill_s_per_token=prefill,
                    service_s=service,
                    ship_s_per_token=self._kv.costs.ship_s_per_token(peer.node_id)
                    if ship
                    else None,
                    # The round trip, and the holder's pause until its next decode step.
                    ship_fixed_s=ship_fixed_s(link),
                )
            )
        head = head_key(ids, tokens, bs, c.config.routing.hash_prefix_tokens)
        rr = RouteRequest(
            prompt_tokens=len(tokens), hops=msg.hops, head_key=head, block_ids=ids, block_size=bs
        )
        if refused:
            decision = after_refusal(rr, cands, refused, self.settings, self.policy_state)
        else:
            decision = decide(rr, cands, self.settings, self.policy_state)
        c.count(f"route_{decision.reason}")
        c.log.info(
            "route.decided",
            request_id=msg.request_id,
            policy=self.settings.policy,
            prompt_tokens=len(tokens),
            local_match=local_match,
            # The rates this node's own estimate used (measured, else borrowed).
            prefill_s_per_token=prefill,
            service_s=service,
            # With the scores: each estimate's parts (wait: its backlog, our unreported
            # forwards included; the rest is the prefill of what it lacks, and the link).
            candidates={
                cd.node_id: {
                    "match": cd.matched_tokens,
                    "queue": cd.queue_depth,
                    "wait": round(cd.wait_s or 0.0, 4),
                }
                for cd in cands
            },
            decide_us=round((time.perf_counter() - t0) * 1e6, 1),
            **({"refused": list(refused)} if refused else {}),
            # What a pull's import would overwrite here, and which peers hold it too.
            **(evict_log_fields(local) if ship else {}),
            **decision.log_fields(),
        )
        return Route(decision, {cd.node_id: cd for cd in cands})

    def _unreported_forwards_s(self, peer: PeerEstimate) -> float:
        """Work we sent to ``peer`` since its last heartbeat, which cannot include it yet."""
        return unreported_s(
            (
                (f.sent_at, f.cost_s, f.prefill_s)
                for f in self.relay.forwards.values()
                if f.target == peer.node_id
            ),
            peer.last_heard,
            free_places(peer.places, peer.queue_depth),
        )

    def fail_forwards_to(self, node_id: str) -> None:
        """``node_id`` turned suspect, dead or was forgotten: its forwards and KV pulls
        fall back at once."""
        self.relay.fail_to(node_id)
        self._kv.fail_pulls(node_id)
