"""A forward's way to a peer and back: the `Relay`.

A forward goes out once, under a fresh wire id, with the prompt as token ids, and its
replies are relayed under the caller's id. It falls back to local service (the
pipeline's call) when it cannot be sent, errs, times out (`forward_timeout_s` to the
first reply, then `PROGRESS_MISSES` keep-alive periods) or its peer turns suspect,
unless the deadline has passed; a peer's `busy` (holder-side admission, before any
token) is handed back as "busy". A caller's Cancel follows its forward to the peer.
The forwards in flight (`Relay.forwards`) are also what routing counts as work sent
to a peer that its heartbeat cannot include yet.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from zmesh import protocol as P
from zmesh.node.context import NodeContext
from zmesh.node.load import Load, expired
from zmesh.node.request import RequestContext
from zmesh.node.transport import Transport
from zmesh.routing import Candidate, Decision, RoutingSettings
from zmesh.routing.admission import admission_bar

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
    envelope: list[bytes] = field(default_factory=list)  # the caller's: replies go there
    reason: str = ""  # the routing decision's reason, written into the relayed Done
    cancelled: bool = False  # the caller cancelled: never served here instead
    relayed: bool = False  # a Chunk went to the caller: a fallback is "partial"
    ended: bool = False  # a Done, an Error or a failure came: later frames are stale
    replies: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True, slots=True)
class Route:
    """A routing decision and the candidates it was made from (by node id)."""

    decision: Decision
    candidates: dict[str, Candidate]


class Relay:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        settings: RoutingSettings,
        bar_extra_s: Callable[[RequestContext], float],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._settings = settings
        # What the admission bar adds for this request (its evictions' prefill here).
        self._bar_extra_s = bar_extra_s
        self.forwards: dict[str, Forward] = {}  # by wire id

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
            admit_bar_s=admission_bar(decision, self._settings, self._bar_extra_s(req)),
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
            envelope=envelope,
            reason=decision.reason,
        )
        peer.forward_started()
        c.count("forwards")
        c.log.info(
            "request.forwarded",
            request_id=rid,
            wire_id=wid,
            target=peer.node_id,
            reason=decision.reason,
        )
        timeout = gap = c.config.routing.forward_timeout_s
        try:
            while True:
                try:
                    # asyncio.timeout, not wait_for: wait_for (3.11) wraps the get in a
                    # task of its own, one more task and loop turn for every reply.
                    async with asyncio.timeout(self._forward_wait_s(msg, gap)):
                        reply = await fwd.replies.get()
                except TimeoutError:
                    reply, why = _FALLBACK, f"no reply for {gap:g}s"
                else:
                    why = "peer failed"
                if isinstance(reply, P.Done):
                    return "done"  # relayed to the caller as it came (on_reply)
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
                if isinstance(reply, P.Error) and reply.code == P.BUSY and not fwd.relayed:
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
                        partial=fwd.relayed,
                    )
                    t.send(dealer, [], P.Cancel(request_id=wid))
                    return "partial" if fwd.relayed else "none"
        finally:
            self.forwards.pop(wid, None)
            peer.forward_finished()

    def on_reply(self, msg: P.Chunk | P.Done | P.Error | P.Progress) -> None:
        """A peer's reply to one of our forwards (by wire id); others are stale.

        Chunks and the Done go to the caller here, as they are read: not through the
        forward's task, which would add a loop turn (behind whatever else is ready)
        to every answer's way back. The task gets the Done, Errors and Progress to
        decide what comes next. Replies are decoded and re-encoded, not relayed as
        the peer's frames: the caller knows the request by its own id, not the wire
        id, and a Done's route fields are rewritten here. Passing frames through
        untouched needs a wire change (ids the peer could answer under, route fields
        the forwarder appends), so it is left for now."""
        fwd = self.forwards.get(msg.request_id or "")
        if fwd is None or fwd.ended:
            return
        msg.request_id = fwd.request_id  # relayed under the caller's own id
        if isinstance(msg, P.Chunk):
            fwd.relayed = True
            self._t.reply(fwd.envelope, msg)
            return
        if isinstance(msg, P.Done):
            self._relay_done(fwd, msg)
        fwd.ended = isinstance(msg, P.Done | P.Error)
        fwd.replies.put_nowait(msg)

    def _relay_done(self, fwd: Forward, done: P.Done) -> None:
        c = self._c
        self._check_served_by(done, fwd.target)
        done.route_reason = fwd.reason
        done.route_path = [c.node_id, done.served_by]
        self._t.reply(fwd.envelope, done)
        c.count("requests_forwarded_ok")
        c.metrics.answered(done, local=False)

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

    def fail_to(self, node_id: str) -> None:
        """``node_id`` turned suspect, dead or was forgotten: its forwards fall back."""
        for fwd in self.forwards.values():
            if fwd.target == node_id and not fwd.ended:
                fwd.ended = True  # its later frames, if any, are not relayed
                fwd.replies.put_nowait(_FALLBACK)
