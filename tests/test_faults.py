"""Fault injection: partitions, link delay and kill -9 on a real 3-node lab.

Unit tests of zmesh/faults.py first (fast); then `slow` tests on real node processes
with the real model, faults switched at run time through each node's control file.
Every request is counted by id on the wire (meshkit.RawClient), so a lost request or
one answered twice is seen. Run with -s to see the counts each test prints.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from meshkit import RawClient, Tally, generate, keep_busy, log_events, more_answers, started

from zmesh import protocol as P
from zmesh.client import Client
from zmesh.faults import DelayLine, FaultControl, FaultError, parse_faults
from zmesh.lab import Lab

ENGINE = {"n_slots": 3, "slot_ctx": 1024, "n_threads": 1}
# Pings 4x as often as the default, so the measured link delay follows a change fast.
GOSSIP = {"ping_interval_s": 0.25}
DEADLINE_S = 10.0
TOPICS = ["geology", "astronomy", "botany"]


def few_shot(topic: str) -> str:
    return f"The following are multiple choice questions about {topic}.\n\n" + "".join(
        f"Question {i}: Which of these, case {i}, belongs to {topic}? A. One B. Two "
        f"C. Three D. Four\nAnswer: A\n\n"
        for i in range(10)
    )


PROMPTS = [
    few_shot(t) + f"Question {j}: What is {t} number {j}?\nAnswer:"
    for t in TOPICS
    for j in range(4)
]


# ---- zmesh/faults.py --------------------------------------------------------------------


def test_control_file_values_override_the_config_until_removed(tmp_path: Path) -> None:
    base = P.FaultSettings(delay_ms=5.0, drop_deltas=0.1)
    path = tmp_path / "faults.json"
    ctl = FaultControl(base, str(path))
    assert ctl.poll() is None and ctl.current == base  # no file: the config's values
    path.write_text('{"partition": ["node-b"], "delay_ms": 80}')
    new, source = ctl.poll() or (None, None)
    assert new == P.FaultSettings(delay_ms=80.0, partition=["node-b"], drop_deltas=0.1)
    assert source == str(path)
    assert ctl.poll() is None  # unchanged file: nothing to do
    path.write_text('{"delay_ms": -3}')
    with pytest.raises(FaultError, match="delay_ms"):
        ctl.poll()
    assert ctl.current == new and ctl.poll() is None  # a bad file keeps the faults, once
    path.unlink()
    assert ctl.poll() == (base, "config")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[1, 2]", "JSON object"),
        ("{not json", "not JSON"),
        ('{"delay": 5}', "unknown keys"),
        ('{"partition": "node-b"}', "array"),
        ('{"partition": ["bad id"]}', "node id"),
        ('{"drop_deltas": 2}', "0..1"),
        ('{"delay_ms": 1e9}', "0..60000"),
    ],
)
def test_bad_control_files_are_refused_with_the_key(text: str, fragment: str) -> None:
    with pytest.raises(FaultError, match=fragment):
        parse_faults(text.encode(), P.FaultSettings())


def test_delay_line_holds_frames_in_order_without_blocking() -> None:
    async def main() -> None:
        sent: list[tuple[float, bytes]] = []
        line = DelayLine(lambda _sock, frames: sent.append((time.monotonic(), frames[0])) or True)
        task = asyncio.create_task(line.run())
        t0 = time.monotonic()
        assert line.push(None, [b"1"], 0.10)
        assert line.push(None, [b"2"], 0.0)  # a shorter delay never overtakes
        assert sent == []  # push only queues: nothing waited for the delay to pass
        give_up = time.monotonic() + 10
        while len(sent) < 2 and time.monotonic() < give_up:  # both frames out
            await asyncio.sleep(0.01)
        task.cancel()
        assert [f for _, f in sent] == [b"1", b"2"]
        assert all(t - t0 >= 0.09 for t, _ in sent)
        full = DelayLine(lambda *_: True, limit=1)
        assert full.push(None, [b"a"], 1.0) and not full.push(None, [b"b"], 1.0)

    asyncio.run(main())


# ---- a real lab -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(n_nodes=3, engine=ENGINE, gossip=GOSSIP, workdir=tmp_path_factory.mktemp("faults"))
    with started(lab, timeout=90):
        yield lab


def reset_faults(lab: Lab) -> None:
    """Back to no faults on every running node, and a converged mesh."""
    for i in range(lab.n_nodes):
        lab.set_faults(i, delay_ms=0.0, partition=[])
    asyncio.run(lab.wait_faults())
    asyncio.run(lab.wait_converged(timeout=60))


def check_answers(tally: Tally, allowed_errors: set[str]) -> None:
    """Every request answered exactly once, with a real answer or a clear error, in time."""
    assert tally.lost == [], f"lost: {tally.lost[:5]}"
    assert tally.twice == [], f"answered twice: {tally.twice[:5]}"
    for rid, finals in tally.finals.items():
        reply = finals[0]
        if isinstance(reply, P.Done):
            assert reply.completion_tokens >= 1 and (reply.text.strip() or reply.finish_reason)
        else:
            assert reply.code in allowed_errors, (rid, reply)
        assert tally.latency_s[rid] < DEADLINE_S + 1.0, (rid, tally.latency_s[rid])


def report(name: str, tally: Tally, faults: int, **extra: object) -> None:
    done = tally.done()
    fields = {
        "faults": faults,
        "requests": len(tally.sent),
        "done": len(done),
        "errors": dict(tally.errors()),
        "lost": len(tally.lost),
        "twice": len(tally.twice),
        "forwarded": sum(d.hops > 0 for d in done),
        "fallback": sum(d.route_reason == "fallback" for d in done),
        **extra,
    }
    print(f"\nFAULTS {name}: " + ", ".join(f"{k}={v}" for k, v in fields.items()))


async def all_alive(lab: Lab, timeout: float) -> float:
    """Seconds until every node sees every other alive (estimates may still differ)."""
    t0 = time.monotonic()
    want = {n.name for n in lab.nodes}
    while True:
        sts = await lab.statuses()
        if all(
            {p.node_id for p in st.peers if p.state == "alive"} == want - {st.node_id} for st in sts
        ):
            return time.monotonic() - t0
        assert time.monotonic() - t0 < timeout, "peers did not come back after heal"
        await asyncio.sleep(0.05)


async def cut_apart(lab: Lab, victim: str, timeout: float) -> list[P.Status]:
    """Statuses once the victim holds no peer alive and no peer holds it alive (each side
    has declared the other dead, or forgotten it)."""
    t0 = time.monotonic()
    while True:
        sts = await lab.statuses()
        if all(
            not any(
                p.state != "dead" and (st.node_id == victim or p.node_id == victim)
                for p in st.peers
            )
            for st in sts
        ):
            return sts
        assert time.monotonic() - t0 < timeout, "the partition was not noticed"
        await asyncio.sleep(0.05)


def prime(lab: Lab) -> None:
    """Each topic's prefix cached somewhere (placement picks where), seen by all."""
    with Client(lab.endpoints, timeout=60) as client:
        for i, topic in enumerate(TOPICS):
            client.generate(few_shot(topic) + "Prime.", max_tokens=1, endpoint=lab.endpoints[i])
    asyncio.run(lab.wait_converged(timeout=30))


