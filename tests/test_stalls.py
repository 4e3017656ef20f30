"""Stalls: huge prompts, slow peers and one peer's claims, on real sockets and the real model.

- A prompt of megabytes is refused before it is tokenized, and tokenizing (which
  takes seconds for megabytes) runs off the event loop: the node keeps answering and
  heartbeating, so its peers never take it for dead.
- A forward whose peer takes longer than `forward_timeout_s` (a long answer, or a
  queue) is waited for while the peer sends Progress keep-alives: served once, there.
- Without keys, one peer's heartbeat does not set a node's own cost estimate, and a
  forwarded answer's `served_by` is the peer it went to.
- A forward carries the prompt as token ids (never re-tokenized by the peer), and the
  peer still bounds their count and range.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio
from meshkit import (
    RawClient,
    RunningNode,
    generate,
    idle_heartbeat,
    is_request,
    log_events,
    node_config,
    started,
)

from zmesh import protocol as P
from zmesh.client import AsyncClient
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.lab import Lab, free_ports
from zmesh.node import BORROW_FACTOR, DEFAULT_PREFILL_S_PER_TOKEN

# One thread per node: the nodes share 2 cores with the test.
N_SLOTS = 3
ENGINE = {"n_slots": N_SLOTS, "slot_ctx": 1024, "n_threads": 1}
FORWARD_TIMEOUT_S = 1.0  # small, so that "slower than the timeout" stays short
HUGE_CHARS = 8_000_000  # under MAX_FRAME_BYTES (8 MiB) with the rest of the frame
HEAD = "The following are multiple choice questions (with answers) about geology.\n\n" + "".join(
    f"Question {i}: Which rock forms from cooled lava number {i}? A. Basalt B. Marble "
    f"C. Shale D. Slate\nAnswer: A\n\n"
    for i in range(6)
)  # > hash_prefix_tokens (64): consistent_hash sends every prompt with it to one node
COUNT = "Count from 1 to 500, separated by commas: 1, 2, 3, 4, 5, 6,"


def text_of(n_chars: int, salt: int = 0) -> str:
    line = f"{salt} The quick brown fox jumps over the lazy dog. "
    return (line * (n_chars // len(line) + 1))[:n_chars]


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    # consistent_hash: where a request goes depends only on its head, not on load
    # estimates, so the tests can make a peer slow and still see the forward happen.
    lab = Lab(
        n_nodes=2,
        engine=ENGINE,
        policy="consistent_hash",
        routing={"forward_timeout_s": FORWARD_TIMEOUT_S},
    )
    with started(lab):
        yield lab


def rid_events(lab: Lab, i: int, event: str, rid: str) -> list[dict]:
    return [
        r for r in log_events(lab.nodes[i].log_path, event) if is_request(r.get("request_id"), rid)
    ]


# ---- item: a long prompt must not stall the node ----------------------------------------


@pytest.mark.slow
def test_huge_prompts_are_refused_while_the_node_stays_alive(lab2: Lab) -> None:
    """Three 8 MB prompts to node-a: each gets prompt_too_long, node-b never sees
    node-a suspect, and another client's small request on node-a is answered."""
    a, b = lab2.nodes
    suspect_after = lab2.node_config(1).gossip.suspect_after_s

    async def main() -> tuple[RawClient, RawClient, list[str], list[float]]:
        states: list[str] = []  # node-b's view of node-a, polled throughout
        status_rtt: list[float] = []  # node-a's own Status round trips
        stalled = asyncio.Event()
        stop = asyncio.Event()

        async def watch_b() -> None:
            async with AsyncClient([b.serve], connect_timeout=5) as c:
                while not stop.is_set():
                    st = await c.status(b.serve, timeout=30)
                    state = next(p.state for p in st.peers if p.node_id == a.name)
                    states.append(state)
                    if state != "alive":
                        stalled.set()
                    await asyncio.sleep(0.05)

        async def time_a() -> None:
            async with AsyncClient([a.serve], connect_timeout=5) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    await c.status(a.serve, timeout=60)
                    status_rtt.append(time.monotonic() - t0)
                    await asyncio.sleep(0.05)

        async with RawClient([a.serve]) as huge, RawClient([a.serve]) as small:
            watchers = [asyncio.create_task(watch_b()), asyncio.create_task(time_a())]
            try:
                events = [
                    await huge.send(a.serve, generate(f"huge-{i}", text_of(HUGE_CHARS, i), 4))
                    for i in range(3)
                ]
                events.append(await small.send(a.serve, generate("small", "Say hello.", 4)))

                async def answered() -> None:
                    await asyncio.gather(*(e.wait() for e in events))
                    # A stall shows within suspect_after_s: keep watching twice that longer.
                    await asyncio.sleep(2 * suspect_after)

                waits = [asyncio.create_task(answered()), asyncio.create_task(stalled.wait())]
                finished, pending = await asyncio.wait(
                    waits, timeout=300, return_when=asyncio.FIRST_COMPLETED
                )
                for t in pending:
                    t.cancel()
                assert finished, "no answers within 300 s"
            finally:
                stop.set()
                for w in watchers:
                    w.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
        return huge, small, states, status_rtt

    huge, small, states, rtt = asyncio.run(main())
    print(f"node-a Status round trips meanwhile: max {max(rtt, default=0):.3f}s of {len(rtt)}")
    assert states and set(states) == {"alive"}, f"node-b saw node-a as {set(states)}"
    assert not [r for r in log_events(b.log_path, "peer.suspect") if r.get("peer") == a.name]
    reply = small.tally.first("small")
    assert isinstance(reply, P.Done), reply
    for i in range(3):
        err = huge.tally.first(f"huge-{i}")
        assert isinstance(err, P.Error) and err.code == P.PROMPT_TOO_LONG, err
        assert err.node_id == a.name and "characters" in err.message
        logged = rid_events(lab2, 0, "request.failed", f"huge-{i}")
        assert logged and logged[0]["code"] == P.PROMPT_TOO_LONG


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    # Its own engine: nothing measured yet (the borrowed-estimate test needs that), and
    # a generous character bound so a long prompt does reach the tokenizer.
    eng = Engine(EngineConfig(n_slots=2, slot_ctx=2048, n_threads=1, prompt_chars_per_token=4096))
    yield eng
    eng.close()


