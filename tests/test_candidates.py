"""zmesh.candidates: the pure model of a node's candidates shared by node and simulator."""

from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import given, settings

from zmesh.candidates import (
    PeerRow,
    backlog_s,
    borrowed_rate,
    contenders,
    head_key,
    local_candidate,
    predict_s,
    row_estimate_s,
    unreported_s,
)
from zmesh.routing import Candidate, PolicyState, RouteRequest, RoutingSettings, decide, estimate_s


def test_head_key_is_the_block_ending_the_head_or_a_hash_of_a_short_prompt() -> None:
    ids = [11, 22, 33, 44, 55]
    assert head_key(ids, list(range(80)), 16, 64) == 44  # block 4 ends at token 64
    assert head_key(ids[:2], list(range(40)), 16, 64) == 22  # the last full block
    assert head_key(ids, list(range(80)), 16, 1) == 11
    # Shorter than one block: the node's own key (a hash of the tokens), not 0.
    short = [5, 6, 7]
    assert head_key([], short, 16, 64) == hash((5, 6, 7)) & (2**64 - 1)
    assert head_key([], short, 16, 64) != head_key([], [5, 6, 8], 16, 64)


@given(
    new=st.integers(-5, 5000),
    max_tokens=st.integers(0, 2048),
    prefill=st.sampled_from([0.0, 1e-4, 0.002]),
    decode=st.sampled_from([0.0, 0.015, 0.05]),
    completion=st.sampled_from([0.0, 1.0, 37.5, 4000.0]),
)
def test_predict_s_is_prefill_plus_the_expected_answer(
    new: int, max_tokens: int, prefill: float, decode: float, completion: float
) -> None:
    # The rule the engine's statistics used to apply themselves (now only here): at
    # least one new token (the last prompt token's logits), answers as long as twice
    # the measured average but never past max_tokens (all of it while unmeasured).
    expect = min(max_tokens, 2 * completion) if completion else max_tokens
    want = max(new, 1) * (prefill or 0.002) + expect * (decode or 0.015)
    assert predict_s(new, max_tokens, prefill or 0.002, decode or 0.015, completion) == want


def test_load_model() -> None:
    assert backlog_s(2.0, None, 9.0) == 2.0
    assert backlog_s(2.0, 1.5, 0.5) == 3.0
    assert backlog_s(2.0, 1.5, 7.0) == 2.0  # an overdue request counts as about done
    sent = [(1.0, 0.5), (3.0, 0.25), (4.0, 0.125)]
    assert unreported_s(sent, None) == 0.875
    assert unreported_s(sent, 3.0) == 0.125  # heard at 3.0: only what was sent after
    assert unreported_s([], 1.0) == 0.0


def test_borrowed_rate() -> None:
    assert borrowed_rate([], 0.002) == 0.002
    assert borrowed_rate([0.003, 0.0], 0.002) == 0.002  # one measured peer is not enough
    assert borrowed_rate([0.003, 0.001, 0.004], 0.002) == 0.003  # the median
    assert borrowed_rate([1.0, 1.0], 0.002) == 0.02  # within 10x of the default


BS = 16


@st.composite
def pools(draw: st.DrawFn) -> tuple[int, Candidate, list[Candidate]]:
    prompt = draw(st.integers(1, 400))
    # Few match lengths, so that several peers tie on the longest (placement's case).
    blocks = st.integers(0, min(3, prompt // BS + 1))
    waits = st.sampled_from([0.0, 0.01, 0.2, 1.0, 5.0])
    local = local_candidate(
        "n00", draw(blocks) * BS, draw(st.integers(0, 12)), draw(waits), 0.002, 0.3
    )
    peers = [
        Candidate(
            f"n{k:02d}",
            False,
            draw(blocks) * BS,
            draw(st.integers(0, 12)),
            draw(st.sampled_from([0.0, 0.001, 0.05])),
            draw(st.sampled_from([0.001, 0.002])),
            0.3,
            True,
            draw(waits),
        )
        for k in range(1, draw(st.integers(1, 12)))
    ]
    return prompt, local, peers


knobs = st.builds(
    RoutingSettings,
    balance_abs=st.integers(0, 6),
    balance_rel=st.sampled_from([1.0, 1.5]),
    place_slack_frac=st.sampled_from([0.0, 0.1, 0.5]),
    give_up_s=st.sampled_from([0.0, 0.5, 2.0]),
    min_gain_frac=st.sampled_from([0.0, 0.1]),
)


@settings(max_examples=400, deadline=None)
@given(pools(), knobs, st.lists(st.integers(0, 2**64 - 1), min_size=26, max_size=26))
def test_contenders_decide_like_every_peer(
    pool: tuple[int, Candidate, list[Candidate]], s: RoutingSettings, ids: list[int]
) -> None:
    prompt, local, peers = pool
    rows = []
    for c in peers:
        missing = prompt - min(c.matched_tokens, prompt)
        assert c.wait_s is not None
        est = row_estimate_s(c.link_delay_s, c.wait_s, missing, c.prefill_s_per_token)
        assert est == estimate_s(c, prompt)
        rows.append(
            PeerRow(
                c.matched_tokens // BS,
                c.queue_depth,
                est,
                c.node_id,
                c,
                c.wait_s,
                c.link_delay_s,
                c.prefill_s_per_token,
            )
        )
    kept = [row.ref for row in contenders(rows, local, prompt, s)]
    assert len(kept) <= len(peers)
    req = RouteRequest(prompt, 0, 0, block_ids=ids[: prompt // BS], block_size=BS)
    full = decide(req, [local, *peers], s, PolicyState())
    pruned = decide(req, [local, *kept], s, PolicyState())  # type: ignore[list-item]
    assert (pruned.target, pruned.reason) == (full.target, full.reason)
