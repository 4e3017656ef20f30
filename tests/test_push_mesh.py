"""Holder push between two real nodes (real model, real sockets, a node per thread as
in test_kvship_mesh.py): a busy holder offers its hot prefix to the idle peer, which
pulls it into a free slot and then serves that prefix from its cache; a peer with no
free slot refuses; malformed or invalid offers get an error and the node serves on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import msgspec
import pytest
import zmq
import zmq.asyncio
from meshkit import Pair, running_pair, until
from test_engine import FEW_SHOT

from zmesh import protocol as P
from zmesh.client import AsyncClient
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.routing.shipping import REFUSE_NO_FREE_SLOT

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(n_slots=3, slot_ctx=1024, n_threads=1)
QUESTION = (
    "Question 14: Which body is closest to the Earth? A. Sirius B. The Moon "
    "C. Proxima Centauri D. Vega\nAnswer:"
)


@pytest.fixture
def pair() -> Iterator[Pair]:
    # Both serve what reaches them (max_hops 0): node-b's queue must build on the
    # prefix, and node-a must keep the slots the tests fill. No placement hash.
    routing = {"ship_push": True, "max_hops": 0, "place_slack_frac": 0.0}

    def one_place(eb: Engine) -> None:
        eb.max_running = 1  # node-b runs one request at a time: the rest queue

    with running_pair(ENGINE, routing, routing, one_place) as p:
        yield p


def test_a_busy_holder_pushes_its_hot_prefix_to_the_idle_peer(pair: Pair) -> None:
    a, b = pair.a.node, pair.b.node

    async def main() -> P.Done:
        async with AsyncClient([pair.a_serve, pair.b_serve], timeout=600) as c:
            # node-b holds the few-shot prefix and learns that its answers run long.
            primed = await c.generate(
                FEW_SHOT + "Question: prime\nAnswer:", max_tokens=40, endpoint=pair.b_serve
            )
            assert primed.served_by == "node-b", primed
            assert a.engine.local_match(b.engine.tokenize(FEW_SHOT), "default") == 0
            # Three requests on that prefix at once: one runs, two queue (hot).
            busy = [
                asyncio.create_task(
                    c.generate(
                        FEW_SHOT + f"Question: busy {i}\nAnswer:",
                        max_tokens=60,
                        endpoint=pair.b_serve,
                    )
                )
                for i in range(3)
            ]
            await until(lambda: a.counters.get("kv_pushed") == 1, "node-a never took a push")
            for done in await asyncio.gather(*busy):
                assert done.served_by == "node-b"
            # Gossip advertises it: node-b's view of node-a holds the prefix's blocks.
            ids = b.engine.hasher("default").block_ids(b.engine.tokenize(FEW_SHOT))
            await until(
                lambda: (p := b.peers.get("node-a")) is not None and p.match_blocks(ids) > 16,
                "node-b never learned node-a's pushed prefix",
            )
            return await c.generate(FEW_SHOT + QUESTION, max_tokens=4, endpoint=pair.a_serve)

    asked = asyncio.run(main())
    assert b.counters.get("kv_offers_sent") == 1 and b.counters.get("kv_offers_accepted") == 1
    assert a.counters.get("kv_offers_taken") == 1 and b.counters.get("kv_served") == 1
    pushed = a.counters["kv_pushed_tokens"]
    assert pushed >= 256, a.counters
    # The later request for the prefix is served at node-a from the pushed state.
    assert (asked.served_by, asked.hops) == ("node-a", 0), asked
    assert asked.cached_tokens >= pushed and asked.shipped_tokens == 0
    assert a.engine.check_consistency() == []
    assert b.engine.check_consistency() == []


def _ask(serve: str, frames: list[bytes], budget_s: float = 120.0) -> list[P.Message]:
    """Send raw frames to a node's serve socket from a DEALER; one reply per frame."""

    async def main() -> list[P.Message]:
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(serve)
        try:
            for f in frames:
                await sock.send(f)
            got = []
            give_up = time.monotonic() + budget_s
            while len(got) < len(frames):
                left = give_up - time.monotonic()
                got.append(P.decode(await asyncio.wait_for(sock.recv(), max(left, 0.1))))
            return got
        finally:
            ctx.destroy(linger=0)

    return asyncio.run(main())


def _fill_slots(pair: Pair) -> None:
    async def main() -> None:
        async with AsyncClient([pair.a_serve], timeout=600) as c:
            for i in range(ENGINE.n_slots):
                prompt = f"Story {i}: " + " ".join(f"word{i}x{k}" for k in range(40))
                done = await c.generate(prompt, max_tokens=1, endpoint=pair.a_serve)
                assert done.served_by == "node-a"

    asyncio.run(main())


def test_a_peer_with_no_free_slot_refuses_the_offer(pair: Pair) -> None:
    a = pair.a.node
    _fill_slots(pair)
    assert a.engine.free_slots() == 0
    before = a.engine.block_ids()
    tokens = a.engine.tokenize(FEW_SHOT)
    offer = P.KvOffer(request_id="o1", node_id="node-b", tenant="default", tokens=tokens)
    (reply,) = _ask(pair.a_serve, [P.encode(offer)])
    assert isinstance(reply, P.KvOfferReply), reply
    assert (reply.accepted, reply.why, reply.node_id) == (False, REFUSE_NO_FREE_SLOT, "node-a")
    assert a.counters.get("kv_offers_declined") == 1 and not a.counters.get("kv_fetched")
    assert a.engine.block_ids() == before  # nothing evicted, nothing pulled
    assert a.engine.check_consistency() == []


def test_malformed_and_invalid_offers_get_an_error_and_the_node_serves_on(pair: Pair) -> None:
    a = pair.a.node
    good = {"type": "kvoffer", "v": 1, "request_id": "x", "node_id": "node-b", "tenant": "t"}
    frames = [
        msgspec.msgpack.encode({**good, "request_id": "neg", "tokens": [-1]}),  # malformed
        msgspec.msgpack.encode({**good, "request_id": "v9", "v": 9, "tokens": [1]}),
        msgspec.msgpack.encode({**good, "request_id": "none"}),  # no tokens
        P.encode(P.KvOffer(request_id="empty", node_id="node-b", tenant="t", tokens=[])),
        P.encode(P.KvOffer(request_id="who", node_id="node-z", tenant="t", tokens=[2, 3])),
        P.encode(P.KvOffer(request_id="vocab", node_id="node-b", tenant="t", tokens=[10**9])),
        P.encode(P.StatusRequest(request_id="alive")),
    ]
    replies = {getattr(m, "request_id", None): m for m in _ask(pair.a_serve, frames)}
    codes = {
        "neg": P.MALFORMED,
        "v9": P.UNSUPPORTED_VERSION,
        "none": P.MALFORMED,
        "empty": P.INVALID_REQUEST,
        "who": P.INVALID_REQUEST,
        "vocab": P.INVALID_REQUEST,
    }
    for rid, code in codes.items():
        err = replies[rid]
        assert isinstance(err, P.Error) and err.code == code, (rid, err)
    assert "unknown node" in replies["who"].message  # type: ignore[union-attr]
    assert isinstance(replies["alive"], P.Status)
    assert a.counters.get("kv_offers_invalid") == 3, a.counters
    assert not a.counters.get("kv_offers_taken") and not a.counters.get("kv_fetched")
    assert pair.a.thread.is_alive()
    assert a.engine.check_consistency() == []