def test_tokenizing_a_long_prompt_does_not_block_the_node(engine: Engine) -> None:
    """A prompt under the character bound but over the token bound takes seconds to
    tokenize: meanwhile the node keeps heartbeating (its peers would see it alive)."""
    ports = free_ports(2)
    cfg = node_config("stall", ports)
    ep = f"tcp://127.0.0.1:{ports[0]}"
    prompt = text_of(3_000_000)
    assert len(prompt) <= engine.max_prompt_chars

    async def main() -> tuple[list[float], P.Message]:
        ctx = zmq.asyncio.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(cfg.gossip_addr)
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(ep)
        times: list[float] = []  # the send, every heartbeat, the reply

        async def heartbeats() -> None:
            while True:
                if isinstance(P.decode(await sub.recv()), P.Heartbeat):
                    times.append(time.monotonic())

        try:
            # Subscribed once a heartbeat arrives (a PUB drops what precedes that).
            await asyncio.wait_for(sub.recv(), 30)
            hb_task = asyncio.create_task(heartbeats())
            times.append(time.monotonic())
            await dealer.send(P.encode(generate("long", prompt, 4)))
            try:
                reply = P.decode(await asyncio.wait_for(dealer.recv(), 120))
                times.append(time.monotonic())
            finally:
                hb_task.cancel()
                await asyncio.gather(hb_task, return_exceptions=True)
        finally:
            ctx.destroy(linger=0)
        return times, reply

    with RunningNode(cfg, engine):
        times, reply = asyncio.run(main())
    assert isinstance(reply, P.Error) and reply.code == P.PROMPT_TOO_LONG, reply
    assert "tokens" in reply.message  # refused after tokenizing, by the token bound
    silent = cfg.gossip.suspect_after_s
    busy = times[-1] - times[0]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    print(f"tokenizing took {busy:.2f}s; {len(times) - 2} heartbeats, longest gap {max(gaps):.3f}s")
    assert busy > silent, f"tokenized in {busy:.2f}s: too fast for this test to mean anything"
    assert max(gaps) < silent, f"the node was silent for {max(gaps):.2f}s"


# ---- items: a slow peer's forward is waited for, not redone -------------------------------


