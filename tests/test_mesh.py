"""The mesh for real: node processes, ZeroMQ sockets on loopback, the real model."""

from __future__ import annotations

import asyncio
import time

import msgspec
import pytest
import zmq
from meshkit import RawClient, generate, idle_heartbeat, is_request, log_events, started

from zmesh import protocol as P
from zmesh.client import Client
from zmesh.lab import Lab, LabNode, free_ports
from zmesh.model import default_model_path, model_fingerprint

pytestmark = pytest.mark.slow

FEW_SHOT = (
    "The following are multiple choice questions (with answers) about geology.\n\n"
    + "".join(
        f"Question {i}: Which rock forms from cooled lava number {i}? A. Basalt B. Marble "
        f"C. Shale D. Slate\nAnswer: A\n\n"
        for i in range(12)
    )
)
# One thread per node: three nodes share 2 cores, and llama.cpp's threads spin badly
# when they cannot each have a core.
ENGINE = {"n_slots": 3, "slot_ctx": 1024, "n_threads": 1}
PINNED = {"place_slack_frac": 0.0}


def converge(lab: Lab, timeout: float = 60.0) -> float:
    return asyncio.run(lab.wait_converged(timeout=timeout))


def _primed_on(lab: Lab, node: LabNode, prefix: str) -> str:
    """``prefix``, cached on ``node`` only (served there once), once the mesh knows it."""
    with Client(lab.endpoints, timeout=60) as client:
        primed = client.generate(
            prefix + "Question: prime node-b\nAnswer:", max_tokens=2, endpoint=node.serve
        )
        assert primed.served_by == node.name
    converge(lab)
    _quiet(lab)
    return prefix


def _quiet(lab: Lab, budget_s: float = 120.0) -> None:
    """Until no node has a request in flight and every node sees every peer's queue
    empty: a long request of an earlier test still ending on a peer would make the
    entry rightly serve locally instead of forwarding what the test means to forward."""
    give_up = time.monotonic() + budget_s
    while True:
        statuses = asyncio.run(lab.statuses())
        if all(st.inflight == 0 and all(p.queue_depth == 0 for p in st.peers) for st in statuses):
            return
        assert time.monotonic() < give_up, f"the lab never went quiet: {statuses}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def lab3():
    # These tests pin a prefix on a chosen node by sending it there first; placement
    # hashing would move a new prefix to another node, so it is off here.
    lab = Lab(n_nodes=3, engine=ENGINE, routing=PINNED)
    # Up and converged before any test, so each one also passes when run alone.
    with started(lab):
        yield lab


def test_three_nodes_converge_and_see_each_other(lab3: Lab) -> None:
    converge(lab3, timeout=90)
    statuses = asyncio.run(lab3.statuses())
    for st in statuses:
        others = {p.node_id for p in st.peers if p.state == "alive"}
        assert others == {n.name for n in lab3.nodes} - {st.node_id}


def test_request_goes_to_the_node_holding_its_prefix(lab3: Lab) -> None:
    a, b = lab3.nodes[0], lab3.nodes[1]
    with Client(lab3.endpoints, timeout=60) as client:
        first = client.generate(
            FEW_SHOT + "Question: What is granite?\nAnswer:", max_tokens=4, endpoint=b.serve
        )
        assert first.served_by == b.name
        converge(lab3)  # node-a now knows node-b's blocks
        hit = client.generate(
            FEW_SHOT + "Question: What is obsidian?\nAnswer:", max_tokens=4, endpoint=a.serve
        )
        assert hit.served_by == b.name and hit.route_reason == "prefix"
        assert hit.route_path == [a.name, b.name] and hit.hops == 1
        assert hit.cached_tokens >= hit.prompt_tokens - 20
        miss = client.generate(
            "Completely unrelated words: zebra, kettle, ukulele.", max_tokens=4, endpoint=a.serve
        )
        assert miss.served_by == a.name and miss.hops == 0 and miss.cached_tokens == 0
    decided = [
        r for r in log_events(a.log_path, "route.decided") if r.get("request_id") == hit.request_id
    ]
    assert decided and decided[0]["forward"] is True and decided[0]["target"] == b.name
    completed = [
        r
        for r in log_events(b.log_path, "request.completed")
        if is_request(r.get("request_id"), hit.request_id)
    ]
    assert completed and completed[0]["hops"] == 1


