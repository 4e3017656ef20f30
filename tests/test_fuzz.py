"""Fuzz the socket handlers of a real node process with hypothesis.

Random and malformed multipart frames go to the node's ROUTER (as a client), its SUB
(posing as a peer whose PUB the node subscribes to) and its DEALER (as that peer's
ROUTER): random bytes, msgpack of the wrong shape, real message types with fields of
the wrong type, valid messages with absurd values, huge ids, wrong frame counts.
After every example the node must answer a status within seconds (nothing hung);
at the end it must still serve a real request, hold nothing in flight or queued, and
its log must show no handler crash (every bad input got a clear error instead).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from meshkit import idle_heartbeat, log_events

from zmesh import protocol as P
from zmesh.client import Client
from zmesh.lab import Lab, free_ports
from zmesh.model import default_model_path, model_fingerprint

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
PROBE_S = 10.0  # a status must come back this fast after each example
FAKE = "fake-peer"

I64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
U64 = st.integers(min_value=0, max_value=2**64 - 1)
ANY_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
FLOATS = st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.one_of(
    st.none(), st.booleans(), ANY_INT, FLOATS, st.text(max_size=40), st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
TAGS = [cls.__struct_config__.tag for cls in P.Message.__args__]  # type: ignore[attr-defined]
FIELDS = sorted({f for cls in P.Message.__args__ for f in cls.__struct_fields__})  # type: ignore[attr-defined]
IDS = st.one_of(
    st.text(max_size=30),
    st.just(""),
    st.text(min_size=129, max_size=300),
    st.just("x" * 100_000),  # a huge id: refused, echoed back, nothing else
)
ADDRS = st.one_of(
    st.sampled_from(
        ["", "garbage", "tcp://*:5555", "tcp://127.0.0.1:99999", "ipc://", "tcp://127.0.0.1:1"]
    ),
    st.text(max_size=30),
)
PEER_INFO = st.builds(
    P.PeerInfo,
    node_id=st.one_of(st.text(max_size=10), st.just(FAKE)),
    serve_addr=ADDRS,
    gossip_addr=ADDRS,
    public_key=st.one_of(st.none(), st.text(max_size=41)),
)
PARAMS = st.builds(
    P.SamplingParams,
    # Valid requests stay short (they run on the real model); the rest are refused.
    max_tokens=st.one_of(st.integers(1, 3), st.integers(-(2**31), 0), st.integers(8193, 2**40)),
    temperature=FLOATS,
    top_p=FLOATS,
    top_k=st.integers(-(2**31), 2**31),
    seed=st.one_of(st.none(), st.integers(-(2**40), 2**40)),
    stop=st.lists(st.text(max_size=300), max_size=10),
)
GENERATE = st.builds(
    P.Generate,
    request_id=IDS,
    prompt=st.one_of(st.none(), st.text(max_size=200)),
    tokens=st.one_of(st.none(), st.lists(st.integers(-(2**40), 2**40), max_size=30)),
    tenant=st.one_of(st.just("default"), st.text(max_size=140)),
    params=PARAMS,
    hops=I64,
    deadline=st.one_of(st.none(), FLOATS, st.just(time.time() + 60)),
    origin=st.one_of(st.none(), st.just(FAKE), st.text(max_size=10)),
    stream=st.booleans(),
)
# Requests that pass validation, with something odd about them: tokens outside the
# vocabulary, a past deadline, many hops, a forwarder's origin, stop strings, tenants.
GENERATE_OK = st.builds(
    P.Generate,
    request_id=st.text(min_size=1, max_size=20),
    prompt=st.one_of(st.none(), st.text(min_size=1, max_size=60)),
    tokens=st.one_of(
        st.none(),
        st.lists(st.integers(0, 5000), min_size=1, max_size=20),
        st.lists(st.integers(0, 2**31), min_size=1, max_size=20),  # mostly out of vocab
    ),
    tenant=st.text(min_size=1, max_size=20),
    params=st.builds(
        P.SamplingParams,
        max_tokens=st.integers(1, 3),
        temperature=st.floats(0, 5),
        top_p=st.floats(0.01, 1),
        top_k=st.integers(0, 100),
        seed=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
        stop=st.lists(st.text(min_size=1, max_size=5), max_size=3),
    ),
    hops=st.integers(0, 2**31),
    deadline=st.sampled_from([None, None, 1.0, time.time() + 60]),
    origin=st.one_of(st.none(), st.just(FAKE)),
    stream=st.booleans(),
).filter(lambda g: (g.prompt is None) != (g.tokens is None))
OTHER_SERVE = st.one_of(
    st.builds(P.Cancel, request_id=IDS),
    st.builds(P.StatusRequest, request_id=IDS),
    st.builds(P.SnapshotRequest, request_id=IDS, node_id=st.text(max_size=20)),
    st.builds(P.Ping, request_id=IDS, sent_at=FLOATS, sender=st.one_of(st.none(), PEER_INFO)),
    st.builds(P.Chunk, request_id=IDS, index=I64, text=st.text(max_size=20), attempt=I64),
    st.builds(P.Error, request_id=IDS, code=st.text(max_size=20), message=st.text(max_size=20)),
)


def heartbeat_st(fingerprint: str, gossip: str, serve: str) -> st.SearchStrategy[P.Heartbeat]:
    return st.builds(
        P.Heartbeat,
        node_id=st.one_of(st.just(FAKE), st.text(max_size=10)),
        epoch=I64,
        seq=I64,
        sent_at=FLOATS,
        serve_addr=st.one_of(st.just(serve), ADDRS),
        gossip_addr=st.one_of(st.just(gossip), ADDRS),
        queue_depth=I64,
        busy_slots=I64,
        n_slots=I64,
        n_blocks=I64,
        digest=U64,
        prefill_s_per_token=FLOATS,
        service_s=FLOATS,
        backlog_s=FLOATS,
        peers=st.lists(PEER_INFO, max_size=4),
        block_size=st.one_of(st.just(16), I64),
        model_fingerprint=st.one_of(st.just(fingerprint), st.text(max_size=10)),
        public_key=st.one_of(st.none(), st.text(max_size=41)),
    )


GOSSIP_OTHER = st.one_of(
    st.builds(
        P.CacheDelta,
        node_id=st.one_of(st.just(FAKE), st.text(max_size=10)),
        epoch=I64,
        seq=I64,
        added=st.lists(st.tuples(U64, U64), max_size=20),
        removed=st.lists(U64, max_size=20),
    ),
    st.builds(
        P.Snapshot,
        request_id=IDS,
        node_id=st.one_of(st.just(FAKE), st.text(max_size=10)),
        epoch=I64,
        seq=I64,
        part=I64,
        parts=I64,
        blocks=st.lists(st.tuples(U64, U64), max_size=20),
        digest=U64,
        n_blocks=I64,
    ),
    st.builds(P.Pong, request_id=IDS, sent_at=FLOATS, node_id=st.one_of(st.just(FAKE), IDS)),
)


def encoded(messages: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return messages.map(P.encode)


def junk() -> st.SearchStrategy[bytes]:
    """Bytes that are not a valid message, or are one of the wrong shape."""
    shaped = st.fixed_dictionaries(
        {"type": st.sampled_from(TAGS), "v": st.sampled_from([1, 1, 1, 0, 2, -1, 2**40])},
        optional=dict.fromkeys(set(FIELDS) - {"type", "v"}, VALUES),
    )
    return st.one_of(
        st.binary(max_size=2048),
        VALUES.map(msgspec.msgpack.encode),
        shaped.map(msgspec.msgpack.encode),
    )


def framing(payload: st.SearchStrategy[bytes]) -> st.SearchStrategy[list[bytes]]:
    """One frame, a REQ-style delimiter, or a wrong number of frames."""
    return st.one_of(
        payload.map(lambda p: [p]),
        payload.map(lambda p: [b"", p]),
        st.lists(payload, min_size=2, max_size=4),
    )


class FakePeer:
    """The other end of the node's SUB (our PUB) and DEALER (our ROUTER)."""

    def __init__(self, ctx: zmq.Context, fingerprint: str) -> None:
        ports = free_ports(2)
        self.serve, self.gossip = (f"tcp://127.0.0.1:{p}" for p in ports)
        self.router, self.pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
        for s in (self.router, self.pub):
            s.setsockopt(zmq.LINGER, 0)
        self.router.bind(self.serve)
        self.pub.bind(self.gossip)
        self.ident: bytes | None = None  # the node's DEALER, once it spoke to us
        self.fingerprint = fingerprint
        self.heard = 0

    def heartbeat(self) -> None:
        """A valid heartbeat, so the node keeps the fake peer alive and talks to it."""
        hb = idle_heartbeat(FAKE, self.serve, self.gossip, 16, self.fingerprint)
        self.pub.send(P.encode(hb))

    def answer(self) -> None:
        """Answer what the node sent us: forwards fail at once (the node falls back),
        snapshot requests get an empty snapshot, pings a pong."""
        while self.router.poll(0):
            ident, payload = self.router.recv_multipart()[:2]
            self.ident, self.heard = ident, self.heard + 1
            try:
                msg = P.decode(payload)
            except P.ProtocolError:
                continue
            reply: P.Message | None = None
            if isinstance(msg, P.Generate):
                reply = P.Error(request_id=msg.request_id, code=P.INTERNAL, message="fake")
            elif isinstance(msg, P.SnapshotRequest):
                reply = P.Snapshot(
                    request_id=msg.request_id,
                    node_id=FAKE,
                    epoch=1,
                    seq=0,
                    part=0,
                    parts=1,
                    blocks=[],
                    digest=0,
                    n_blocks=0,
                )
            elif isinstance(msg, P.Ping):
                reply = P.Pong(request_id=msg.request_id, sent_at=msg.sent_at, node_id=FAKE)
            if reply is not None:
                self.router.send_multipart([ident, P.encode(reply)])


