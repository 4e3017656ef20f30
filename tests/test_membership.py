"""Who may touch which request, who stays in the peer table, and how much a stranger
may write to the log. Real nodes on real sockets with the real model: in this process
for request ids, as processes of a lab for membership and refused handshakes."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
import zmq
import zmq.asyncio
from meshkit import RunningNode, idle_heartbeat, log_events, node_config

from zmesh import protocol as P
from zmesh.client import Client
from zmesh.config import ConfigError, EngineConfig, Seed, dump_toml
from zmesh.engine import Engine
from zmesh.lab import Lab, free_ports
from zmesh.node import Node
from zmesh.node.admission import scope as scope_of
from zmesh.security import (
    AuthorizedKey,
    client_socket,
    generate,
    load_keypair,
    load_public_key,
)

# Greedy decoding of this keeps going: the request is still running when others act.
LONG = "Count from 1 to 200, separated by commas: 1, 2, 3, 4,"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    # One thread: llama.cpp threads spin badly when the 2 cores are shared.
    eng = Engine(EngineConfig(n_slots=2, slot_ctx=512, n_threads=1))
    yield eng
    eng.close()


class Conn:
    """One DEALER (one ROUTER identity), optionally a CURVE client; keeps every reply."""

    def __init__(
        self, ctx: zmq.asyncio.Context, ep: str, key_file: Path | None = None, server: bytes = b""
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if key_file is not None:
            client_socket(self.sock, load_keypair(key_file), server)
        self.sock.connect(ep)
        self.replies: list[P.Message] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            self.replies.append(P.decode(await self.sock.recv()))

    async def send(self, msg: P.Message | bytes) -> None:
        await self.sock.send(msg if isinstance(msg, bytes) else P.encode(msg))

    def final(self, rid: str) -> list[P.Done | P.Error]:
        return [m for m in self.replies if isinstance(m, P.Done | P.Error) and m.request_id == rid]

    async def wait(self, pred: Callable[[], object], budget_s: float = 60.0) -> None:
        give_up = time.monotonic() + budget_s
        while not pred():
            assert time.monotonic() < give_up, f"no such reply in {budget_s}s: {self.replies}"
            await asyncio.sleep(0.01)

    async def first_chunk(self, rid: str) -> None:
        await self.wait(
            lambda: any(isinstance(m, P.Chunk) and m.request_id == rid for m in self.replies)
        )

    async def done(self, rid: str, budget_s: float = 60.0) -> P.Done | P.Error:
        await self.wait(lambda: self.final(rid), budget_s)
        return self.final(rid)[0]

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        self.sock.close(linger=0)


def long_request(rid: str, tenant: str = "default", max_tokens: int = 64) -> P.Generate:
    return P.Generate(
        request_id=rid,
        prompt=LONG,
        tenant=tenant,
        params=P.SamplingParams(max_tokens=max_tokens),
        stream=True,
    )


# ---- request ids belong to their caller ----------------------------------------------


def test_scope_of_a_request_is_its_caller(engine: Engine) -> None:
    """Whose request ids these are: the key a job is kept under, and a Cancel or a
    duplicate looked up by (the job stores the scope it was admitted with)."""
    node = Node(node_config("solo", free_ports(2)), engine=engine)
    try:
        node.peers.upsert("peer-x", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2", time.monotonic())
        env = [b"\x00conn"]
        app = AuthorizedKey(public=b"k" * 40, name="app", role="client")
        peer = AuthorizedKey(public=b"n" * 40, name="node-b", role="node")
        fwd = P.Generate(request_id="r", prompt="x", hops=1, origin="peer-x")
        for caller, msg, scope in [
            (None, P.Generate(request_id="r", prompt="x"), b"\x00conn"),
            (None, fwd, b"\x00conn"),  # a keyless peer: its connection
            (app, fwd, b"k" * 40),  # a client key: all its connections, whatever it claims
            (peer, fwd, b"\x00conn"),  # a node key: its connection
        ]:
            assert scope_of(env, caller) == scope, (caller, msg)
    finally:
        node.ctx.destroy(linger=0)


def test_keyed_tenants_cannot_cancel_or_block_each_others_ids(
    engine: Engine, tmp_path: Path
) -> None:
    generate(tmp_path, "solo")
    generate(tmp_path, "acme-app", role="client", tenants=["acme"])
    generate(tmp_path, "beta-app", role="client", tenants=["beta"])
    ports = free_ports(2)
    cfg = node_config(
        "solo",
        ports,
        security={
            "secret_key_file": str(tmp_path / "solo.key_secret"),
            "authorized_dir": str(tmp_path),
        },
    )
    ep, server = f"tcp://127.0.0.1:{ports[0]}", load_keypair(tmp_path / "solo.key_secret").public

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        acme = Conn(ctx, ep, tmp_path / "acme-app.key_secret", server)
        acme2 = Conn(ctx, ep, tmp_path / "acme-app.key_secret", server)  # same key
        beta = Conn(ctx, ep, tmp_path / "beta-app.key_secret", server)
        try:
            # Control: acme cancels its own request, from another connection of its key,
            # once it runs: cancelled. The same timing is used against beta below.
            await acme.send(long_request("own", "acme"))
            await acme.first_chunk("own")
            await acme2.send(P.Cancel(request_id="own"))
            own = await acme.done("own")
            assert isinstance(own, P.Done) and own.finish_reason == "cancelled", own

            await acme.send(long_request("x", "acme"))
            await acme.first_chunk("x")
            # beta cancels acme's id, and asks under it: ignored, and served as its own.
            await beta.send(P.Cancel(request_id="x"))
            await beta.send(long_request("x", "beta", max_tokens=2))
            await acme.send(long_request("x", "acme"))  # acme's own duplicate: refused
            dup = await acme.done("x")  # at once, while the first one runs
            assert isinstance(dup, P.Error) and dup.code == P.INVALID_REQUEST, dup
            await acme.wait(lambda: len(acme.final("x")) == 2)
            done = acme.final("x")[1]
            assert isinstance(done, P.Done) and done.finish_reason != "cancelled", done
            assert done.completion_tokens > 2
            theirs = await beta.done("x")
            assert isinstance(theirs, P.Done) and theirs.completion_tokens <= 2, theirs
            assert len(beta.final("x")) == 1 and len(acme.final("x")) == 2
        finally:
            for c in (acme, acme2, beta):
                await c.close()
            ctx.destroy(linger=0)

    with RunningNode(cfg, engine):
        asyncio.run(main())
        key = str(tmp_path / "acme-app.key_secret")
        with Client(ep, timeout=30, client_key=key, server_key=server.decode()) as c:
            st = c.status()
        assert (st.inflight, st.inflight_clients, st.counters.get("requests_duplicate")) == (
            0,
            0,
            1,
        )


def test_keyless_ids_are_per_connection_and_forwards_never_mix(engine: Engine) -> None:
    """Keyless: a request id is its connection's. Two clients' "x", both forwarded to the
    same peer, get their own answers; a peer's forward "y" and a client's "y" are both
    served; a Cancel from another connection does nothing. The peer is this test: a
    PUB for its heartbeats, a ROUTER that answers forwards, a DEALER that forwards."""
    ports, fake = free_ports(2), free_ports(2)
    fake_serve, fake_gossip = (f"tcp://127.0.0.1:{p}" for p in fake)
    ep = f"tcp://127.0.0.1:{ports[0]}"
    # least_loaded: forwards exactly when the peer's queue is shorter than ours.
    cfg = node_config(
        "solo",
        ports,
        routing={"policy": "least_loaded"},
        seeds=[{"serve": fake_serve, "gossip": fake_gossip}],
    )
    hb = idle_heartbeat(
        "fake-peer", fake_serve, fake_gossip, engine.block_size, engine.fingerprint.hex()
    )

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.bind(fake_gossip)
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(fake_serve)
        queue = {"depth": 9}  # what the fake peer says of its queue

        async def beat() -> None:
            while True:
                await pub.send(P.encode(msgspec.structs.replace(hb, queue_depth=queue["depth"])))
                await asyncio.sleep(0.05)

        forwarded: list[P.Generate] = []

        async def serve() -> None:  # answer each forward with its own text
            while True:
                ident, frame = await router.recv_multipart()
                msg = P.decode(frame)
                if isinstance(msg, P.Generate):
                    forwarded.append(msg)
                    await asyncio.sleep(0.2)  # both in flight at once
                    done = P.Done(
                        request_id=msg.request_id,
                        text=f"answer {len(forwarded)}",
                        finish_reason="length",
                        served_by="fake-peer",
                        hops=1,
                        route_reason="local_best",
                        route_path=["fake-peer"],
                        prompt_tokens=1,
                        cached_tokens=0,
                        completion_tokens=1,
                        ttft_s=0.0,
                        prefill_s=0.0,
                        decode_tps=0.0,
                    )
                    await router.send_multipart([ident, P.encode(done)])

        async def peer_view() -> P.PeerStatus | None:
            status = P.StatusRequest(request_id=f"st-{time.monotonic()}")
            await busy.send(status)
            await busy.wait(
                lambda: any(getattr(m, "request_id", "") == status.request_id for m in busy.replies)
            )
            st = next(m for m in busy.replies if getattr(m, "request_id", "") == status.request_id)
            assert isinstance(st, P.Status)
            return next((p for p in st.peers if p.node_id == "fake-peer"), None)

        tasks = [asyncio.create_task(beat()), asyncio.create_task(serve())]
        busy, a, b = Conn(ctx, ep), Conn(ctx, ep), Conn(ctx, ep)
        peer = Conn(ctx, ep)  # the fake peer's DEALER
        try:
            give_up = time.monotonic() + 30
            while (p := await peer_view()) is None or p.state != "alive":
                assert time.monotonic() < give_up, "the node never heard the fake peer"
                await asyncio.sleep(0.1)
            # Keep the node busy (one running, one queued): it then forwards.
            await busy.send(long_request("busy-1", max_tokens=128))
            await busy.send(long_request("busy-2", max_tokens=128))
            await busy.first_chunk("busy-1")
            queue["depth"] = 0
            while (p := await peer_view()) is None or p.queue_depth != 0:
                assert time.monotonic() < give_up + 30, "the node never saw the peer idle"
                await asyncio.sleep(0.05)
            await a.send(P.Generate(request_id="x", prompt="Hi A", stream=False))
            await b.send(P.Generate(request_id="x", prompt="Hi B", stream=False))
            done_a, done_b = await a.done("x"), await b.done("x")
            assert isinstance(done_a, P.Done) and isinstance(done_b, P.Done), (done_a, done_b)
            # Forwards carry token ids: map them back to the prompts sent.
            sent = {tuple(engine.tokenize(t)): t for t in ("Hi A", "Hi B")}
            prompts = [sent[tuple(f.tokens or ())] for f in forwarded]
            assert prompts == ["Hi A", "Hi B"]
            # Each caller got the answer to its own prompt, under its own id.
            assert {done_a.text, done_b.text} == {"answer 1", "answer 2"}
            assert done_a.text == f"answer {prompts.index('Hi A') + 1}"
            assert len(a.final("x")) == len(b.final("x")) == 1

            # A forward from the peer and a client's request with the same id, both
            # served here (hops=1: no further hop); a stranger's Cancel changes nothing.
            queue["depth"] = 9
            while (p := await peer_view()) is None or p.queue_depth != 9:
                assert time.monotonic() < give_up + 60, "the node never saw the peer busy"
                await asyncio.sleep(0.05)
            fwd = msgspec.structs.replace(
                long_request("y", max_tokens=6), hops=1, origin="fake-peer"
            )
            await peer.send(fwd)
            await a.send(long_request("y", max_tokens=6))
            await b.send(P.Cancel(request_id="y"))
            # A prompt that is not UTF-8 is refused under its own id (to the sender).
            bad = P.encode(P.Generate(request_id="bad-utf8", prompt="Say <bad>"))
            await a.send(bad.replace(b"<bad>", b"\xff\xfe\xc3(\x80"))
            err = await a.done("bad-utf8")
            assert isinstance(err, P.Error) and err.code == P.MALFORMED, err
            # So is a top_k that llama.cpp's int32 would wrap to 0.
            huge = P.SamplingParams(top_k=2**40)
            await a.send(P.Generate(request_id="top-k", prompt="Hi", params=huge))
            err = await a.done("top-k")
            assert isinstance(err, P.Error) and err.code == P.INVALID_REQUEST, err
            assert "top_k" in err.message
            for rid in ("busy-1", "busy-2"):  # its owner may cancel: no need to wait
                await busy.send(P.Cancel(request_id=rid))
            mine, theirs = await a.done("y", 120), await peer.done("y", 120)
            for d in (mine, theirs):
                assert isinstance(d, P.Done) and d.finish_reason != "cancelled", d
                assert d.served_by == "solo"
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for c in (busy, a, b, peer):
                await c.close()
            ctx.destroy(linger=0)

    with RunningNode(cfg, engine):
        asyncio.run(main())
        with Client(ep, timeout=30) as c:
            give_up = time.monotonic() + 60
            while (st := c.status()).inflight:
                assert time.monotonic() < give_up, st
                time.sleep(0.05)


# ---- refused handshakes: a bounded log -------------------------------------------------


@pytest.mark.slow
def test_a_stranger_with_a_fresh_key_per_connection_cannot_flood_the_log(
    tmp_path: Path,
) -> None:
    """Each of N strangers tries once (reconnect far off). The node counts every
    refusal, logs at most log_burst of them per window, and sums the rest in one
    auth.denied_summary line once the window is over: every refusal is accounted for."""
    n = 300
    lab = Lab(n_nodes=1, keys=True, engine={"n_slots": 1, "slot_ctx": 256}, workdir=tmp_path)
    node = lab.nodes[0]
    server_key = load_public_key(lab.public_key(0))
    lab.start()
    ctx = zmq.Context()
    socks = []
    try:
        asyncio.run(lab.wait_converged(timeout=120))
        t0 = time.monotonic()
        for _ in range(n):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 600_000)  # one handshake per key
            public, secret = zmq.curve_keypair()
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server_key
            s.connect(node.serve)
            socks.append(s)
        give_up = time.monotonic() + 120
        while (st := asyncio.run(lab.statuses())[0]).counters.get("auth_denied", 0) < n:
            assert time.monotonic() < give_up, st.counters
            time.sleep(0.2)
        flood_s = time.monotonic() - t0
        assert st.counters["auth_denied"] == n

        def summed() -> int:
            return sum(r["more_refused"] for r in log_events(node.log_path, "auth.denied_summary"))

        give_up = time.monotonic() + 60  # the summary comes when the 10 s window ends
        while len(log_events(node.log_path, "auth.denied")) + summed() < n:
            assert time.monotonic() < give_up, (
                len(log_events(node.log_path, "auth.denied")),
                summed(),
            )
            time.sleep(0.2)
        lines = log_events(node.log_path, "auth.denied")
        assert len(lines) + summed() == n and all(r["repeats"] == 0 for r in lines)
        windows = 1 + math.ceil(flood_s / 10)  # ZapHandler's default window and burst
        assert len(lines) <= 20 * windows, (len(lines), flood_s)
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
        lab.stop()


# ---- membership: dead peers leave, newcomers and returning seeds join --------------------


class Dialled:
    """A plain TCP listener on a dead node's port that counts who dials it (and hangs
    up at once, as a dead port would): a peer still holding a socket to it redials
    every 100 ms (zmq's reconnect interval)."""

    def __init__(self, address: str) -> None:
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, int(port)))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.count = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = self.sock.accept()
                conn.close()
                self.count += 1

    def close(self) -> None:
        self._stop.set()
        self.thread.join(timeout=5)
        self.sock.close()


