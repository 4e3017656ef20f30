"""KV shipping between two real nodes (in-process, real sockets, real model): a request
whose prefix sits on a busy peer pulls it, answers as a cold run would, and says so;
a holder that never answers costs a local prefill, never the answer; a fetch for
another tenant's prefix learns nothing."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from typing import ClassVar

import msgspec
import pytest
import zmq
import zmq.asyncio
from meshkit import Pair, running_pair, until
from test_engine import FEW_SHOT, GREEDY

from zmesh import protocol as P
from zmesh.client import AsyncClient
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.kvpeer import NO_STATE
from zmesh.kvtransfer import Assembly, ShipCosts

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(n_slots=3, slot_ctx=1024, n_threads=1)
QUESTION = (
    "Question 14: Which body is closest to the Earth? A. Sirius B. The Moon "
    "C. Proxima Centauri D. Vega\nAnswer:"
)
BUSY = "Count from one to five hundred in words: one, two, three,"
BUSY_PLACES = 2


@pytest.fixture
def pair(engine: Engine) -> Iterator[Pair]:
    # Prefixes stay where they are sent (no placement hash), and a peer that stops
    # answering stays "alive" long enough for the fetch's own timeout.
    routing = {"ship": True, "place_slack_frac": 0.0}

    def two_places(eb: Engine) -> None:
        # node-b runs two requests at once: two long answers make it busy (no place
        # for a third) while its third slot keeps the primed prefix for node-a to pull.
        eb.max_running = BUSY_PLACES

    # node-b serves what reaches it (max_hops 0): while it reads the first long prompt
    # it would rightly send the second to idle node-a, and it must hold both.
    holder = {**routing, "max_hops": 0}
    with running_pair(ENGINE, {**routing, "ship_timeout_s": 2.0}, holder, two_places) as p:
        yield p


async def _prime_b_and_make_it_busy(p: Pair, c: AsyncClient) -> asyncio.Task[P.Done]:
    # A long first answer: node-b learns that its answers run long, so the next long
    # request shows in the backlog it advertises (predicted from answer lengths).
    primed = await c.generate(
        FEW_SHOT + "Question: prime\nAnswer:", max_tokens=60, endpoint=p.b_serve, timeout=600
    )
    assert primed.served_by == "node-b" and primed.completion_tokens > 20, primed
    view = p.a.node.peers
    await until(
        lambda: (b := view.get("node-b")) is not None and b.synced and b.n_blocks >= 20,
        "node-a never learned node-b's prefix",
    )

    async def busy_answers() -> P.Done:
        answers = await asyncio.gather(
            *(
                c.generate(f"{BUSY} ({i})", max_tokens=400, endpoint=p.b_serve, timeout=600)
                for i in range(BUSY_PLACES)
            )
        )
        return answers[0]

    busy = asyncio.create_task(busy_answers())
    await until(
        lambda: (b := view.get("node-b")) is not None and b.backlog_s > 0.5,
        "node-b never looked busy to node-a",
    )
    return busy


class _ThreadsOfImports(ShipCosts):
    """`ShipCosts` that notes which thread fed it each import's cost."""

    threads: ClassVar[list[str]] = []

    def observe_import(self, nbytes: int, seconds: float) -> None:
        self.threads.append(threading.current_thread().name)
        super().observe_import(nbytes, seconds)


