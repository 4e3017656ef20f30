"""Holder-side admission between two real nodes (in-process, real sockets, real model):
a holder that a burst made busy refuses a forward its entry sent on a stale picture,
and the entry answers it exactly once, itself (reason ``refused``); a forward whose
bar the holder meets is served there."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from meshkit import Pair, RawClient, running_pair, until
from test_engine import FEW_SHOT

from zmesh import protocol as P
from zmesh.client import AsyncClient
from zmesh.config import EngineConfig
from zmesh.engine import Engine

pytestmark = pytest.mark.slow

ENGINE = EngineConfig(n_slots=3, slot_ctx=1024, n_threads=1)
QUESTION = (
    "Question 14: Which body is closest to the Earth? A. Sirius B. The Moon "
    "C. Proxima Centauri D. Vega\nAnswer:"
)
BUSY = "Count from one to five hundred in words: one, two, three,"
# node-b's gossip (and its replies to node-a) lag by this much once the burst starts,
# so node-a routes on the picture of an idle node-b while it is not.
STALE_S = 4.0


@pytest.fixture
def pair(engine: Engine) -> Iterator[Pair]:
    # Prefixes stay where they are sent (no placement hash); a refusal that comes
    # STALE_S late is still waited for, and the lag makes no one suspect.
    routing = {"place_slack_frac": 0.0, "forward_timeout_s": 60.0}
    # node-b keeps the burst it is sent (it forwards nothing itself).
    with running_pair(ENGINE, routing, {**routing, "max_hops": 0}) as p:
        yield p


async def _prime_b(p: Pair, c: AsyncClient) -> None:
    """node-b holds the few-shot prefix, has learned that its answers run long, is idle,
    and node-a knows all that."""
    primed = await c.generate(
        FEW_SHOT + "Question: prime\nAnswer:", max_tokens=60, endpoint=p.b_serve, timeout=600
    )
    assert primed.served_by == "node-b" and primed.completion_tokens > 20, primed
    view = p.a.node.peers
    await until(
        lambda: (
            (b := view.get("node-b")) is not None
            and b.synced
            and b.n_blocks >= 20
            and b.queue_depth == 0
        ),
        "node-a never learned node-b's prefix",
    )


def _question(rid: str) -> P.Generate:
    return P.Generate(
        request_id=rid,
        prompt=FEW_SHOT + QUESTION,
        params=P.SamplingParams(max_tokens=4, temperature=0.0),
        stream=False,
    )


def test_a_busy_holder_refuses_and_the_entry_answers_once_itself(pair: Pair) -> None:
    async def main() -> tuple[P.Done | P.Error | None, RawClient]:
        rc = RawClient([pair.a_serve])
        rc.start()
        try:
            async with AsyncClient([pair.b_serve], timeout=600) as c:
                await _prime_b(pair, c)
                # From now on node-a hears node-b STALE_S late; then a burst reaches
                # node-b directly, which node-a cannot see yet.
                lag = P.FaultSettings(delay_ms=STALE_S * 1000)
                pair.b.loop.call_soon_threadsafe(pair.b.node.transport.faults.apply, lag, "test")
                # Busy means every place taken (the engine batches): one more than that.
                n = pair.b.node.load.places() + 1
                burst = [
                    asyncio.create_task(c.generate(BUSY, max_tokens=400, timeout=600))
                    for _ in range(n)
                ]
                await until(lambda: pair.b.node.load.depth() >= n, "node-b never got busy")
                seen = pair.a.node.peers.get("node-b")
                assert seen is not None and seen.queue_depth == 0, "node-a saw the burst"
                answer = await rc.ask(pair.a_serve, _question(rc.new_id("q")), 300)
                await rc.drain()
                for task in burst:
                    task.cancel()
                await asyncio.gather(*burst, return_exceptions=True)
                return answer, rc
        finally:
            await rc.close()

    answer, rc = asyncio.run(main())
    assert isinstance(answer, P.Done), answer
    assert (answer.served_by, answer.route_reason, answer.hops) == ("node-a", "refused", 0)
    assert answer.completion_tokens >= 1
    assert rc.tally.twice == [] and rc.tally.lost == []  # answered exactly once
    a, b = pair.a.node.counters, pair.b.node.counters
    assert b.get("forwards_refused_busy") == 1 and not b.get("forwards_admitted"), b
    assert a.get("forwards") == 1 and a.get("forwards_busy") == 1, a
    assert not a.get("forward_fallbacks"), a  # a refusal is no failure
    assert a.get("route_refused") == 1, a


def test_a_forward_whose_bar_the_holder_meets_is_served_there(pair: Pair) -> None:
    async def main() -> P.Done:
        async with AsyncClient([pair.a_serve, pair.b_serve], timeout=600) as c:
            await _prime_b(pair, c)
            return await c.generate(
                FEW_SHOT + QUESTION, max_tokens=4, temperature=0.0, endpoint=pair.a_serve
            )

    done = asyncio.run(main())
    assert (done.served_by, done.route_reason, done.hops) == ("node-b", "prefix", 1), done
    assert done.cached_tokens > 300
    b = pair.b.node.counters
    assert b.get("forwards_admitted") == 1 and not b.get("forwards_refused_busy"), b
