"""Helpers shared by the hardening tests: an in-process node, a raw reply counter,
log and /proc readers. Real sockets and the real model throughout; no mocks."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.asyncio

from zmesh import protocol as P
from zmesh.config import EngineConfig, NodeConfig, config_from_dict
from zmesh.engine import Engine
from zmesh.lab import Lab, free_ports
from zmesh.node import Node


@contextlib.contextmanager
def started(lab: Lab, timeout: float = 120.0) -> Iterator[Lab]:
    """Start a lab, wait until its nodes agree, and stop it however the block ends."""
    lab.start()
    try:
        asyncio.run(lab.wait_converged(timeout=timeout))
        yield lab
    finally:
        lab.stop()


def node_config(node_id: str, ports: Sequence[int], **settings: object) -> NodeConfig:
    """A node serving on 127.0.0.1 ``ports[0]`` and gossiping on ``ports[1]``, with
    ``settings`` (any other NodeConfig keys) on top."""
    return config_from_dict(
        {
            "node_id": node_id,
            "serve_addr": f"tcp://127.0.0.1:{ports[0]}",
            "gossip_addr": f"tcp://127.0.0.1:{ports[1]}",
            **settings,
        }
    )


class RunningNode:
    """A Node on its own event-loop thread, as `zmesh node` runs it, minus the process.
    As a context manager: stopped on the way out, however the block ends."""

    def __init__(self, cfg: NodeConfig, engine: Engine) -> None:
        self.node = Node(cfg, engine=engine)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=self.loop.run_until_complete, args=(self.node.run(),), daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.node.ready.is_set():
            assert self.thread.is_alive(), "node exited during start"
            assert time.monotonic() < deadline, "node did not start"
            time.sleep(0.02)

    @property
    def serve_addr(self) -> str:
        return self.node.serve_addr

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.node.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    def __enter__(self) -> RunningNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Pair:
    """Two in-process nodes that seed each other."""

    a: RunningNode
    b: RunningNode
    a_serve: str
    b_serve: str


def pair_config(name: str, ports: list[int], peer_ports: list[int], routing: dict) -> NodeConfig:
    """One node of a `Pair`: seeded with the other, a peer that goes quiet stays
    "alive" for 30 s (tests that stop or delay a peer decide what happens before)."""
    return node_config(
        name,
        ports,
        seeds=[
            {
                "serve": f"tcp://127.0.0.1:{peer_ports[0]}",
                "gossip": f"tcp://127.0.0.1:{peer_ports[1]}",
            }
        ],
        routing=routing,
        gossip={"suspect_after_s": 30.0, "dead_after_s": 60.0},
    )


@contextlib.contextmanager
def running_pair(
    engine_config: EngineConfig,
    routing_a: dict,
    routing_b: dict,
    setup_b: Callable[[Engine], None] | None = None,
) -> Iterator[Pair]:
    """node-a and node-b, each with an engine of its own; both stopped and closed on
    the way out, also on failure."""
    pa, pb = free_ports(2), free_ports(2)
    ea, eb = Engine(engine_config), Engine(engine_config)
    if setup_b is not None:
        setup_b(eb)
    a: RunningNode | None = None
    b: RunningNode | None = None
    try:
        a = RunningNode(pair_config("node-a", pa, pb, routing_a), ea)
        b = RunningNode(pair_config("node-b", pb, pa, routing_b), eb)
        yield Pair(a, b, f"tcp://127.0.0.1:{pa[0]}", f"tcp://127.0.0.1:{pb[0]}")
    finally:
        for n in (b, a):
            if n is not None and n.thread.is_alive():
                n.stop()
        ea.close()
        eb.close()


async def until(check: Callable[[], object], what: str, budget_s: float = 120.0) -> None:
    """Poll ``check`` on the loop until it holds; fail with ``what`` after ``budget_s``."""
    give_up = time.monotonic() + budget_s
    while not check():
        assert time.monotonic() < give_up, what
        await asyncio.sleep(0.05)


def idle_heartbeat(
    node_id: str,
    serve: str,
    gossip: str,
    block_size: int,
    fingerprint: str,
    peers: Sequence[P.PeerInfo] = (),
) -> P.Heartbeat:
    """A valid heartbeat of an idle peer with nothing cached (epoch 1, seq 0)."""
    return P.Heartbeat(
        node_id=node_id,
        epoch=1,
        seq=0,
        sent_at=time.time(),
        serve_addr=serve,
        gossip_addr=gossip,
        queue_depth=0,
        busy_slots=0,
        n_slots=1,
        n_blocks=0,
        digest=0,
        prefill_s_per_token=0.0,
        service_s=0.0,
        block_size=block_size,
        model_fingerprint=fingerprint,
        peers=list(peers),
    )


def is_request(logged_id: object, rid: str) -> bool:
    """Whether a log line's request id is ``rid``: a forward travels as ``rid~<suffix>``
    (a fresh wire id per forward), so the peer logs it so."""
    return isinstance(logged_id, str) and logged_id.split("~")[0] == rid


def log_events(path: Path, event: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # llama.cpp may print plain lines too
        if rec.get("event") == event:
            out.append(rec)
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Tally:
    """Every final reply (Done or Error) seen per request id, with its latency."""

    sent: dict[str, float] = field(default_factory=dict)  # rid -> monotonic send time
    finals: dict[str, list[P.Done | P.Error]] = field(default_factory=lambda: defaultdict(list))
    latency_s: dict[str, float] = field(default_factory=dict)  # to the first final
    ttft_s: dict[str, float] = field(default_factory=dict)  # to the first chunk
    chunks: Counter[str] = field(default_factory=Counter)

    def record(self, msg: P.Message) -> None:
        rid = getattr(msg, "request_id", None) or ""
        if rid not in self.sent:
            return
        if isinstance(msg, P.Chunk):
            self.chunks[rid] += 1
            self.ttft_s.setdefault(rid, time.monotonic() - self.sent[rid])
        elif isinstance(msg, P.Done | P.Error):
            if not self.finals[rid]:
                self.latency_s[rid] = time.monotonic() - self.sent[rid]
            self.finals[rid].append(msg)

    @property
    def lost(self) -> list[str]:
        return [rid for rid in self.sent if not self.finals.get(rid)]

    @property
    def twice(self) -> list[str]:
        return [rid for rid, f in self.finals.items() if len(f) > 1]

    def first(self, rid: str) -> P.Done | P.Error | None:
        f = self.finals.get(rid)
        return f[0] if f else None

    def errors(self) -> Counter[str]:
        return Counter(f[0].code for f in self.finals.values() if isinstance(f[0], P.Error))

    def done(self) -> list[P.Done]:
        return [f[0] for f in self.finals.values() if isinstance(f[0], P.Done)]

    def answered(self) -> int:
        """Requests with a final reply so far."""
        return sum(1 for f in self.finals.values() if f)


class RawClient:
    """One DEALER per endpoint; counts every reply frame by request id, so a request
    answered twice is seen (the library client drops replies it no longer waits for).
    ``async with RawClient(...) as rc`` starts its readers and closes it on the way out."""

    _ids = itertools.count()

    def __init__(self, endpoints: Iterable[str], tally: Tally | None = None) -> None:
        self.ctx = zmq.asyncio.Context()
        self.tally = Tally() if tally is None else tally  # clients may share one
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks[ep] = s
        self._done: dict[str, asyncio.Event] = {}
        self._readers: list[asyncio.Task[None]] = []
        self._statuses: dict[str, asyncio.Future[P.Status]] = {}

    def start(self) -> None:
        self._readers = [asyncio.create_task(self._read(s)) for s in self.socks.values()]

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            msg = P.decode(await sock.recv())
            if isinstance(msg, P.Status):
                waiter = self._statuses.pop(msg.request_id, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
                continue
            self.tally.record(msg)
            ev = self._done.get(getattr(msg, "request_id", "") or "")
            if ev is not None and isinstance(msg, P.Done | P.Error):
                ev.set()

    def new_id(self, prefix: str = "r") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def send(self, endpoint: str, msg: P.Generate) -> asyncio.Event:
        self.tally.sent[msg.request_id] = time.monotonic()
        ev = self._done[msg.request_id] = asyncio.Event()
        await self.socks[endpoint].send(P.encode(msg))
        return ev

    async def ask(self, endpoint: str, msg: P.Generate, wait_s: float) -> P.Done | P.Error | None:
        """Send and wait for the first final reply (None if none came in `wait_s`)."""
        ev = await self.send(endpoint, msg)
        try:
            await asyncio.wait_for(ev.wait(), wait_s)
        except TimeoutError:
            return None
        return self.tally.first(msg.request_id)

    async def status(self, endpoint: str, wait_s: float = 30.0) -> P.Status:
        """The node's Status, asked over our own socket (after its earlier replies)."""
        rid = self.new_id(f"status-{endpoint}")
        waiter = self._statuses[rid] = asyncio.get_running_loop().create_future()
        await self.socks[endpoint].send(P.encode(P.StatusRequest(request_id=rid)))
        return await asyncio.wait_for(waiter, wait_s)

    async def drain(self, budget_s: float = 60.0, answer_s: float = 5.0) -> None:
        """Return once no node we talk to has a request in flight, so a late second
        answer would already be counted. Asked over our own sockets: ZeroMQ keeps order
        per connection, so every reply a node sent us before its Status has been read
        when that Status arrives. A node that does not answer in ``answer_s`` (killed,
        frozen) can send nothing more and is not waited for."""
        give_up = time.monotonic() + budget_s
        while True:
            busy = 0
            for ep, sock in self.socks.items():
                rid = self.new_id(f"drain-{ep}")
                waiter = self._statuses[rid] = asyncio.get_running_loop().create_future()
                await sock.send(P.encode(P.StatusRequest(request_id=rid)))
                try:
                    busy += (await asyncio.wait_for(waiter, answer_s)).inflight
                except TimeoutError:
                    self._statuses.pop(rid, None)
            if busy == 0:
                return
            assert time.monotonic() < give_up, f"{busy} requests still in flight after drain"
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        for t in self._readers:
            t.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        self.ctx.destroy(linger=0)

    async def __aenter__(self) -> RawClient:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def generate(rid: str, prompt: str, max_tokens: int, deadline_s: float | None = None) -> P.Generate:
    return P.Generate(
        request_id=rid,
        prompt=prompt,
        params=P.SamplingParams(max_tokens=max_tokens),
        deadline=None if deadline_s is None else time.time() + deadline_s,
        stream=False,
    )