def test_a_forwarded_request_keeps_its_deadline_and_is_answered_once(lab3: Lab) -> None:
    """The absolute deadline travels with the forward; the serving peer stops decoding
    when it passes, and the client gets one deadline_exceeded, not a local restart."""
    a, b = lab3.nodes[0], lab3.nodes[1]
    only_on_b = _primed_on(lab3, b, FEW_SHOT.replace("geology", "mineralogy"))
    long_ask = generate("dl-forwarded", only_on_b + "Count to 500: 1, 2, 3,", 500, deadline_s=1.0)
    expired = generate("dl-expired", "Too late for this one.", 4, deadline_s=-1.0)

    async def main() -> RawClient:
        async with RawClient([a.serve]) as rc:
            await rc.ask(a.serve, long_ask, 10)
            await rc.ask(a.serve, expired, 10)
            await rc.drain()  # a second answer would be counted by now
        return rc

    tally = asyncio.run(main()).tally
    assert tally.lost == [] and tally.twice == []
    for rid in ("dl-forwarded", "dl-expired"):
        reply = tally.first(rid)
        assert isinstance(reply, P.Error) and reply.code == P.DEADLINE_EXCEEDED, reply
    assert tally.latency_s["dl-forwarded"] < 1.0 + 1.0
    forwarded = [
        r for r in log_events(a.log_path, "request.forwarded") if r["request_id"] == "dl-forwarded"
    ]
    assert forwarded and forwarded[0]["target"] == b.name
    # node-b stopped early: its own deadline error, or the forwarder's Cancel at the deadline.
    b_logs = log_events(b.log_path, "request.failed") + log_events(b.log_path, "request.completed")
    stopped = [r for r in b_logs if is_request(r["request_id"], "dl-forwarded")]
    assert stopped and (
        stopped[0].get("code") == P.DEADLINE_EXCEEDED or stopped[0].get("finish") == "cancelled"
    ), stopped
    assert not [
        r for r in log_events(a.log_path, "request.completed") if r["request_id"] == "dl-forwarded"
    ], "the forwarder must not restart an expired request locally"


def test_a_cancel_follows_a_forwarded_request_to_the_peer(lab3: Lab) -> None:
    """The caller cancels a request its entry node forwarded: the peer stops it (the
    cancel follows under the forward's wire id), and nobody serves it again."""
    a, b = lab3.nodes[0], lab3.nodes[1]
    only_on_b = _primed_on(lab3, b, FEW_SHOT.replace("geology", "petrology"))
    long_ask = generate("cancel-me", only_on_b + "Count to 500: 1, 2, 3,", 400, deadline_s=600)
    long_ask.stream = True

    async def main() -> RawClient:
        async with RawClient([a.serve]) as rc:
            done = await rc.send(a.serve, long_ask)
            give_up = time.monotonic() + 300
            while rc.tally.chunks["cancel-me"] < 2:  # the peer is decoding it
                assert time.monotonic() < give_up, "no chunk came"
                await asyncio.sleep(0.02)
            await rc.socks[a.serve].send(P.encode(P.Cancel(request_id="cancel-me")))
            await asyncio.wait_for(done.wait(), 300)
            await rc.drain()
        return rc

    tally = asyncio.run(main()).tally
    assert tally.twice == [] and tally.lost == []
    reply = tally.first("cancel-me")
    assert isinstance(reply, P.Done), reply
    assert reply.served_by == b.name and reply.finish_reason == "cancelled", reply
    assert reply.completion_tokens < 400
    stopped = [
        r
        for r in log_events(b.log_path, "request.completed")
        if is_request(r["request_id"], "cancel-me")
    ]
    assert stopped and stopped[0]["finish"] == "cancelled", stopped
    assert not [
        r for r in log_events(a.log_path, "request.completed") if r["request_id"] == "cancel-me"
    ], "the entry node served it again"


