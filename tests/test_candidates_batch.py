"""The load model of a batching node (zmesh.candidates): its engine runs several
requests at once but prefills one prompt at a time, so a node with free places whose
prompts are still prefilling is not idle; and a forward it has not reported yet only
prefills ahead of the next request while a place stays free for that one."""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Sequence
from types import SimpleNamespace

import hypothesis.strategies as st
from hypothesis import given

from zmesh.candidates import (
    Work,
    backlog_s,
    batch_wait_s,
    free_places,
    local_candidate,
    unreported_s,
)
from zmesh.node.load import Job, Load
from zmesh.routing import Candidate, PolicyState, RouteRequest, RoutingSettings, decide

secs = st.floats(0.0, 50.0, allow_nan=False)
works = st.builds(lambda p, d: Work(p, p + d), secs, secs)
# In the order they got their places: the longest running first.
running_jobs = st.lists(st.tuples(st.floats(0.0, 100.0, allow_nan=False), works), max_size=6).map(
    lambda js: sorted(js, key=lambda j: -j[0])
)


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)


def place_wait_s(queued_s: Sequence[float], running_left_s: Sequence[float], places: int) -> float:
    """The reference the batching wait must reduce to when prompts take no time to
    prefill: only places count. Each waiting request takes the first place to free,
    the new one the next (``running_left_s``: what is left of each running request).
    The node's load model before prompts' serial prefills were modelled."""
    if len(running_left_s) < places and not queued_s:
        return 0.0  # a place is free and nobody waits for it
    free = [max(t, 0.0) for t in running_left_s] + [0.0] * max(places - len(running_left_s), 0)
    heapq.heapify(free)
    for cost in queued_s:
        heapq.heappush(free, heapq.heappop(free) + cost)
    return free[0]


def test_the_place_model() -> None:
    assert place_wait_s([], [5.0, 3.0], 3) == 0.0  # a free place, nobody waiting
    assert place_wait_s([], [5.0, 3.0, 4.0], 3) == 3.0  # every place busy: the first to free
    # Waiting requests take the places as they free: 3 -> 3+2=5, 4 -> 4+1=5, then the
    # new one gets the next (5.0, of three at 5).
    assert place_wait_s([2.0, 1.0], [5.0, 3.0, 4.0], 3) == 5.0
    assert place_wait_s([2.0, 1.0], [], 2) == 1.0  # nothing runs, requests wait: them first


@given(queued=st.lists(works, max_size=8), running=st.one_of(st.none(), works), elapsed=secs)
def test_one_place_is_one_at_a_time(
    queued: list[Work], running: Work | None, elapsed: float
) -> None:
    # One place: the queue's services plus what is left of the running one's, as the
    # one-at-a-time model (and the simulator's nodes) always had it.
    run = [] if running is None else [(elapsed, running)]
    old = backlog_s(
        sum(w.service_s for w in queued), None if running is None else running.service_s, elapsed
    )
    assert close(batch_wait_s(run, queued, 1), old)


@given(running=running_jobs, queued=st.lists(works, max_size=8), places=st.integers(1, 6))
def test_without_prefill_it_is_the_place_model(
    running: list[tuple[float, Work]], queued: list[Work], places: int
) -> None:
    # Prompts that take no time to prefill: only the places count (place_wait_s).
    run = [(e, Work(0.0, w.service_s)) for e, w in running]
    left = [w.service_s - e for e, w in run]
    want = place_wait_s([w.service_s for w in queued], left, places)
    assert close(batch_wait_s(run, [Work(0.0, w.service_s) for w in queued], places), want)


@given(running=running_jobs, queued=st.lists(works, max_size=8), places=st.integers(1, 6))
def test_bounds(running: list[tuple[float, Work]], queued: list[Work], places: int) -> None:
    w = batch_wait_s(running, queued, places)
    left = [wk.service_s - e for e, wk in running]
    # Never sooner than a place frees (serial prefills only delay), never later than
    # everything one after another, never negative; more places never make it later.
    assert w >= place_wait_s([q.service_s for q in queued], left, places) - 1e-9
    everything = sum(wk.service_s for _, wk in running) + sum(q.service_s for q in queued)
    assert 0.0 <= w <= everything + 1e-9
    assert batch_wait_s(running, queued, places + 1) <= w + 1e-9