def owner_and_entry(lab: Lab) -> tuple[int, int]:
    """(index of the node consistent_hash sends HEAD's prompts to, index of the other)."""

    async def ask() -> P.Done | P.Error | None:
        async with RawClient([lab.nodes[0].serve]) as rc:
            return await rc.ask(lab.nodes[0].serve, generate("prime", HEAD + "Hi", 2), 120)

    done = asyncio.run(ask())
    assert isinstance(done, P.Done), done
    owner = next(i for i, n in enumerate(lab.nodes) if n.name == done.served_by)
    return owner, 1 - owner


def assert_served_once_by(lab: Lab, owner: int, entry: int, rid: str) -> None:
    assert not rid_events(lab, entry, "request.fallback", rid), "the forward was given up"
    assert not rid_events(lab, entry, "request.completed", rid), "served again at the entry"
    completed = rid_events(lab, owner, "request.completed", rid)
    assert len(completed) == 1 and completed[0]["hops"] == 1, completed
    assert completed[0]["finish"] != "cancelled"
    assert rid_events(lab, entry, "request.forwarded", rid)


@pytest.mark.slow
def test_a_forward_longer_than_the_timeout_is_served_once_by_the_peer(lab2: Lab) -> None:
    """Non-streaming, so the peer sends no Chunk: only its keep-alives say it works."""
    owner, entry = owner_and_entry(lab2)
    o, e = lab2.nodes[owner], lab2.nodes[entry]

    async def main() -> RawClient:
        async with RawClient([e.serve]) as rc:
            await rc.ask(e.serve, generate("long-answer", HEAD + COUNT, 300, deadline_s=600), 600)
            await rc.drain(FORWARD_TIMEOUT_S)  # a second answer would arrive here
        return rc

    tally = asyncio.run(main()).tally
    done = tally.first("long-answer")
    assert isinstance(done, P.Done), done
    assert tally.twice == []
    assert done.served_by == o.name and done.route_path == [e.name, o.name], done
    assert done.route_reason == "consistent_hash" and done.hops == 1
    # Precondition: the peer worked much longer than forward_timeout_s.
    busy_s = done.ttft_s + done.completion_tokens / max(done.decode_tps, 1e-9)
    assert busy_s > 2 * FORWARD_TIMEOUT_S, f"the peer answered in {busy_s:.2f}s: too fast"
    assert_served_once_by(lab2, owner, entry, "long-answer")


@pytest.mark.slow
def test_a_forward_queued_behind_other_work_is_waited_for(lab2: Lab) -> None:
    """The peer is busy with long requests in every slot; a streamed forward waits in
    its queue for longer than forward_timeout_s (no Chunk yet) and is still served
    there, once."""
    owner, entry = owner_and_entry(lab2)
    o, e = lab2.nodes[owner], lab2.nodes[entry]

    async def main() -> RawClient:
        async with RawClient([o.serve, e.serve]) as rc:
            # One long request per slot: the peer runs that many at once (batching).
            busy = [
                await rc.send(o.serve, generate(f"busy-{i}", HEAD + COUNT, 250, deadline_s=600))
                for i in range(N_SLOTS)
            ]
            give_up = time.monotonic() + 120
            async with AsyncClient([o.serve]) as c:
                while (await c.status(o.serve, timeout=30)).queue_depth < N_SLOTS:
                    assert time.monotonic() < give_up, "the busy requests never started"
                    await asyncio.sleep(0.05)
            queued = generate("queued", HEAD + "Name a red fruit.", 8, deadline_s=600)
            queued.stream = True
            await rc.ask(e.serve, queued, 600)
            for ev in busy:
                await asyncio.wait_for(ev.wait(), 600)
            await rc.drain(FORWARD_TIMEOUT_S)
        return rc

    tally = asyncio.run(main()).tally
    done = tally.first("queued")
    assert isinstance(done, P.Done), done
    assert all(isinstance(tally.first(f"busy-{i}"), P.Done) for i in range(N_SLOTS))
    assert tally.twice == []
    assert done.served_by == o.name and done.route_path == [e.name, o.name], done
    # Precondition: it waited in the peer's queue longer than forward_timeout_s.
    assert done.queue_s > FORWARD_TIMEOUT_S, f"queued only {done.queue_s:.2f}s"
    assert_served_once_by(lab2, owner, entry, "queued")


# ---- item: one peer's claims (keyless mesh) ------------------------------------------------