def test_peer_killed_mid_request_costs_no_request(lab3: Lab) -> None:
    a, c = lab3.nodes[0], lab3.nodes[2]
    only_on_c = FEW_SHOT.replace("geology", "volcanology")  # no other node holds it
    prompt = only_on_c + "Count from 1 to 300: 1, 2, 3, 4, 5,"
    with Client(lab3.endpoints, timeout=60) as client:
        primed = client.generate(
            only_on_c + "Question: prime node-c\nAnswer:", max_tokens=2, endpoint=c.serve
        )
        assert primed.served_by == c.name, primed  # only node-c holds this prefix
        converge(lab3)
        old_epoch = next(
            p.epoch for p in asyncio.run(lab3.statuses([0]))[0].peers if p.node_id == c.name
        )
        attempts, done = set(), None
        for event in client.stream(prompt, max_tokens=200, endpoint=a.serve):
            if isinstance(event, P.Chunk):
                if not attempts:
                    lab3.kill_node(2)  # kill -9 the serving peer mid-stream
                attempts.add(event.attempt)
            else:
                done = event
    assert done is not None and done.served_by == a.name
    assert done.route_reason == "fallback" and done.completion_tokens > 0
    assert attempts == {0, 1}  # chunks from node-c, then the local restart
    fallbacks = [
        r
        for r in log_events(a.log_path, "request.fallback")
        if r.get("request_id") == done.request_id
    ]
    assert fallbacks
    # The restarted peer has a new epoch; the others resync to it.
    lab3.start_node(2)
    converge(lab3, timeout=90)
    new_epoch = next(
        p.epoch for p in asyncio.run(lab3.statuses([0]))[0].peers if p.node_id == c.name
    )
    assert new_epoch != old_epoch


def test_dropped_gossip_is_repaired_by_anti_entropy() -> None:
    lab = Lab(n_nodes=2, engine=ENGINE, gossip={"drop_deltas": 0.5})
    lab.start()
    try:
        converge(lab, timeout=90)
        with Client(lab.endpoints, timeout=60) as client:
            # Each delta is dropped with probability 1/2: go on until one was (a
            # handful of requests usually; 24 leave a chance of 2**-24 to see none).
            for i in range(24):
                client.generate(
                    f"Topic {i}: " + FEW_SHOT[: 200 + 40 * (i % 6)],
                    max_tokens=2,
                    endpoint=lab.nodes[0].serve,
                )
                if i >= 5 and client.status(lab.nodes[0].serve).counters.get(
                    "deltas_dropped_on_purpose", 0
                ):
                    break
        converge(lab, timeout=30)
        a, b = asyncio.run(lab.statuses())
        assert a.counters.get("deltas_dropped_on_purpose", 0) >= 1
        assert b.counters.get("snapshots_requested", 0) >= 2  # first contact + repairs
        est = next(p for p in b.peers if p.node_id == a.node_id)
        assert (est.seq, est.n_blocks) == (a.seq, a.n_blocks) and a.n_blocks > 0
    finally:
        lab.stop()


def test_nodes_that_join_through_a_seed_are_heard_by_it() -> None:
    """Star: node-a has no seeds and subscribes to nobody until the others announce
    themselves in their pings; then all three see each other."""
    lab = Lab(n_nodes=3, engine=ENGINE, topology="star")
    lab.start()
    try:
        converge(lab, timeout=90)
        announced = {r["peer"] for r in log_events(lab.nodes[0].log_path, "peer.announced")}
        assert announced == {lab.nodes[1].name, lab.nodes[2].name}
    finally:
        lab.stop()


