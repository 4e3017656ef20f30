"""Holder-side admission of forwards (routing/admission.py): the bar, the check, the retry.

Times are powers of two so threshold edges compare exactly in floating point.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routekit import PREFILL, candidate

from zmesh.routing import (
    REASON_LOAD,
    REASON_PREFIX,
    REASON_REFUSED,
    REASONS,
    Candidate,
    Decision,
    PolicyState,
    RouteRequest,
    RoutingSettings,
    decide,
    estimate_s,
)
from zmesh.routing.admission import admission_bar, admit, after_refusal

S = RoutingSettings()
EVICTING = RoutingSettings(admit_evictions=True)
# Peers as (wait, matched tokens, link delay): a random mesh seen from the forwarder.
PEERS = st.lists(
    st.tuples(st.floats(0, 64), st.integers(0, 2048), st.floats(0, 0.25)), min_size=1, max_size=6
)


cand = candidate


def req(prompt: int = 1024) -> RouteRequest:
    return RouteRequest(prompt_tokens=prompt, hops=0, head_key=0)


def forward(target: str, est_local: float, est_target: float) -> Decision:
    return Decision(target, True, REASON_PREFIX, (), est_local, est_target)


# ---- the bar ----------------------------------------------------------------------------


def test_bar_is_what_the_forwarder_still_prefers() -> None:
    s = RoutingSettings()
    assert admission_bar(forward("b", 2.0, 0.5), s) == 2.0  # its own estimate
    # Placement may pick a peer a little slower than here: the bar is then the peer's.
    assert admission_bar(forward("b", 1.0, 1.0625), s) == 1.0625
    slack = RoutingSettings(admit_slack_frac=0.5, admit_slack_s=0.25)
    assert admission_bar(forward("b", 2.0, 0.5), slack) == 2.0 * 1.5 + 0.25


def test_no_bar_when_admission_is_off_or_nothing_is_forwarded() -> None:
    assert admission_bar(forward("b", 2.0, 0.5), RoutingSettings(admission=False)) is None
    here = Decision("a", False, "local_best", (), 1.0, 1.0)
    assert admission_bar(here, RoutingSettings()) is None


@pytest.mark.parametrize(
    "kw",
    [{"admit_retries": -1}, {"admit_slack_frac": -0.1}, {"admit_slack_s": -1.0}],
)
def test_admission_settings_are_validated(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(kw))):
        RoutingSettings(**kw)  # type: ignore[arg-type]


def test_refused_is_a_reason() -> None:
    assert REASON_REFUSED == "refused" and REASON_REFUSED in REASONS


# ---- the holder's check -------------------------------------------------------------------


def test_holder_admits_up_to_the_bar_and_refuses_past_it() -> None:
    me = cand("h", local=True, matched=768, wait=1.0)  # 1 s backlog + 256 tokens: 1.25 s
    assert admit(me, 1024, 1.25, S) == (True, 1.25)
    assert admit(me, 1024, 1.0, S) == (False, 1.25)
    assert admit(me, 1024, None, S) == (True, 1.25)  # no bar: always admitted


def test_holder_estimate_leaves_out_the_link_both_sides_pay() -> None:
    me = cand("h", local=True, matched=1024, wait=0.5, link=0.25)
    assert admit(me, 1024, 0.5, S) == (True, 0.5)


@settings(max_examples=300)
@given(
    local_wait=st.floats(0, 64),
    local_match=st.integers(0, 2048),
    peers=PEERS,
    prompt=st.integers(1, 2048),
    slack=st.floats(0, 1),
)
def test_a_forward_decided_on_an_exact_picture_is_admitted(
    local_wait: float,
    local_match: int,
    peers: list[tuple[float, int, float]],
    prompt: int,
    slack: float,
) -> None:
    # When the forwarder's picture of the peer is the peer's own, the peer never refuses:
    # refusals only ever come from what the forwarder could not know.
    s = RoutingSettings(admit_slack_frac=slack)
    cands = [cand("a", local=True, matched=local_match, wait=local_wait)]
    cands += [cand(f"p{i}", matched=m, wait=w, link=d) for i, (w, m, d) in enumerate(peers)]
    d = decide(RouteRequest(prompt, 0, 0), cands, s, PolicyState.seeded(0))
    if not d.forward:
        return
    target = next(c for c in cands if c.node_id == d.target)
    itself = replace(target, is_local=True, link_delay_s=0.0)
    assert admit(itself, prompt, admission_bar(d, s), s)[0]


@given(wait=st.floats(0, 1e3), bar=st.floats(0, 1e3), matched=st.integers(0, 4096))
def test_admission_is_exactly_the_estimate_against_the_bar(
    wait: float, bar: float, matched: int
) -> None:
    me = cand("h", local=True, matched=matched, wait=wait)
    ok, est = admit(me, 2048, bar, S)
    assert est == estimate_s(me, 2048)
    assert ok == (est <= bar)


# ---- evictions (admit_evictions) ----------------------------------------------------------


def test_evictions_count_only_when_switched_on() -> None:
    me = cand("h", local=True, matched=768, wait=1.0)  # 1.25 s, as above
    # Serving here would overwrite 512 cached tokens: half a second to prefill again.
    assert admit(me, 1024, 1.5, S, evict_tokens=512) == (True, 1.25)
    assert admit(me, 1024, 1.5, EVICTING, evict_tokens=512) == (False, 1.75)
    assert admit(me, 1024, 1.75, EVICTING, evict_tokens=512) == (True, 1.75)
    assert admit(me, 1024, 1.5, EVICTING) == (True, 1.25)  # nothing evicted
    d = forward("b", 2.0, 0.5)
    assert admission_bar(d, S, evict_s=0.5) == 2.0
    assert admission_bar(d, EVICTING, evict_s=0.5) == 2.5
    # The forwarder's eviction raises its own estimate, not the peer's it may be under.
    assert admission_bar(forward("b", 1.0, 2.0), EVICTING, evict_s=0.5) == 2.0
    assert admission_bar(d, RoutingSettings(admission=False, admit_evictions=True), 0.5) is None


@settings(max_examples=300)
@given(
    local_wait=st.floats(0, 64),
    local_match=st.integers(0, 2048),
    local_evict=st.integers(0, 4096),
    peers=PEERS,
    prompt=st.integers(1, 2048),
)
def test_an_exact_picture_and_a_peer_that_evicts_nothing_is_admitted(
    local_wait: float,
    local_match: int,
    local_evict: int,
    peers: list[tuple[float, int, float]],
    prompt: int,
) -> None:
    # The forwarder's own eviction only raises the bar: refusals still come only from
    # what it could not know (here: the peer's evictions, none).
    cands = [cand("a", local=True, matched=local_match, wait=local_wait)]
    cands += [cand(f"p{i}", matched=m, wait=w, link=d) for i, (w, m, d) in enumerate(peers)]
    d = decide(RouteRequest(prompt, 0, 0), cands, EVICTING, PolicyState.seeded(0))
    if not d.forward:
        return
    target = next(c for c in cands if c.node_id == d.target)
    itself = replace(target, is_local=True, link_delay_s=0.0)
    bar = admission_bar(d, EVICTING, local_evict * PREFILL)
    assert bar is not None and bar >= admission_bar(d, S)  # type: ignore[operator]
    assert admit(itself, prompt, bar, EVICTING, evict_tokens=0)[0]


@given(wait=st.floats(0, 1e3), bar=st.floats(0, 1e3), evict=st.integers(0, 8192), on=st.booleans())
def test_admission_is_the_estimate_plus_what_it_evicts_against_the_bar(
    wait: float, bar: float, evict: int, on: bool
) -> None:
    me = cand("h", local=True, matched=512, wait=wait)
    ok, est = admit(me, 2048, bar, RoutingSettings(admit_evictions=on), evict_tokens=evict)
    assert est == estimate_s(me, 2048) + (evict * PREFILL if on else 0.0)
    assert ok == (est <= bar)


# ---- after a refusal ----------------------------------------------------------------------


def mesh() -> list[Candidate]:
    """Here: cold and idle (1 s). h1 holds all (0 s); h2 most (0.25 s); c: cold (1 s)."""
    return [
        cand("a", local=True),
        cand("h1", matched=1024),
        cand("h2", matched=768),
        cand("c"),
    ]


def test_runner_up_after_one_refusal_then_here() -> None:
    s, state = RoutingSettings(), PolicyState.seeded(0)
    first = decide(req(), mesh(), s, state)
    assert (first.target, first.forward) == ("h1", True)
    second = after_refusal(req(), mesh(), ["h1"], s, state)
    assert (second.target, second.forward, second.reason) == ("h2", True, REASON_PREFIX)
    third = after_refusal(req(), mesh(), ["h1", "h2"], s, state)
    assert (third.target, third.forward, third.reason) == ("a", False, REASON_REFUSED)
    assert third.est_target_s == third.est_local_s == 1.0


def test_no_retries_serves_a_refused_request_here() -> None:
    s = RoutingSettings(admit_retries=0)
    d = after_refusal(req(), mesh(), ["h1"], s, PolicyState.seeded(0))
    assert (d.target, d.forward, d.reason) == ("a", False, REASON_REFUSED)


def test_no_peer_worth_it_after_a_refusal_is_served_here() -> None:
    cands = [cand("a", local=True), cand("h1", matched=1024), cand("c")]
    d = after_refusal(req(), cands, ["h1"], RoutingSettings(), PolicyState.seeded(0))
    assert (d.target, d.forward, d.reason) == ("a", False, REASON_REFUSED)


def test_runner_up_may_be_chosen_by_load() -> None:
    cands = [cand("a", local=True, wait=4.0), cand("h1", matched=1024), cand("c")]
    d = after_refusal(req(), cands, ["h1"], RoutingSettings(), PolicyState.seeded(0))
    assert (d.target, d.forward, d.reason) == ("c", True, REASON_LOAD)


def test_after_refusal_needs_a_local_candidate() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        after_refusal(req(), [cand("h1")], ["h1"], RoutingSettings(), PolicyState.seeded(0))


@settings(max_examples=200)
@given(
    peers=st.lists(st.tuples(st.floats(0, 8), st.integers(0, 1024)), min_size=1, max_size=6),
    refused=st.sets(st.integers(0, 5)),
    retries=st.integers(0, 3),
    local_wait=st.floats(0, 8),
)
def test_a_peer_that_refused_is_never_asked_again(
    peers: list[tuple[float, int]], refused: set[int], retries: int, local_wait: float
) -> None:
    s = RoutingSettings(admit_retries=retries)
    cands = [cand("a", local=True, wait=local_wait)]
    cands += [cand(f"p{i}", matched=m, wait=w) for i, (w, m) in enumerate(peers)]
    names = [f"p{i}" for i in sorted(refused) if i < len(peers)]
    d = after_refusal(req(), cands, names, s, PolicyState.seeded(0))
    assert d.target not in names
    if len(names) > retries:
        assert not d.forward
    if not d.forward:
        assert d.reason == REASON_REFUSED and d.target == "a"