@pytest.mark.slow
def test_partition_loses_no_request_and_the_mesh_reconverges_after_heal(lab: Lab) -> None:
    prime(lab)
    victim = lab.nodes[2].name

    async def main() -> tuple[Tally, list[P.Status], float]:
        stop = asyncio.Event()
        async with RawClient(lab.endpoints) as rc:
            flow = asyncio.create_task(
                keep_busy(rc, lab.endpoints, PROMPTS, stop, deadline_s=DEADLINE_S)
            )
            await more_answers(rc.tally, 6, timeout=DEADLINE_S + 10)  # traffic flows
            lab.partition(2)
            await lab.wait_faults()
            during = await cut_apart(lab, victim, timeout=60)
            t_heal = time.monotonic()
            lab.heal(2)
            await lab.wait_faults()
            alive_in = await all_alive(lab, timeout=15) + (time.monotonic() - t_heal)
            await more_answers(rc.tally, 6, timeout=DEADLINE_S + 10)  # and after the heal
            stop.set()
            await asyncio.wait_for(flow, DEADLINE_S + 10)
            await rc.drain()
            converged_in = await lab.wait_converged(timeout=60)
        return rc.tally, during, (alive_in, converged_in)

    try:
        tally, during, (alive_in, converged_in) = asyncio.run(main())
    finally:
        reset_faults(lab)
    check_answers(tally, {P.DEADLINE_EXCEEDED, P.OVERLOADED})
    assert len(tally.done()) >= len(tally.sent) * 0.9
    # While cut off, the victim saw no live peer and no live peer saw it...
    for st in during:
        alive = {p.node_id for p in st.peers if p.state == "alive"}
        assert (alive == set()) if st.node_id == victim else (victim not in alive), st
    assert during[2].counters.get("fault_dropped_in", 0) > 0
    # ...yet it answered the requests sent to it: served locally.
    served_by_victim = [d for d in tally.done() if d.served_by == victim]
    assert served_by_victim
    changed = sum(len(log_events(n.log_path, "fault.changed")) for n in lab.nodes)
    report(
        "partition",
        tally,
        faults=changed,
        all_alive_after_heal_s=round(alive_in, 2),
        converged_after_traffic_s=round(converged_in, 2),
    )