class FakePeer:
    """A made-up peer on real sockets: heartbeats with the figures it claims, and a serve
    ROUTER that answers every forward at once with a Done naming ``served_by``."""

    def __init__(self, node_id: str, engine: Engine, served_by: str, **claims: float) -> None:
        self.node_id, self.served_by = node_id, served_by
        serve_port, gossip_port = free_ports(2)
        self.serve = f"tcp://127.0.0.1:{serve_port}"
        self.gossip = f"tcp://127.0.0.1:{gossip_port}"
        hb = idle_heartbeat(
            node_id, self.serve, self.gossip, engine.block_size, engine.fingerprint.hex()
        )
        self.heartbeat = msgspec.structs.replace(hb, **claims)
        self.ctx = zmq.asyncio.Context()
        self.pub = self.ctx.socket(zmq.PUB)
        self.router = self.ctx.socket(zmq.ROUTER)
        for s in (self.pub, self.router):
            s.setsockopt(zmq.LINGER, 0)
        self.pub.bind(self.gossip)
        self.router.bind(self.serve)
        self.forwards: list[P.Generate] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._beat()), asyncio.create_task(self._serve())]

    async def _beat(self) -> None:
        while True:
            hb = msgspec.structs.replace(self.heartbeat, sent_at=time.time())
            await self.pub.send(P.encode(hb))
            await asyncio.sleep(0.1)

    async def _serve(self) -> None:
        while True:
            ident, payload = await self.router.recv_multipart()
            msg = P.decode(payload)
            if isinstance(msg, P.Generate):
                self.forwards.append(msg)
                done = P.Done(
                    request_id=msg.request_id,
                    text="made up",
                    finish_reason="length",
                    served_by=self.served_by,
                    hops=msg.hops,
                    route_reason="local_best",
                    route_path=[self.served_by],
                    prompt_tokens=1,
                    cached_tokens=0,
                    completion_tokens=1,
                    ttft_s=0.001,
                    prefill_s=0.001,
                    decode_tps=1.0,
                )
                await self.router.send_multipart([ident, P.encode(done)])

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)


async def wait_alive(ep: str, names: set[str]) -> None:
    give_up = time.monotonic() + 30
    async with AsyncClient([ep]) as c:
        while not names <= {
            p.node_id for p in (await c.status(timeout=10)).peers if p.state == "alive"
        }:
            assert time.monotonic() < give_up, f"the node never heard {names}"
            await asyncio.sleep(0.05)