def probe(client: zmq.Socket, fake: FakePeer, timeout: float = PROBE_S) -> P.Status:
    """Ask for a status and wait for it, answering the fake peer's traffic meanwhile."""
    rid = uuid.uuid4().hex
    client.send(P.encode(P.StatusRequest(request_id=rid)))
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        fake.answer()
        if client.poll(20):
            msg = P.decode(client.recv_multipart()[-1])
            if isinstance(msg, P.Status) and msg.request_id == rid:
                return msg
    raise AssertionError(f"the node did not answer a status within {timeout}s")


def test_fuzzed_frames_on_every_socket_leave_the_node_serving(tmp_path: Path) -> None:
    ctx = zmq.Context()
    fingerprint = model_fingerprint(default_model_path()).hex()
    fake = FakePeer(ctx, fingerprint)
    lab = Lab(
        n_nodes=1,
        engine={"n_slots": 2, "slot_ctx": 512, "n_threads": 1},
        extra_seeds=[{"serve": fake.serve, "gossip": fake.gossip}],
        workdir=tmp_path,
    )
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.LINGER, 0)
    node = lab.nodes[0]
    counts = {"serve": 0, "sub": 0, "dealer": 0, "frames": 0, "examples": 0}
    lab.start()
    try:
        asyncio.run(lab.wait_converged(timeout=90))
        client.connect(node.serve)
        give_up = time.monotonic() + 15
        while not any(p.node_id == FAKE for p in probe(client, fake).peers):
            assert time.monotonic() < give_up, "the node never heard the fake peer"
            fake.heartbeat()
            time.sleep(0.1)

        serve_frames = framing(
            st.one_of(junk(), encoded(GENERATE), encoded(GENERATE_OK), encoded(OTHER_SERVE))
        )
        gossip_frames = st.one_of(
            junk(),
            encoded(heartbeat_st(fingerprint, fake.gossip, fake.serve)),
            encoded(GOSSIP_OTHER),
        )

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            phases=[Phase.generate],  # a real process: no shrinking, bounded time
            suppress_health_check=list(HealthCheck),
        )
        @given(
            serve=st.lists(serve_frames, max_size=3),
            gossip=st.lists(gossip_frames, max_size=3),
            dealer=st.lists(st.one_of(junk(), encoded(GOSSIP_OTHER)), max_size=2),
        )
        def one(serve: list[list[bytes]], gossip: list[bytes], dealer: list[bytes]) -> None:
            for frames in serve:
                client.send_multipart(frames)
            for frame in gossip:
                fake.pub.send(frame)
            if fake.ident is not None:
                for frame in dealer:
                    fake.router.send_multipart([fake.ident, frame])
                counts["dealer"] += len(dealer)
            fake.heartbeat()
            counts["serve"] += len(serve)
            counts["sub"] += len(gossip)
            counts["frames"] += sum(map(len, serve)) + len(gossip)
            counts["examples"] += 1
            probe(client, fake)  # nothing hung

        t0 = time.monotonic()
        one()
        fuzz_s = time.monotonic() - t0

        # Frames at and over the size cap: the big one is read and refused, the
        # oversized one never reaches Python (libzmq drops that connection).
        big, over = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
        for s in (big, over):
            s.setsockopt(zmq.LINGER, 0)
            s.connect(node.serve)
        big.send(os.urandom(P.MAX_FRAME_BYTES - 1024))
        over.send(os.urandom(P.MAX_FRAME_BYTES + 1))
        assert big.poll(10_000), "no answer to a big junk frame"
        assert isinstance(P.decode(big.recv()), P.Error)

        # Idle again: whatever was admitted got answered, nothing leaked.
        give_up = time.monotonic() + 60
        while True:
            st_ = probe(client, fake)
            if st_.inflight == st_.queue_depth == st_.inflight_clients == 0:
                break
            assert time.monotonic() < give_up, (st_.inflight, st_.queue_depth)
            time.sleep(0.1)
        with Client([node.serve], timeout=60) as c:
            done = c.generate("The capital of France is", max_tokens=4)
            final = c.status()
        assert done.completion_tokens >= 1 and done.served_by == node.name
        assert node.alive
    finally:
        lab.stop()
        ctx.destroy(linger=0)

    crashes = [
        r
        for ev in ("serve.handler_failed", "gossip.handler_failed", "dealer.handler_failed")
        for r in log_events(node.log_path, ev)
    ]
    assert crashes == [], crashes[:3]
    assert final.counters.get("frames_malformed", 0) > 0
    print(
        f"\nFUZZ examples={counts['examples']} serve_messages={counts['serve']} "
        f"serve_frames={counts['frames'] - counts['sub']} gossip_frames={counts['sub']} "
        f"dealer_frames={counts['dealer']} fuzz_s={fuzz_s:.1f} "
        f"malformed={final.counters.get('frames_malformed', 0)} "
        f"invalid={final.counters.get('requests_invalid', 0)} "
        f"served={final.counters.get('requests_served', 0)} "
        f"fake_peer_messages={fake.heard} crashes=0 counters={final.counters}"
    )
