"""A node that stops while requests are in the engine leaves no straggler behind.

Real model, real sockets, a node in this process (`meshkit.RunningNode`). The moments
that matter are held on purpose, not waited for: a KV import blocks on the engine
thread until the stop has begun, a step's delivery waits for it, a job sits queued
behind the node's only place. Then: the request submitted by an import that a stop
overtook is cancelled (review F3), text the engine delivers after the stop began is
not sent (F4), and a queued job's KV pull is cancelled, not left running (F6).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from meshkit import RawClient, RunningNode, node_config

from zmesh import protocol as P
from zmesh.config import EngineConfig
from zmesh.engine import Engine, Handle, run_calls
from zmesh.kvpeer import Imported
from zmesh.lab import free_ports
from zmesh.node import Node
from zmesh.node.load import Job
from zmesh.node.request import RequestContext

WAIT_S = 120.0  # bound on every wait for a fact (2 shared cores, a loaded machine)
STORY = "Write a very long story about a dragon who learns to bake bread.\n"
LONG = 300  # tokens: a request that is still running when the node stops


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine(EngineConfig(n_slots=2, slot_ctx=512, n_threads=1))
    yield eng
    eng.close()


@pytest.fixture
def running(engine: Engine) -> Iterator[RunningNode]:
    """A node on its own loop thread, stopped after the test, however it ended; the
    engine (shared by the module) is idle and consistent after it."""
    rn = RunningNode(node_config("stopper", free_ports(2)), engine)
    _poll(lambda: engine.deliver is not run_calls, "the worker never took the engine's delivery")
    try:
        yield rn
    finally:
        if rn.thread.is_alive():
            rn.stop()
        engine.deliver = run_calls
        engine.max_running = engine.n_slots
        _poll(lambda: engine.running() == 0 and engine.waiting() == 0, "engine still busy")
        assert engine.check_consistency() == []
        engine.clear()


def _story(rid: str) -> P.Generate:
    """A long streamed request (STORY, LONG tokens): still running when the node stops."""
    return P.Generate(
        request_id=rid,
        prompt=STORY,
        params=P.SamplingParams(max_tokens=LONG, temperature=0.0),
        deadline=time.time() + 600,
        stream=True,
    )


async def _streaming(rc: RawClient, ep: str, rid: str, chunks: int, what: str) -> None:
    """Send `_story` as ``rid``; return once ``chunks`` of its text came back: it runs,
    far from its end."""
    await rc.send(ep, _story(rid))
    give_up = time.monotonic() + WAIT_S
    while rc.tally.chunks[rid] < chunks:
        assert time.monotonic() < give_up, what
        await asyncio.sleep(0.01)


def _poll(fact: Callable[[], object], what: str) -> None:
    give_up = time.monotonic() + WAIT_S
    while not fact():
        assert time.monotonic() < give_up, what
        time.sleep(0.01)


def _on_loop(rn: RunningNode, fn: Callable[[], Any]) -> Any:
    """``fn()`` on the node's loop (where the node's parts live), its result here."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), rn.loop).result(WAIT_S)


def _job(node: Node, rid: str, pull: asyncio.Task[Any]) -> Job:
    """A local job whose KV pull is ``pull`` (built on the node's loop)."""
    msg = _story(rid)
    req = RequestContext.build(
        node.engine,
        msg,
        [b"nobody"],  # the ROUTER drops replies to an unknown peer
        b"test",
        None,
        node.context.namespace(msg.tenant),
        node.engine.tokenize(STORY),
        time.time(),
    )
    return Job(
        req=req, route_reason="pulled", route_path=["stopper"], kv_pull=pull, pulled_from="peer"
    )