def test_malformed_frames_on_every_socket_do_not_disturb_the_node() -> None:
    """Pose as a peer (ROUTER + PUB the node connects to) and send junk everywhere."""
    serve_port, gossip_port = free_ports(2)
    fake_serve, fake_gossip = f"tcp://127.0.0.1:{serve_port}", f"tcp://127.0.0.1:{gossip_port}"
    ctx = zmq.Context()
    router, pub, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB), ctx.socket(zmq.DEALER)
    for s in (router, pub, dealer):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 15000)
    router.bind(fake_serve)
    pub.bind(fake_gossip)
    lab = Lab(n_nodes=1, engine=ENGINE, extra_seeds=[{"serve": fake_serve, "gossip": fake_gossip}])
    lab.start()
    try:
        converge(lab, timeout=90)
        node = lab.nodes[0]
        dealer.connect(node.serve)
        # 1. serve socket: junk of every kind; each decodable-enough frame gets an Error.
        junk = [
            b"",
            b"\x00garbage",
            bytes(range(256)),
            b"\xc1",
            msgspec.msgpack.encode({"type": "gen", "v": 99, "request_id": "old-client"}),
            msgspec.msgpack.encode({"type": "gen", "v": 1, "request_id": 5}),
            msgspec.msgpack.encode({"type": "nope", "v": 1}),
            P.encode(P.Chunk(request_id="x", index=0, text="unexpected")),
        ]
        for frame in junk:
            dealer.send(frame)
            reply = P.decode(dealer.recv())
            assert isinstance(reply, P.Error), frame
        dealer.send_multipart([b"two", b"frames"])
        assert isinstance(P.decode(dealer.recv()), P.Error)
        dealer.send(P.encode(P.Generate(request_id="r-bad", prompt="")))
        bad = P.decode(dealer.recv())
        assert isinstance(bad, P.Error) and bad.code == P.INVALID_REQUEST
        # 2. SUB socket: junk gossip, then a valid heartbeat so the node calls us back.
        for frame in junk:
            pub.send(frame)
        fp = model_fingerprint(default_model_path()).hex()
        # Something cached (seq 5, 3 blocks): the node will ask us for a snapshot.
        hb = msgspec.structs.replace(
            idle_heartbeat("fake", fake_serve, fake_gossip, 16, fp), seq=5, n_blocks=3, digest=7
        )
        deadline = time.monotonic() + 15
        request = None
        while request is None and time.monotonic() < deadline:
            pub.send(P.encode(hb))
            if router.poll(300):
                ident, payload = router.recv_multipart()
                msg = P.decode(payload)
                if isinstance(msg, P.SnapshotRequest):
                    request = (ident, msg)
        assert request is not None, "the node never asked the fake peer for a snapshot"
        ident, snap_req = request
        # 3. DEALER socket (the node's link to us): junk replies and a lying snapshot.
        for frame in junk:
            router.send_multipart([ident, frame])
        router.send_multipart(
            [
                ident,
                P.encode(
                    P.Snapshot(
                        request_id=snap_req.request_id,
                        node_id="fake",
                        epoch=1,
                        seq=5,
                        part=0,
                        parts=1,
                        blocks=[(1, 0)],
                        digest=12345,
                        n_blocks=3,
                    )
                ),
            ]
        )
        # The node is undisturbed: it still serves and reports.
        dealer.send(
            P.encode(
                P.Generate(
                    request_id="r-ok", prompt="Hello there", params=P.SamplingParams(max_tokens=3)
                )
            )
        )
        while True:
            msg = P.decode(dealer.recv())
            if not isinstance(msg, P.Chunk):
                break
        assert isinstance(msg, P.Done) and msg.completion_tokens >= 1
        st = asyncio.run(lab.statuses())[0]
        assert st.counters.get("frames_malformed", 0) >= 2 * len(junk) - 2
        fake = next(p for p in st.peers if p.node_id == "fake")
        assert fake.n_blocks != 1  # the lying snapshot (digest mismatch) was not installed
        assert lab.nodes[0].alive
    finally:
        lab.stop()
        ctx.destroy(linger=0)
