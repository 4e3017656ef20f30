"""A node serves several requests at once: its jobs run together in the batched engine.

Real model, real sockets, a node in this process. The engine is held at a step
boundary (a between-steps call that waits) until all three requests are queued in it,
so they are admitted together and the test counts steps with three sequences, never
time. Each request is answered exactly once, with the text it gets alone; a Cancel for
one ends that one only.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
from meshkit import RawClient, RunningNode, node_config
from test_batching import COUNT, LETTERS, QUESTION

from zmesh import protocol as P
from zmesh.config import EngineConfig
from zmesh.engine import Engine, StepReport
from zmesh.lab import free_ports

PROMPTS = {"count": (COUNT, 16), "letters": (LETTERS, 16), "question": (QUESTION, 12)}
STORY = ("Write a very long story about a dragon who learns to bake bread.\n", 400)
WAIT_S = 120.0  # bound on every wait for a fact (2 shared cores, a loaded machine)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig(n_slots=3, slot_ctx=1024, n_threads=1, prefill_chunk=128))
    yield eng
    eng.close()


def msg(rid: str, prompt: str, max_tokens: int) -> P.Generate:
    return P.Generate(
        request_id=rid,
        prompt=prompt,
        params=P.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        deadline=time.time() + 600,
        stream=True,
    )


class Gate:
    """Holds the engine thread at a step boundary until ``n`` requests wait in it and
    the test lets go, so they are admitted in the same step."""

    def __init__(self, engine: Engine, n: int) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        self.waiting_seen = 0

        def hold() -> None:
            give_up = time.monotonic() + WAIT_S
            while engine.waiting() < n and time.monotonic() < give_up:
                time.sleep(0.005)  # polling a fact, bounded: the node submits them
            self.waiting_seen = engine.waiting()
            self.reached.set()
            self.go.wait(WAIT_S)

        self.future = engine.call_soon(hold)


async def until(fact: threading.Event) -> None:
    give_up = time.monotonic() + WAIT_S
    while not fact.is_set():
        assert time.monotonic() < give_up, "gate not reached"
        await asyncio.sleep(0.01)


def test_three_requests_run_together_on_one_node(engine: Engine) -> None:
    running = RunningNode(node_config("batch", free_ports(2)), engine)
    ep = running.serve_addr
    steps: list[StepReport] = []

    async def main() -> None:
        async with RawClient([ep]) as rc:
            # Alone, one after another, from a cold cache each.
            alone: dict[str, str] = {}
            for name, (prompt, n) in PROMPTS.items():
                engine.clear()
                done = await rc.ask(ep, msg(f"alone-{name}", prompt, n), WAIT_S)
                assert isinstance(done, P.Done), done
                alone[name] = done.text
            engine.clear()

            # Together: all three queued in the engine before it takes any.
            gate = Gate(engine, 3)
            engine.on_step = steps.append
            events = [
                await rc.send(ep, msg(name, prompt, n)) for name, (prompt, n) in PROMPTS.items()
            ]
            await until(gate.reached)
            assert gate.waiting_seen == 3
            st = await rc.status(ep)
            # What the node says of its load while three run: all three counted.
            assert st.queue_depth == 3 and st.inflight == 3, (st.queue_depth, st.inflight)
            gate.go.set()
            for ev in events:
                await asyncio.wait_for(ev.wait(), WAIT_S)
            for name in PROMPTS:
                finals = rc.tally.finals[name]
                assert len(finals) == 1, finals  # answered exactly once
                assert isinstance(finals[0], P.Done) and finals[0].text == alone[name], (
                    name,
                    finals[0],
                    alone[name],
                )
            # Steps, not time: some llama_decode calls carried all three sequences.
            assert max(len(s.decoded) for s in steps) == 3, [s.decoded for s in steps]

            # Cancelling one of three running leaves the other two as they were.
            engine.clear()
            gate = Gate(engine, 3)
            reqs = {
                "c-count": PROMPTS["count"],
                "c-story": STORY,
                "c-letters": PROMPTS["letters"],
            }
            events = [await rc.send(ep, msg(rid, p, n)) for rid, (p, n) in reqs.items()]
            await until(gate.reached)
            gate.go.set()
            give_up = time.monotonic() + WAIT_S
            while rc.tally.chunks["c-story"] == 0:  # it runs: its first text came
                assert time.monotonic() < give_up, "no text from the story"
                await asyncio.sleep(0.01)
            await rc.socks[ep].send(P.encode(P.Cancel(request_id="c-story")))
            for ev in events:
                await asyncio.wait_for(ev.wait(), WAIT_S)
            story = rc.tally.finals["c-story"]
            assert len(story) == 1 and isinstance(story[0], P.Done), story
            assert story[0].finish_reason == "cancelled"
            assert story[0].completion_tokens < STORY[1]
            for rid, name in (("c-count", "count"), ("c-letters", "letters")):
                finals = rc.tally.finals[rid]
                assert len(finals) == 1 and isinstance(finals[0], P.Done), finals
                assert finals[0].text == alone[name]
            await rc.drain()
            assert all(len(f) == 1 for f in rc.tally.finals.values())

    try:
        with running:
            asyncio.run(main())
    finally:
        engine.on_step = None
    assert engine.running() == 0 and engine.waiting() == 0
    assert engine.check_consistency() == []