def test_prompts_prefill_one_at_a_time() -> None:
    cold = Work(1.5, 1.6)  # a cold 750-token prompt, 4-token answer
    # Three places, one taken by a prompt 0.5 s into its 1.5 s prefill: a place is
    # free, but a new request prefills after it (place_wait_s: 0, start now).
    assert place_wait_s([], [1.1], 3) == 0.0
    assert close(batch_wait_s([(0.5, cold)], [], 3), 1.0)
    # Two admitted together: the second prefills after the first (1.5 + 1.5 - 0.5).
    assert close(batch_wait_s([(0.5, cold), (0.5, cold)], [], 3), 2.5)
    # Prefilled and decoding: nothing ahead.
    assert batch_wait_s([(1.55, cold)], [], 3) == 0.0
    # Every place taken: one frees at 0.05 s, but the second prompt, which waited for
    # the first (until -0.05), prefills until 1.45.
    assert close(batch_wait_s([(1.55, cold), (0.5, cold)], [], 2), 1.45)
    # Waiting for a place is the later part: one place, 1.6 s services.
    assert close(batch_wait_s([(0.5, cold)], [cold], 1), 1.1 + 1.6)


class _Engine:
    """What `Load` reads of an engine."""

    def __init__(self, max_running: int) -> None:
        self.max_running = max_running
        self.n_slots = 3
        self.stats = SimpleNamespace(
            prefill_s_per_token=0.002, decode_s_per_token=0.015, completion_tokens=4.0
        )


def _job(rid: str, new_tokens: int, load: Load) -> Job:
    req = SimpleNamespace(key=(b"", rid))
    return Job(
        req=req,  # type: ignore[arg-type]
        route_reason="local_best",
        route_path=[],
        predicted_s=load.predict_s(new_tokens, 4),
        prefill_s=load.predict_prefill_s(new_tokens),
    )


def test_a_node_with_a_prompt_prefilling_is_not_idle() -> None:
    # The routing log of `zmesh bench gateway --workloads shared` (3 nodes x 3 places,
    # 3 in flight): a node running one cold prefill advertised wait 0, as idle, since a
    # place was free. Its engine prefills one prompt at a time: a new one waits.
    load = _started(max_running=3)
    assert 1.4 < load.backlog_s() <= 1.5  # 750 x 0.002 s, less the time since it started
    # One at a time (max_running 1): the whole service, as before.
    assert _started(max_running=1).backlog_s() > 1.5


def _started(max_running: int) -> Load:
    """A node's load with one cold 750-token request just given its place."""
    load = Load(8, _Engine(max_running))  # type: ignore[arg-type]
    load.put(_job("cold", 750, load))
    asyncio.run(load.next())
    return load


def _decide(local_wait: float, peer_wait: float) -> tuple[str, str]:
    # Both miss the prompt (cold); same rates. Where does it go?
    local = local_candidate("a", 0, 1, local_wait, 0.002, 1.6)
    peer = Candidate("b", False, 0, 0, 0.001, 0.002, 1.6, wait_s=peer_wait)
    d = decide(RouteRequest(750, 0, 0), [local, peer], RoutingSettings(), PolicyState())
    return d.target, d.reason


def test_the_idle_peer_gets_the_prompt_the_busy_node_would_queue() -> None:
    ahead = batch_wait_s([(0.1, Work(1.5, 1.6))], [], 3)
    assert _decide(ahead, 0.0) == ("b", "load")
    assert _decide(0.0, 0.0) == ("a", "local_best")


def test_unreported_forwards_to_a_peer_with_free_places_only_prefill_ahead() -> None:
    sent = [(1.0, 1.6, 1.5), (2.0, 0.2, 0.1)]  # (sent_at, cost_s, prefill_s)
    # Heard at 0.5 with 0 of 3 places taken: both took places, one is left for ours.
    assert close(unreported_s(sent, 0.5, free_places(3, 0)), 1.6)
    # Heard with 1 of 3 taken: ours would wait for a place, so their whole costs.
    assert close(unreported_s(sent, 0.5, free_places(3, 1)), 1.8)
    # A peer that did not say its places (0): one at a time, whole costs.
    assert free_places(0, 0) == 0
    assert close(unreported_s(sent, 0.5, free_places(0, 0)), 1.8)
    # Forwards given without their prefill count whole.
    assert close(unreported_s([(1.0, 1.6)], 0.5, 3), 1.6)


@given(
    sent=st.lists(st.tuples(secs, secs, secs), max_size=6),
    heard=st.one_of(st.none(), secs),
    depth=st.integers(0, 4),
)
def test_one_place_counts_whole_forwards(
    sent: Sequence[tuple[float, float, float]], heard: float | None, depth: int
) -> None:
    # A one-place peer (the simulator's): free places never change the sum.
    whole = unreported_s([(t, c) for t, c, _ in sent], heard)
    assert close(unreported_s(sent, heard, free_places(1, depth)), whole)