def test_a_busy_holders_prefix_is_pulled_and_answers_like_a_cold_run(
    pair: Pair, engine: Engine
) -> None:
    # What the import cost and counts is recorded on node-a's loop thread, which owns
    # the counters and the costs routing reads, never on its engine thread.
    kv = pair.a.node.kv
    kv.costs = _ThreadsOfImports(**{f.name: getattr(kv.costs, f.name) for f in fields(kv.costs)})
    kv_counted: list[str] = []
    count = kv._count

    def count_kv(name: str, n: int = 1) -> None:
        kv_counted.append(threading.current_thread().name)
        count(name, n)

    kv._count = count_kv

    async def main() -> tuple[P.Done, P.Done]:
        async with AsyncClient([pair.a_serve, pair.b_serve], timeout=600) as c:
            busy = await _prime_b_and_make_it_busy(pair, c)
            asked = await c.generate(
                FEW_SHOT + QUESTION,
                max_tokens=GREEDY.max_tokens,
                temperature=0.0,
                endpoint=pair.a_serve,
            )
            return asked, await busy

    asked, busy = asyncio.run(main())
    assert busy.served_by == "node-b" and busy.completion_tokens > 1
    assert (asked.served_by, asked.route_reason, asked.hops) == ("node-a", "shipped", 0), asked
    assert asked.pulled_from == "node-b"
    assert asked.shipped_tokens > 300 and asked.cached_tokens >= asked.shipped_tokens
    cold = engine.generate(FEW_SHOT + QUESTION, params=GREEDY, namespace="cold-reference")
    assert cold.cached_tokens == 0
    assert asked.text == cold.text
    counters_a, counters_b = pair.a.node.counters, pair.b.node.counters
    assert counters_a.get("kv_fetched") == 1 and counters_b.get("kv_served") == 1
    assert pair.a.node.kv.costs.measured_bytes_per_token > 0  # measured, not the start value
    loop_thread = pair.a.thread.name
    assert _ThreadsOfImports.threads == [loop_thread]
    assert kv_counted and set(kv_counted) == {loop_thread}
    assert pair.a.node.engine.check_consistency() == []
    assert pair.b.node.engine.check_consistency() == []


def test_a_holder_that_stops_answering_costs_a_local_prefill_not_the_answer(
    pair: Pair, engine: Engine
) -> None:
    async def main() -> P.Done:
        async with AsyncClient([pair.a_serve], timeout=600) as c:
            busy = await _prime_b_and_make_it_busy(pair, c)
            pair.b.stop()  # gone mid-request; node-a still counts it alive (suspect at 30 s)
            busy.cancel()
            return await c.generate(
                FEW_SHOT + QUESTION,
                max_tokens=GREEDY.max_tokens,
                temperature=0.0,
                endpoint=pair.a_serve,
            )

    asked = asyncio.run(main())
    assert (asked.served_by, asked.route_reason) == ("node-a", "fallback"), asked
    assert asked.shipped_tokens == 0 and asked.cached_tokens < 100
    cold = engine.generate(FEW_SHOT + QUESTION, params=GREEDY, namespace="cold-reference-2")
    assert asked.text == cold.text
    assert pair.a.node.counters.get("kv_fetch_failed") == 1
    assert pair.a.node.engine.check_consistency() == []


def test_a_holder_with_no_dealer_at_pull_start_is_reported_as_a_fallback(
    pair: Pair, engine: Engine
) -> None:
    """A "shipped" decision whose holder node-a cannot reach when the pull would start
    (no DEALER to it: e.g. its key is not allowed, or it was just dropped) is prefilled
    here and must say so: reason "fallback", nothing shipped, a failed fetch counted."""
    t = pair.a.node.transport
    real = t.dealer_for

    def no_dealer_to_b(peer):  # type: ignore[no-untyped-def]
        return None if peer.node_id == "node-b" else real(peer)

    async def main() -> P.Done:
        async with AsyncClient([pair.a_serve, pair.b_serve], timeout=600) as c:
            busy = await _prime_b_and_make_it_busy(pair, c)
            t.dealer_for = no_dealer_to_b  # type: ignore[method-assign]
            try:
                asked = await c.generate(
                    FEW_SHOT + QUESTION,
                    max_tokens=GREEDY.max_tokens,
                    temperature=0.0,
                    endpoint=pair.a_serve,
                )
            finally:
                t.dealer_for = real  # type: ignore[method-assign]
            await busy  # node-b is idle again before it is stopped
            return asked

    asked = asyncio.run(main())
    counters = pair.a.node.counters
    assert counters.get("route_shipped") == 1, counters  # it was a shipped decision
    assert (asked.served_by, asked.route_reason, asked.hops) == ("node-a", "fallback", 0), asked
    assert asked.shipped_tokens == 0 and asked.pulled_from is None
    assert counters.get("kv_fetch_failed") == 1 and not counters.get("kv_fetched"), counters
    cold = engine.generate(FEW_SHOT + QUESTION, params=GREEDY, namespace="cold-reference-3")
    assert asked.text == cold.text