class LogRecorder:
    """A node's logger that keeps each event it logs (and still logs it)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.records: list[dict[str, Any]] = []

    @classmethod
    def install(cls, running: RunningNode) -> LogRecorder:
        # The node's parts read their logger from the shared context at each call.
        rec = cls(running.node.context.log)
        running.node.context.log = rec
        return rec

    def info(self, event: str, **kw: Any) -> None:
        self.records.append({"event": event, **kw})
        self._inner.info(event, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def events(self, event: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["event"] == event]


def test_one_peer_cannot_set_a_nodes_own_cost_estimate(engine: Engine) -> None:
    """Peers claiming 1e6 s/token: with one, the node keeps its start value; with two,
    their median is borrowed, but only within BORROW_FACTOR of it."""
    assert engine.stats.prefill_s_per_token == 0.0, "this test needs an unmeasured engine"
    ports = free_ports(2)
    claims = {"prefill_s_per_token": 1e6, "service_s": 1e6}

    async def main() -> list[float]:
        liars = [FakePeer(f"liar-{i}", engine, f"liar-{i}", **claims) for i in range(2)]
        seeds = [{"serve": p.serve, "gossip": p.gossip} for p in liars]
        own: list[float] = []
        with RunningNode(node_config("stall", ports, seeds=seeds[:1]), engine) as running:
            log = LogRecorder.install(running)
            ep = f"tcp://127.0.0.1:{ports[0]}"
            try:
                async with RawClient([ep]) as rc:
                    liars[0].start()
                    for n in (1, 2):
                        if n == 2:  # liar-0 tells of liar-1, as heartbeats do
                            liars[1].start()
                            info = P.PeerInfo(
                                node_id="liar-1",
                                serve_addr=liars[1].serve,
                                gossip_addr=liars[1].gossip,
                            )
                            liars[0].heartbeat.peers = [info]
                        await wait_alive(ep, {p.node_id for p in liars[:n]})
                        # A short prompt: the engine measures no prefill rate from it.
                        done = await rc.ask(ep, generate(f"est-{n}", "Hi", 2), 60)
                        assert isinstance(done, P.Done), done
                        # The rate the node's own estimate used, as its decision log says.
                        (decided,) = [
                            e for e in log.events("route.decided") if e["request_id"] == f"est-{n}"
                        ]
                        own.append(decided["prefill_s_per_token"])
            finally:
                for p in liars:
                    await p.close()
        return own

    one, two = asyncio.run(main())
    assert one == DEFAULT_PREFILL_S_PER_TOKEN, one
    assert two == DEFAULT_PREFILL_S_PER_TOKEN * BORROW_FACTOR, two


def test_a_forwarded_answer_names_the_peer_it_went_to(engine: Engine) -> None:
    """A peer's Done claiming another server is logged, counted and corrected."""
    ports = free_ports(2)
    peer_forwards: list[P.Generate] = []

    async def main() -> tuple[RawClient, P.Status]:
        peer = FakePeer("fake-peer", engine, served_by="node-evil")
        peer.start()
        seeds = [{"serve": peer.serve, "gossip": peer.gossip}]
        cfg = node_config("stall", ports, seeds=seeds, routing={"policy": "round_robin"})
        with RunningNode(cfg, engine):
            ep = f"tcp://127.0.0.1:{ports[0]}"
            try:
                async with RawClient([ep]) as rc:
                    await wait_alive(ep, {peer.node_id})
                    # round_robin over (fake-peer, stall): one of two requests goes to the peer.
                    for i in range(2):
                        assert (
                            await rc.ask(ep, generate(f"rr-{i}", f"Hello {i}", 2), 60) is not None
                        )
                    assert len(peer.forwards) == 1
                    async with AsyncClient([ep]) as c:
                        st = await c.status(timeout=10)
            finally:
                await peer.close()
        peer_forwards.extend(peer.forwards)
        return rc, st

    rc, st = asyncio.run(main())
    by = {d.request_id: d for d in rc.tally.done()}
    assert len(by) == 2, rc.tally.errors()
    forwarded = [d for d in by.values() if d.hops == 1]
    assert len(forwarded) == 1, by
    assert forwarded[0].served_by == "fake-peer", forwarded[0]
    assert forwarded[0].route_path == ["stall", "fake-peer"]
    assert st.counters.get("forwards_served_by_mismatch") == 1, st.counters
    assert getattr(peer_forwards[0], "progress", False)  # it asked for keep-alives
    # The prompt went as the forwarder's token ids: the peer never tokenizes it again.
    fwd = peer_forwards[0]
    assert fwd.prompt is None, fwd
    assert fwd.tokens in [engine.tokenize(f"Hello {i}") for i in range(2)], fwd.tokens


def test_a_forwards_token_ids_are_checked_by_the_peer(engine: Engine) -> None:
    """A forward carries token ids, not text: the receiving node still bounds their
    count and range, and bad ones cost an error reply, not the node."""
    ports = free_ports(2)
    ep = f"tcp://127.0.0.1:{ports[0]}"
    good = engine.tokenize("Hello there")

    def forwarded(rid: str, tokens: list[int]) -> P.Generate:
        return msgspec.structs.replace(
            generate(rid, "unused", 2), prompt=None, tokens=tokens, hops=1, origin="some-peer"
        )

    async def main() -> list[P.Done | P.Error | None]:
        async with RawClient([ep]) as rc:
            return [
                await rc.ask(ep, forwarded("out-of-range", [*good, engine.n_vocab]), 60),
                await rc.ask(ep, forwarded("too-many", good * engine.max_prompt_tokens), 60),
                await rc.ask(ep, forwarded("fine", good), 60),
            ]

    with RunningNode(node_config("stall", ports), engine):
        out_of_range, too_many, fine = asyncio.run(main())
    assert isinstance(out_of_range, P.Error) and out_of_range.code == P.INVALID_REQUEST
    assert f"token id {engine.n_vocab}" in out_of_range.message, out_of_range
    assert isinstance(too_many, P.Error) and too_many.code == P.PROMPT_TOO_LONG, too_many
    assert isinstance(fine, P.Done) and fine.prompt_tokens == len(good), fine