def wait_until(pred: Callable[[], object], budget_s: float, what: str) -> None:
    give_up = time.monotonic() + budget_s
    while not pred():
        assert time.monotonic() < give_up, f"{what} within {budget_s}s"
        time.sleep(0.1)


@pytest.mark.slow
def test_dead_peers_are_forgotten_newcomers_join_and_a_seed_returns(tmp_path: Path) -> None:
    """max_peers = 3. node-a's seed is node-b (which has no seeds: only node-a's kept
    seed connection can bring it back); c, d, e join through node-a. b and c die: a
    forgets both, stops dialling c (not b, its seed), then learns d and e, both new
    names, and b when it returns."""
    lab = Lab(
        n_nodes=5,
        topology="star",
        engine={"n_slots": 1, "slot_ctx": 256, "n_threads": 1},
        gossip={"max_peers": 3, "forget_after_s": 6.0},
        workdir=tmp_path,
    )
    a, b, c = lab.nodes[:3]
    cfg_a, cfg_b = lab.node_config(0), lab.node_config(1)
    a.config_path.write_text(
        dump_toml(msgspec.structs.replace(cfg_a, seeds=[Seed(serve=b.serve, gossip=b.gossip)]))
    )
    b.config_path.write_text(dump_toml(msgspec.structs.replace(cfg_b, seeds=[])))
    dialled: list[Dialled] = []

    def forgotten() -> dict[str, str]:
        return {r["peer"]: r["why"] for r in log_events(a.log_path, "peer.forgotten")}

    try:
        for i in range(3):
            lab.start_node(i)
        asyncio.run(lab.wait_converged(timeout=120, indices=[0, 1, 2]))
        lab.kill_node(1)
        lab.kill_node(2)
        b_ports = [Dialled(b.serve), Dialled(b.gossip)]
        c_ports = [Dialled(c.serve), Dialled(c.gossip)]
        dialled += b_ports + c_ports
        # 6 s of silence, then forgotten (not to make room: nobody new has come yet).
        wait_until(lambda: forgotten().keys() >= {"node-b", "node-c"}, 60, "b, c forgotten")
        assert all(why.startswith("silent") for why in forgotten().values()), forgotten()
        assert all(d.count > 0 for d in b_ports + c_ports)  # dialled while remembered
        c_calls, b_calls = [d.count for d in c_ports], [d.count for d in b_ports]
        time.sleep(2.0)  # 20 reconnect intervals: a socket still open would redial
        assert [d.count for d in c_ports] == c_calls, "c's DEALER or SUB is still open"
        assert all(d.count > n for d, n in zip(b_ports, b_calls, strict=True)), "seed dropped"
        st = asyncio.run(lab.statuses([0]))[0]
        assert [p.node_id for p in st.peers] == [] and st.counters["peers_forgotten"] == 2

        # Two new names join through node-a, and its seed comes back on its own.
        lab.start_node(3)
        lab.start_node(4)
        asyncio.run(lab.wait_converged(timeout=120, indices=[0, 3, 4]))
        for d in b_ports:
            d.close()
        lab.start_node(1)
        asyncio.run(lab.wait_converged(timeout=120, indices=[0, 1, 3, 4]))
        st = asyncio.run(lab.statuses([0]))[0]
        assert sorted(p.node_id for p in st.peers) == ["node-b", "node-d", "node-e"]
        assert st.counters.get("peers_refused_full", 0) == 0
        assert [r["peer"] for r in log_events(a.log_path, "peer.joined")].count("node-b") == 2
    finally:
        for d in dialled:
            d.close()
        lab.stop()


