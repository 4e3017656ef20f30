"""A request's way through a node once admitted: route, forward or queue, deadlines.

`accept` tokenizes (off the loop) and makes the request's `RequestContext` (block ids
and local match, once); `route` builds the routing candidates (this node from its
engine and load, each live peer from its estimate), asks `routing.decide` and returns
both. A forward goes out once, under a fresh wire id, with the prompt as token ids,
and its replies are relayed under the caller's id; it falls back to local service when
it cannot be sent, errs, times out (`forward_timeout_s` to the first reply, then
`PROGRESS_MISSES` keep-alive periods) or its peer turns suspect, unless the deadline
has passed. A caller's Cancel follows its forward to the peer. A "shipped" decision
starts the KV pull while the job queues.

Holder-side admission (`zmesh.routing.admission`): a forward carries a bar
(`Generate.admit_bar_s`); a node receiving one estimates its own first token from the
local candidate `route` would build and, past the bar, answers `busy` before queueing.
The forwarder then decides again without the peers that refused (the runner-up under
a fresh wire id), up to ``admit_retries``, else serves it here (reason ``refused``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import msgspec

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
from zmesh.node.request import RequestContext, prompt_tokens
from zmesh.node.transport import Transport
from zmesh.peers import PeerEstimate
from zmesh.routing import (
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
)
from zmesh.routing.admission import admission_bar, admit, after_refusal
from zmesh.routing.shipping import evict_held, evict_log_fields

# A forwarder waits this long past a request's deadline for the peer's own
# deadline_exceeded (which says where the time went) before answering it itself.
DEADLINE_GRACE_S = 0.25
# A forward whose peer sent Progress waits this many of its keep-alive periods for the
# next frame before serving locally.
PROGRESS_MISSES = 3
_FALLBACK = object()  # sentinel pushed into a forward's queue when its peer fails


@dataclass(slots=True)
class Forward:
    target: str
    sent_at: float  # monotonic
    cost_s: float  # predicted service time at the target
    prefill_s: float = 0.0  # of which, its prefill there (candidates.unreported_s)
    request_id: str = ""  # the caller's id; the peer knows it by its wire id (see forward)
    scope: bytes = b""  # the caller's scope: its Cancel follows the forward
    cancelled: bool = False  # the caller cancelled: never served here instead
    replies: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision and the candidates it was made from (by node id)."""

    decision: Decision
    candidates: dict[str, Candidate]