def test_a_stop_during_an_import_then_submit_cancels_what_it_submitted(
    engine: Engine, running: RunningNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stop cancels the job's task while its import runs on the engine thread, so
    the task never learns the handle; the import's own turn must see the stop and
    cancel what it submitted (review F3), or the request decodes on unowned."""
    node = running.node
    importing, go = threading.Event(), threading.Event()

    def load(state: Any, tenant: str) -> Imported:
        importing.set()  # on the engine thread, between two steps
        assert go.wait(WAIT_S)
        return Imported(state, 0, 0.0)

    monkeypatch.setattr(node.kv, "load", load)
    submitted: list[Handle] = []
    real_submit = engine.submit

    def submit(*args: Any, **kwargs: Any) -> Handle:
        submitted.append(real_submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", submit)

    def enqueue() -> None:
        async def pulled() -> object:
            return object()  # the "state": load above takes anything

        assert node.worker.enqueue(_job(node, "f3", asyncio.ensure_future(pulled())))

    try:
        _on_loop(running, enqueue)
        assert importing.wait(WAIT_S), "the job never reached its import"
        running.loop.call_soon_threadsafe(node.stop)
        _poll(lambda: node.worker._stopping, "the node never began to stop")
    finally:
        go.set()
    running.stop()
    _poll(lambda: submitted, "the import's turn never submitted")  # on the engine thread
    (handle,) = submitted
    result = handle.result(WAIT_S)
    assert result.finish_reason == "cancelled", result
    assert result.completion_tokens < LONG


def test_text_delivered_after_the_stop_began_is_not_sent(
    engine: Engine, running: RunningNode
) -> None:
    """A step's pieces handed over as the node starts stopping reach the worker when
    it is already stopping: never answered here, like a node that dies (review F4)."""
    node = running.node
    sent_stopping: list[str] = []
    real_reply = node.transport.reply

    def reply(envelope: list[bytes], msg: P.Message) -> bool:
        if node.worker._stopping:
            sent_stopping.append(type(msg).__name__)
        return real_reply(envelope, msg)

    node.transport.reply = reply  # type: ignore[method-assign]
    worker_deliver = engine.deliver
    held = threading.Event()

    def deliver(calls: list[Callable[[], None]]) -> None:
        if not held.is_set():  # one step's pieces wait until the stop has begun
            held.set()
            _poll(lambda: node.worker._stopping, "the node never began to stop")
        worker_deliver(calls)

    async def main() -> None:
        async with RawClient([node.serve_addr]) as rc:
            await _streaming(rc, node.serve_addr, "f4", 2, "no text streamed")  # it runs
            engine.deliver = deliver
            give_up = time.monotonic() + WAIT_S
            while not held.is_set():
                assert time.monotonic() < give_up, "no step delivered"
                await asyncio.sleep(0.01)
            running.loop.call_soon_threadsafe(node.stop)

    asyncio.run(main())
    running.stop()
    assert held.is_set()
    assert sent_stopping == [], sent_stopping


def test_a_stopping_node_cancels_the_pull_of_a_job_still_queued(
    engine: Engine, running: RunningNode
) -> None:
    """One place, taken by a long request; a pulled job waits behind it with its pull
    under way. The stop frees the place, the queued job is handed out to a stopping
    worker, and its pull is cancelled (review F6), not left to finish unowned."""
    node = running.node
    engine.max_running = 1
    forever = asyncio.Event()
    pulls: list[asyncio.Task[Any]] = []

    def enqueue() -> None:
        async def never() -> object:
            await forever.wait()  # a pull whose holder never answers
            return object()

        pull = asyncio.ensure_future(never())
        pulls.append(pull)
        assert node.worker.enqueue(_job(node, "f6", pull))

    async def main() -> None:
        async with RawClient([node.serve_addr]) as rc:  # it holds the only place
            await _streaming(rc, node.serve_addr, "busy", 1, "the busy request never ran")

    asyncio.run(main())
    _on_loop(running, enqueue)
    assert _on_loop(running, lambda: len(node.load.queue)) == 1  # queued, not running
    running.stop()
    (pull,) = pulls
    assert pull.cancelled(), pull