def test_dead_peers_make_room_for_new_ones_when_the_table_is_full(engine: Engine) -> None:
    """A full table (max_peers = 3) of peers heard of once and then silent: each
    newcomer takes the place of the longest-dead one (forget_after_s is far off)."""
    ports, talker = free_ports(2), free_ports(2)
    talker_serve, talker_gossip = (f"tcp://127.0.0.1:{p}" for p in talker)
    gossip = {
        "heartbeat_interval_s": 0.05,
        "suspect_after_s": 0.2,
        "dead_after_s": 0.4,
        "forget_after_s": 600.0,
        "max_peers": 3,
    }
    cfg = node_config(
        "solo", ports, gossip=gossip, seeds=[{"serve": talker_serve, "gossip": talker_gossip}]
    )
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(talker_gossip)

    def ghosts(first: int) -> list[P.PeerInfo]:
        return [
            P.PeerInfo(
                node_id=f"ghost-{i}",
                serve_addr=f"tcp://127.0.0.1:{9 + 2 * i}",
                gossip_addr=f"tcp://127.0.0.1:{10 + 2 * i}",
            )
            for i in range(first, first + 2)
        ]

    def states(client: Client) -> dict[str, str]:
        return {p.node_id: p.state for p in client.status().peers}

    try:
        with RunningNode(cfg, engine), Client([f"tcp://127.0.0.1:{ports[0]}"], timeout=5) as client:
            for first in (0, 2, 4):  # two ghosts at a time; each pair dies, never heard
                hb = idle_heartbeat(
                    "talker",
                    talker_serve,
                    talker_gossip,
                    engine.block_size,
                    engine.fingerprint.hex(),
                    ghosts(first),
                )
                pair = [f"ghost-{first}", f"ghost-{first + 1}"]
                give_up = time.monotonic() + 30
                while [states(client).get(g) for g in pair] != ["dead", "dead"]:
                    assert time.monotonic() < give_up, states(client)
                    pub.send(P.encode(hb))
                    time.sleep(0.05)
                assert sorted(states(client)) == sorted(["talker", *pair])
            st = client.status()
            assert st.counters.get("peers_forgotten") == 4
            assert st.counters.get("peers_refused_full", 0) == 0
    finally:
        ctx.destroy(linger=0)


def test_forget_after_s_follows_dead_after_s_unless_set() -> None:
    cfg = node_config("solo", free_ports(2), gossip={"dead_after_s": 5.0})
    assert cfg.gossip.forget_after_s == 0.0 and cfg.gossip.forget_s == 20.0
    assert node_config("solo", free_ports(2), gossip={"forget_after_s": 7.5}).gossip.forget_s == 7.5
    for bad in (3.0, 1.0, -1.0, math.nan):  # dead_after_s is 3.0 by default
        with pytest.raises(ConfigError, match=r"gossip\.forget_after_s"):
            node_config("solo", free_ports(2), gossip={"forget_after_s": bad})