def test_a_node_stops_while_a_request_waits_for_its_pull(pair: Pair) -> None:
    """Stopping must not wait for (or be swallowed by) a pull in flight: the worker
    awaiting it is cancelled like any other task."""
    kv = pair.a.node.kv
    kv.config = msgspec.structs.replace(kv.config, ship_timeout_s=300.0)

    async def main() -> None:
        async with AsyncClient([pair.a_serve], timeout=600) as c:
            busy = await _prime_b_and_make_it_busy(pair, c)
            # The holder stays connected but cuts node-a off: the fetch is never answered.
            cut = P.FaultSettings(partition=["node-a"])
            pair.b.loop.call_soon_threadsafe(pair.b.node.transport.faults.apply, cut, "test")
            asked = asyncio.create_task(
                c.generate(FEW_SHOT + QUESTION, max_tokens=4, endpoint=pair.a_serve)
            )
            await until(lambda: bool(kv._pulls), "node-a never started a pull")
            t0 = time.monotonic()
            await asyncio.to_thread(pair.a.stop)
            assert not pair.a.thread.is_alive(), "node-a did not stop"
            assert time.monotonic() - t0 < 60
            for task in (asked, busy):
                task.cancel()
            await asyncio.gather(asked, busy, return_exceptions=True)

    asyncio.run(main())


def test_a_fetch_for_another_tenants_prefix_learns_nothing(pair: Pair) -> None:
    async def main() -> dict[str, list[P.Message]]:
        async with AsyncClient([pair.b_serve], timeout=600) as c:
            await c.generate(FEW_SHOT + "Question: prime\nAnswer:", max_tokens=1)
        tokens = pair.b.node.engine.tokenize(FEW_SHOT + QUESTION)
        other = pair.b.node.engine.tokenize("Zebras are striped because")
        asks = {
            "own": P.KvFetch(request_id="own", tenant="default", tokens=tokens, max_bytes=1 << 26),
            "tenant": P.KvFetch(
                request_id="tenant", tenant="acme", tokens=tokens, max_bytes=1 << 26
            ),
            "unknown": P.KvFetch(
                request_id="unknown",
                tenant="default",
                tokens=[*other[:1], 7, 7, 7],
                max_bytes=1 << 26,
            ),
            "cap": P.KvFetch(request_id="cap", tenant="default", tokens=tokens, max_bytes=1000),
        }
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(pair.b_serve)
        got: dict[str, list[P.Message]] = {k: [] for k in asks}
        try:
            for ask in asks.values():
                await sock.send(P.encode(ask))
            give_up = time.monotonic() + 120
            while sum(1 for k, v in got.items() if _final(v)) < len(asks):
                assert time.monotonic() < give_up, got
                msg = P.decode(await asyncio.wait_for(sock.recv(), 120))
                got[msg.request_id].append(msg)  # type: ignore[union-attr]
        finally:
            ctx.destroy(linger=0)
        return got

    got = asyncio.run(main())
    refusals = [got[k] for k in ("tenant", "unknown", "cap")]
    for r in refusals:
        assert len(r) == 1 and isinstance(r[0], P.Error), r
        assert (r[0].code, r[0].message) == (P.KV_UNAVAILABLE, NO_STATE)
    asm, state = Assembly(max_bytes=1 << 26), None
    for part in got["own"]:
        assert isinstance(part, P.KvPart)
        state = asm.add(part)
    assert state is not None and state.n_tokens > 300 and state.header.namespace == "default"


def _final(msgs: list[P.Message]) -> bool:
    if not msgs:
        return False
    last = msgs[-1]
    return isinstance(last, P.Error) or (isinstance(last, P.KvPart) and last.part == last.parts - 1)