async def keep_busy(
    rc: RawClient,
    endpoints: Sequence[str],
    prompts: Sequence[str],
    stop: asyncio.Event,
    *,
    concurrency: int = 6,
    max_tokens: int = 4,
    deadline_s: float = 10.0,
    prefix: str = "flow",
) -> int:
    """Keep ``concurrency`` requests in flight over the endpoints and prompts until
    ``stop`` is set; each waits at most its deadline plus 5 s. Returns how many were sent."""
    sent = 0

    async def worker(w: int) -> None:
        nonlocal sent
        i = w
        while not stop.is_set():
            ep, prompt = endpoints[i % len(endpoints)], prompts[i % len(prompts)]
            sent += 1
            msg = generate(rc.new_id(prefix), prompt, max_tokens, deadline_s)
            await rc.ask(ep, msg, deadline_s + 5)
            i += concurrency

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return sent


async def more_answers(tally: Tally, n: int, timeout: float) -> None:
    """Return once ``n`` more requests have their final reply than when called: traffic
    flowed through the mesh as it is now (rather than for a guessed time)."""
    want, give_up = tally.answered() + n, time.monotonic() + timeout
    while tally.answered() < want:
        assert time.monotonic() < give_up, f"{want - tally.answered()} answers missing"
        await asyncio.sleep(0.05)