class Pipeline:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        kv: KvPeer,
        enqueue: Callable[[Job], bool],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._kv = kv
        self._enqueue = enqueue
        # No give-up: a forward is waited for while the peer sends Progress.
        self.settings: RoutingSettings = ctx.config.routing.settings(
            ship_max_tokens=ctx.engine.max_ship_tokens, give_up_s=0.0
        )
        self.policy_state = PolicyState.seeded(int.from_bytes(ctx.node_id.encode()[:8], "little"))
        self.forwards: dict[str, Forward] = {}  # by wire id
        # Tokenizing is off the loop (a long prompt takes seconds) and not queued behind
        # the engine's work: routing needs the tokens before the request is queued.
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
            outcome = await self.forward(req, route)
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
        ship = self.settings.ship
        if ship:  # a pull's import overwrites a slot here: charged to it, less what peers hold
            evicts, victim = c.engine.import_victim(tokens, req.namespace)
            held = evict_held(c.peers.alive(), victim, bs)
            local = dataclasses.replace(local, ship_evict_tokens=evicts, ship_evict_held=held)
        local_match = local.matched_tokens
        cands = [local]
        for peer in c.peers.alive():
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
                for f in self.forwards.values()
                if f.target == peer.node_id
            ),
            peer.last_heard,
            free_places(peer.places, peer.queue_depth),
        )

    # ---- forwarding ----------------------------------------------------------

    async def forward(self, req: RequestContext, route: Route) -> str:
        """Relay the request through a peer: "done"; "busy" when the peer refused it
        (admission) before any token; or "none"/"partial" to fall back."""
        c, t = self._c, self._t
        msg, envelope, decision = req.msg, req.envelope, route.decision
        peer = c.peers.get(decision.target)
        dealer = t.dealer_for(peer) if peer else None
        rid = msg.request_id
        # A fresh id on the wire for every forward: ids are per caller, and a late reply
        # to an abandoned forward must never answer a later one of the same id. The
        # caller's id as its prefix keeps it traceable in the peer's logs.
        wid = f"{rid[: P.MAX_ID_CHARS - 17]}~{os.urandom(8).hex()}"
        # The prompt goes as token ids: peers run the same model (fingerprints are
        # enforced equal), so the peer checks their count and range but never
        # tokenizes again.
        fwd_msg = msgspec.structs.replace(
            msg,
            prompt=None,
            tokens=req.tokens,
            request_id=wid,
            hops=msg.hops + 1,
            origin=c.node_id,
            progress=True,
            admit_bar_s=admission_bar(
                decision, self.settings, self._evict_tokens(req) * self._rates()[0]
            ),
        )
        if dealer is None or peer is None or not t.send(dealer, [], fwd_msg):
            c.log.warning(
                "request.fallback", request_id=rid, target=decision.target, why="peer not connected"
            )
            return "none"
        target = route.candidates.get(peer.node_id)
        new_tokens = len(req.tokens) - (target.matched_tokens if target else 0)
        fwd = self.forwards[wid] = Forward(
            target=peer.node_id,
            sent_at=time.monotonic(),
            cost_s=self._load.predict_s(max(new_tokens, 1), msg.params.max_tokens),
            prefill_s=self._load.predict_prefill_s(new_tokens),
            request_id=rid,
            scope=req.scope,
        )
        peer.inflight += 1
        c.count("forwards")
        c.log.info(
            "request.forwarded",
            request_id=rid,
            wire_id=wid,
            target=peer.node_id,
            reason=decision.reason,
        )
        relayed = False
        timeout = gap = c.config.routing.forward_timeout_s
        try:
            while True:
                try:
                    reply = await asyncio.wait_for(
                        fwd.replies.get(), self._forward_wait_s(msg, gap)
                    )
                except TimeoutError:
                    reply, why = _FALLBACK, f"no reply for {gap:g}s"
                else:
                    why = "peer failed"
                if isinstance(reply, P.Progress):
                    # The peer holds the request (queued or running): a long answer is
                    # no failure, so wait while its keep-alives come and it stays alive.
                    gap = max(timeout, PROGRESS_MISSES * reply.interval_s)
                    continue
                if expired(msg) and (reply is _FALLBACK or isinstance(reply, P.Error)):
                    # Too late to start over here: answer once, with the peer's own
                    # deadline error when it sent one, and stop the peer's work.
                    if isinstance(reply, P.Error) and reply.code == P.DEADLINE_EXCEEDED:
                        t.reply(envelope, reply)
                        c.log.info("request.deadline_relayed", request_id=rid, peer=peer.node_id)
                    else:
                        t.send(dealer, [], P.Cancel(request_id=wid))
                        t.deadline_error(envelope, rid, f"deadline passed at {peer.node_id}")
                    return "done"
                if fwd.cancelled and (reply is _FALLBACK or isinstance(reply, P.Error)):
                    return "done"  # cancelled by its caller: nothing to serve here
                if isinstance(reply, P.Error) and reply.code == P.BUSY and not relayed:
                    # Admission, not a failure: the peer never queued it.
                    c.count("forwards_busy")
                    c.log.info(
                        "request.busy",
                        request_id=rid,
                        wire_id=wid,
                        target=peer.node_id,
                        why=reply.message,
                    )
                    return "busy"
                if reply is _FALLBACK or isinstance(reply, P.Error):
                    detail = reply.message if isinstance(reply, P.Error) else why
                    c.log.warning(
                        "request.fallback",
                        request_id=rid,
                        target=peer.node_id,
                        why=detail,
                        partial=relayed,
                    )
                    t.send(dealer, [], P.Cancel(request_id=wid))
                    return "partial" if relayed else "none"
                if isinstance(reply, P.Chunk):
                    relayed = True
                    t.reply(envelope, reply)
                elif isinstance(reply, P.Done):
                    self._check_served_by(reply, peer.node_id)
                    reply.route_reason = decision.reason
                    reply.route_path = [c.node_id, reply.served_by]
                    t.reply(envelope, reply)
                    c.count("requests_forwarded_ok")
                    c.metrics.answered(reply, local=False)
                    return "done"
        finally:
            self.forwards.pop(wid, None)
            peer.inflight = max(0, peer.inflight - 1)

    def on_reply(self, msg: P.Chunk | P.Done | P.Error | P.Progress) -> None:
        """A peer's reply to one of our forwards (by wire id); others are stale.

        Replies are decoded and re-encoded, not relayed as the peer's frames: the
        caller knows the request by its own id, not the wire id, and a Done's route
        fields are rewritten here (`forward`). Passing frames through untouched needs
        a wire change (ids the peer could answer under, route fields the forwarder
        appends), so it is left for now."""
        fwd = self.forwards.get(msg.request_id or "")
        if fwd is not None:
            msg.request_id = fwd.request_id  # relayed under the caller's own id
            fwd.replies.put_nowait(msg)

    def _check_served_by(self, done: P.Done, target: str) -> None:
        """A forwarded answer was served by the peer it went to, or by a node we know
        that the peer says it relayed it to (max_hops > 1). Any other claim is logged
        and replaced by the peer's id: the peer answers for what it sent."""
        claimed = done.served_by
        relayed = (
            done.route_path == [target, claimed]
            and claimed != self._c.node_id
            and self._c.peers.get(claimed) is not None
        )
        if claimed == target or relayed:
            return
        self._c.count("forwards_served_by_mismatch")
        self._c.log.warning(
            "request.served_by_mismatch",
            request_id=done.request_id,
            target=target,
            claimed=claimed,
            route_path=done.route_path,
        )
        done.served_by = target

    def _forward_wait_s(self, msg: P.Generate, wait: float) -> float:
        """How long to wait for a peer's next reply: ``wait``, cut short by the request's
        deadline (plus a grace for the peer's own deadline error)."""
        if msg.deadline is not None:
            wait = min(wait, max(msg.deadline - time.time(), 0.0) + DEADLINE_GRACE_S)
        return wait

    def cancel_forwards(self, scope: bytes, rid: str) -> None:
        """A caller cancels a request this node forwarded: the Cancel follows it to the
        peer (under the forward's wire id), whose cancelled Done is then relayed."""
        for wid, fwd in self.forwards.items():
            if fwd.scope == scope and fwd.request_id == rid:
                fwd.cancelled = True
                peer = self._c.peers.get(fwd.target)
                dealer = self._t.dealer_for(peer) if peer else None
                if dealer is not None:
                    self._t.send(dealer, [], P.Cancel(request_id=wid))
                    self._c.log.info("request.cancel_forwarded", request_id=rid, target=fwd.target)

    def fail_forwards_to(self, node_id: str) -> None:
        """``node_id`` turned suspect, dead or was forgotten: its forwards and KV pulls
        fall back at once."""
        for fwd in self.forwards.values():
            if fwd.target == node_id:
                fwd.replies.put_nowait(_FALLBACK)
        self._kv.fail_pulls(node_id)
