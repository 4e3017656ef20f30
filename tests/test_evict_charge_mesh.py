"""The eviction charge between two real nodes (in-process, real sockets, real model):
an entry whose every slot is full sends a new prompt to an idle peer with a free slot
instead of overwriting one of its own cached prompts; with the charge off it serves the
miss itself, as before (the two estimates are then equal and the local one wins)."""

from __future__ import annotations

import asyncio

import pytest
from meshkit import running_pair, until
from test_engine import FEW_SHOT

from zmesh.client import AsyncClient
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.protocol import SamplingParams

pytestmark = pytest.mark.slow

# Two slots: with one, a miss shares its BOS with the only slot and continues it in
# place, so there is nothing "other" to evict.
ENGINE = EngineConfig(n_slots=2, slot_ctx=1024, n_threads=1)
OTHER = "A long story about the sea, the ships and the harbour at dawn. " * 24
# Long enough that sharing only the BOS is not "continuing a slot in place" (a tenth).
NEW = "Name three deserts of the world, say where each one lies and give one fact about each:"


def _fill_both_slots(engine: Engine) -> None:
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    engine.generate(FEW_SHOT + "Question: prime\nAnswer:", params=greedy)
    engine.generate(OTHER, params=greedy)
    assert engine.evict_tokens(engine.tokenize(NEW), "") > 200  # a miss would evict


@pytest.mark.parametrize("charge", [0.25, 0.0])
def test_a_full_entry_sends_a_miss_to_a_free_peer_only_with_the_charge(charge: float) -> None:
    routing = {"place_slack_frac": 0.0, "forward_timeout_s": 60.0, "evict_charge": charge}
    with running_pair(ENGINE, {**routing, "max_hops": 0}, routing, setup_b=_fill_both_slots) as p:

        async def main() -> tuple[str, str]:
            view = p.b.node.peers
            await until(
                lambda: (a := view.get("node-a")) is not None and a.synced and a.queue_depth == 0,
                "node-b never heard an idle node-a",
            )
            async with AsyncClient([p.b_serve], timeout=600) as c:
                done = await c.generate(NEW, max_tokens=2, temperature=0.0, endpoint=p.b_serve)
            return done.served_by, done.route_reason

        served_by, reason = asyncio.run(main())
    if charge > 0.0:
        assert (served_by, reason) == ("node-a", "load"), (served_by, reason)
    else:
        assert (served_by, reason) == ("node-b", "local_best"), (served_by, reason)
