"""max_inflight_per_client: a node on real sockets with the real model, in this process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
from meshkit import RawClient, RunningNode, generate, idle_heartbeat, node_config

from zmesh import protocol as P
from zmesh.client import AsyncClient, Client, RequestError
from zmesh.config import ConfigError, EngineConfig
from zmesh.engine import Engine
from zmesh.lab import free_ports
from zmesh.node import Node
from zmesh.security import AuthorizedKey

LIMIT = 2


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    # An engine of its own (nodes drain cache events the shared fixtures expect); one
    # thread: llama.cpp threads spin badly when the 2 cores are shared.
    eng = Engine(EngineConfig(n_slots=2, slot_ctx=512, n_threads=1))
    yield eng
    eng.close()


def config(ports: list[int], **kw: object):
    return node_config("lim", ports, **{"max_inflight_per_client": LIMIT, **kw})


def test_who_counts_as_a_client(engine: Engine) -> None:
    node = Node(config(free_ports(2)), engine=engine)
    try:
        node.peers.upsert("peer-x", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", time.monotonic())
        env = [b"\x00ident"]
        assert (
            node.admission.client_of(env, P.Generate(request_id="r", prompt="x"), None)
            == b"\x00ident"
        )
        # Keyless: a forward from a known peer is the peer's, not a client's.
        fwd = P.Generate(request_id="r", prompt="x", hops=1, origin="peer-x")
        assert node.admission.client_of(env, fwd, None) is None
        stranger = P.Generate(request_id="r", prompt="x", hops=1, origin="nobody")
        assert node.admission.client_of(env, stranger, None) == b"\x00ident"
        # Keyed: the CURVE key decides, whatever the message claims.
        app = AuthorizedKey(public=b"k" * 40, name="app", role="client")
        peer = AuthorizedKey(public=b"n" * 40, name="node-b", role="node")
        assert node.admission.client_of(env, fwd, app) == b"k" * 40
        assert node.admission.client_of(env, P.Generate(request_id="r", prompt="x"), peer) is None
    finally:
        node.ctx.destroy(linger=0)


def test_a_client_over_its_limit_gets_a_clear_error_and_others_are_served(
    engine: Engine,
) -> None:
    running = RunningNode(config(free_ports(2)), engine)
    ep = running.serve_addr

    async def main() -> None:
        async with RawClient([ep]) as greedy, RawClient([ep]) as polite:
            # A burst of 5 from one connection: 2 admitted, 3 refused at once.
            events = [
                await greedy.send(ep, generate(f"g{i}", f"Story {i}: once upon a", 24))
                for i in range(5)
            ]
            other = await polite.ask(ep, generate("p0", "Another client asks.", 4), 60)
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            assert isinstance(other, P.Done) and other.completion_tokens >= 1
            t = greedy.tally
            assert t.lost == [] and t.twice == []
            assert len(t.done()) == LIMIT
            assert t.errors() == {P.TOO_MANY_REQUESTS: 5 - LIMIT}
            refused = [f for f in t.finals.values() if isinstance(f[0], P.Error)]
            assert "max_inflight_per_client" in refused[0][0].message
            # Answers free the budget: the same connection is admitted again.
            again = await greedy.ask(ep, generate("g-again", "Once more:", 2), 60)
            assert isinstance(again, P.Done)

    async def library() -> list[P.Done | BaseException]:
        # The library client raises the code as a RequestError and does not retry it.
        async with AsyncClient([ep], timeout=60) as c:
            return await asyncio.gather(
                *(c.generate(f"Library {i}:", max_tokens=24) for i in range(4)),
                return_exceptions=True,
            )

    with running:
        asyncio.run(main())
        results = asyncio.run(library())
        refused = [r for r in results if isinstance(r, RequestError)]
        assert [r.code for r in refused] == [P.TOO_MANY_REQUESTS] * (4 - LIMIT), results
        assert sum(isinstance(r, P.Done) for r in results) == LIMIT
        with Client([ep], timeout=30) as c:
            st = c.status()
        assert st.counters.get("requests_client_limited") == 5 - LIMIT + 4 - LIMIT
        assert (st.inflight, st.inflight_clients, st.queue_depth) == (0, 0, 0)


def test_forwards_from_a_known_peer_are_not_limited(engine: Engine) -> None:
    """Pose as a peer (a PUB the node subscribes to) and send it forwarded requests."""
    ports, fake = free_ports(2), free_ports(2)
    fake_serve, fake_gossip = (f"tcp://127.0.0.1:{p}" for p in fake)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(fake_gossip)
    running = RunningNode(
        config(ports, seeds=[{"serve": fake_serve, "gossip": fake_gossip}]), engine
    )
    ep = running.serve_addr
    hb = idle_heartbeat(
        "fake-peer", fake_serve, fake_gossip, engine.block_size, engine.fingerprint.hex()
    )
    try:
        with Client([ep], timeout=30) as c:
            give_up = time.monotonic() + 15
            while not any(p.node_id == "fake-peer" for p in c.status().peers):
                assert time.monotonic() < give_up, "the node never heard the fake peer"
                pub.send(P.encode(hb))
                time.sleep(0.1)

        async def main() -> None:
            async with RawClient([ep]) as peer:
                events = []
                for i in range(LIMIT + 2):
                    msg = generate(f"f{i}", f"Forwarded {i}:", 8)
                    msg.hops, msg.origin = 1, "fake-peer"
                    events.append(await peer.send(ep, msg))
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
                assert peer.tally.lost == [] and peer.tally.twice == []
                assert len(peer.tally.done()) == LIMIT + 2, peer.tally.errors()

        asyncio.run(main())
        with Client([ep], timeout=30) as c:
            st = c.status()
        assert st.counters.get("requests_client_limited", 0) == 0
        assert (st.inflight, st.inflight_clients) == (0, 0)
    finally:
        running.stop()
        ctx.destroy(linger=0)


def _heartbeat(node: Node, sender: str, port: int, listed: list[str]) -> P.Heartbeat:
    """``sender`` at ``port`` (serve) and ``port + 1`` (gossip), listing made-up peers."""
    ghosts = [
        P.PeerInfo(
            node_id=name,
            serve_addr=f"tcp://127.0.0.1:{port + 2 + 2 * i}",
            gossip_addr=f"tcp://127.0.0.1:{port + 3 + 2 * i}",
        )
        for i, name in enumerate(listed)
    ]
    return idle_heartbeat(
        sender,
        f"tcp://127.0.0.1:{port}",
        f"tcp://127.0.0.1:{port + 1}",
        node.engine.block_size,
        node.engine.fingerprint.hex(),
        ghosts,
    )


def test_learned_peers_are_capped_and_refusals_counted(engine: Engine) -> None:
    ports = free_ports(4)
    talker_serve, talker_gossip = (f"tcp://127.0.0.1:{p}" for p in ports[2:])
    cfg = config(
        ports[:2],
        gossip={"max_peers": 3},
        seeds=[{"serve": talker_serve, "gossip": talker_gossip}],
    )
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(talker_gossip)
    running = RunningNode(cfg, engine)
    try:
        client = Client([f"tcp://127.0.0.1:{ports[0]}"], timeout=5)
        # A peer whose heartbeats list six made-up peers: it and two of them fit.
        hb = _heartbeat(running.node, "talker", ports[2], [f"ghost-{i}" for i in range(6)])
        hb = msgspec.structs.replace(hb, serve_addr=talker_serve, gossip_addr=talker_gossip)
        give_up = time.monotonic() + 15
        while (status := client.status()).counters.get("peers_refused_full", 0) < 8:
            assert time.monotonic() < give_up, f"refusals not counted: {status.counters}"
            pub.send(P.encode(hb))
            time.sleep(0.1)
        # Every heartbeat listing them refuses the four again; the table stays at 3.
        assert sorted(p.node_id for p in status.peers) == ["ghost-0", "ghost-1", "talker"]
        client.close()
    finally:
        running.stop()
        ctx.destroy(linger=0)


def test_max_peers_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_peers"):
        config(free_ports(2), gossip={"max_peers": 0})


def test_a_full_queue_refuses_and_keeps_no_request_in_flight(engine: Engine) -> None:
    """A request refused as `overloaded` is over: it holds no in-flight place (it used
    to stay counted for good, and its caller ran into its limit)."""
    # A client limit high enough that only the queue (one waiting job) refuses.
    running = RunningNode(config(free_ports(2), max_queue=1, max_inflight_per_client=100), engine)
    ep = running.serve_addr

    async def main() -> None:
        async with RawClient([ep]) as rc:
            events = [
                await rc.send(ep, generate(f"q{i}", f"Story {i}: once upon a", 24))
                for i in range(6)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 300)
            t = rc.tally
            assert t.lost == [] and t.twice == []
            assert t.errors().get(P.OVERLOADED, 0) >= 1, t.errors()
            st = await rc.status(ep)
            assert (st.inflight, st.inflight_clients, st.queue_depth) == (0, 0, 0)
            again = await rc.ask(ep, generate("q-again", "Once more:", 2), 120)
            assert isinstance(again, P.Done), again

    with running:
        asyncio.run(main())


def test_token_id_prompts_are_checked_on_the_loop_and_answered(engine: Engine) -> None:
    """A Generate with token ids (what a peer's forward carries) is checked on the
    node's loop, not on the tokenizer thread: an id outside the vocabulary gets a clear
    invalid_request, a good one is served, and the node takes the next request."""
    running = RunningNode(config(free_ports(2), max_inflight_per_client=100), engine)
    ep = running.serve_addr
    good = engine.prompt_tokens("Once upon a time there was", None)

    def ids(rid: str, tokens: list[int]) -> P.Generate:
        return P.Generate(
            request_id=rid, tokens=tokens, params=P.SamplingParams(max_tokens=2), stream=False
        )

    async def main() -> None:
        async with RawClient([ep]) as rc:
            bad = await rc.ask(ep, ids("bad", [*good, engine.n_vocab]), 120)
            assert isinstance(bad, P.Error), bad
            assert bad.code == P.INVALID_REQUEST and "outside" in bad.message, bad
            ok = await rc.ask(ep, ids("ok", good), 120)
            assert isinstance(ok, P.Done), ok
            assert ok.prompt_tokens == len(good) and ok.completion_tokens >= 1
            assert rc.tally.lost == [] and rc.tally.twice == []

    with running:
        asyncio.run(main())