@pytest.mark.slow
def test_link_delay_is_measured_and_routing_still_answers_everything(lab: Lab) -> None:
    prime(lab)
    slow, delay_ms = 1, 80.0

    def link_delays(sts: list[P.Status]) -> dict[str, float]:
        """Each node's measured one-way delay to the slow node (and the slow node's own)."""
        name = lab.nodes[slow].name
        out = {st.node_id: p.link_delay_s for st in sts for p in st.peers if p.node_id == name}
        out[name] = max(p.link_delay_s for p in sts[slow].peers)
        return out

    async def main() -> tuple[Tally, dict[str, float], dict[str, float]]:
        stop = asyncio.Event()
        async with RawClient(lab.endpoints) as rc:
            before = link_delays(await lab.statuses())
            lab.set_delay(slow, delay_ms)
            await lab.wait_faults()
            flow = asyncio.create_task(
                keep_busy(rc, lab.endpoints, PROMPTS, stop, deadline_s=DEADLINE_S)
            )
            # The EWMA of ping round trips climbs toward delay_ms / 2 (one way).
            give_up = time.monotonic() + 15
            while True:
                after = link_delays(await lab.statuses())
                if min(after.values()) > delay_ms / 1000 / 4 or time.monotonic() > give_up:
                    break
                await asyncio.sleep(0.25)
            await more_answers(rc.tally, 6, timeout=DEADLINE_S + 10)  # traffic on the slow link
            stop.set()
            await asyncio.wait_for(flow, DEADLINE_S + 10)
            await rc.drain()
        return rc.tally, before, after

    try:
        tally, before, after = asyncio.run(main())
    finally:
        reset_faults(lab)
    check_answers(tally, {P.DEADLINE_EXCEEDED, P.OVERLOADED})
    assert len(tally.done()) == len(tally.sent)
    for node, seconds in after.items():
        assert seconds > delay_ms / 1000 / 4, (node, before, after)
        assert seconds > before[node] + 0.01, (node, before, after)
    report(
        "delay",
        tally,
        faults=1,
        delay_ms=delay_ms,
        link_delay_ms_before={k: round(v * 1000, 1) for k, v in before.items()},
        link_delay_ms_after={k: round(v * 1000, 1) for k, v in after.items()},
    )


@pytest.mark.slow
def test_kill_9_of_a_node_serving_forwards_loses_nothing_and_it_rejoins(lab: Lab) -> None:
    """Extends test_mesh's single-stream kill: many forwarded requests in flight on the
    victim, then its restart under a new epoch, then the mesh answers again."""
    topic = "volcanology"
    with Client(lab.endpoints, timeout=60) as client:
        primed = client.generate(few_shot(topic) + "Prime.", max_tokens=1)
    holder = next(i for i, n in enumerate(lab.nodes) if n.name == primed.served_by)
    entries = [n.serve for i, n in enumerate(lab.nodes) if i != holder]
    asyncio.run(lab.wait_converged(timeout=30))
    old_epoch = asyncio.run(lab.statuses([holder]))[0].epoch
    prompts = [few_shot(topic) + f"Question {j}: Count to fifty.\nAnswer:" for j in range(12)]

    async def main() -> tuple[Tally, int, float]:
        async with RawClient(lab.endpoints) as rc:
            waits = []
            for j, prompt in enumerate(prompts):
                msg = generate(rc.new_id("kill"), prompt, 24, DEADLINE_S)
                waits.append(await rc.send(entries[j % len(entries)], msg))
            # Kill once the victim is busy with forwarded work.
            give_up = time.monotonic() + 10
            busy = 0
            while busy == 0 and time.monotonic() < give_up:
                busy = (await lab.statuses([holder]))[0].inflight
                await asyncio.sleep(0.05)
            lab.kill_node(holder)
            await asyncio.wait_for(asyncio.gather(*(w.wait() for w in waits)), DEADLINE_S + 5)
            await rc.drain()
            lab.start_node(holder)
            rejoined_in = await lab.wait_converged(timeout=90)
            after = [
                await rc.ask(lab.endpoints[j % 3], generate(rc.new_id("after"), p, 2, 30), 35)
                for j, p in enumerate(prompts[:6])
            ]
            assert all(isinstance(a, P.Done) for a in after), after
        return rc.tally, busy, rejoined_in

    try:
        tally, busy, rejoined_in = asyncio.run(main())
    finally:
        lab.start_node(holder)  # whatever happened, the next test gets three nodes
    check_answers(tally, {P.DEADLINE_EXCEEDED, P.OVERLOADED})
    assert busy > 0, "the victim was killed before it had work"
    killed_on = [
        d for d in tally.done() if d.request_id.startswith("kill") and d.route_reason == "fallback"
    ]
    assert killed_on, "no request was in flight on the victim when it died"
    new_epoch = asyncio.run(lab.statuses([holder]))[0].epoch
    assert new_epoch != old_epoch
    sts = asyncio.run(lab.statuses())
    for st in sts:
        for p in st.peers:
            if p.node_id == lab.nodes[holder].name:
                assert p.epoch == new_epoch and p.state == "alive"
    report(
        "kill9",
        tally,
        faults=1,
        victim_inflight_at_kill=busy,
        fell_back=len(killed_on),
        rejoined_s=round(rejoined_in, 2),
    )
