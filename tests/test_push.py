"""Holder push: the pure decision (`push_decision`) and the offered peer's answer
(`push_accept`), and the offer message's wire checks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmesh import protocol as P
from zmesh.config import ConfigError, RoutingConfig, config_from_dict
from zmesh.routing import Candidate, RoutingSettings, SettingError
from zmesh.routing.shipping import (
    ACCEPT,
    PUSH_IN_FLIGHT,
    PUSH_NO_GAIN,
    PUSH_NO_PEER,
    PUSH_NOT_HOT,
    PUSH_OFF,
    PUSH_OFFER,
    PUSH_RATE_LIMITED,
    PUSH_TOO_SHORT,
    REFUSE_HELD,
    REFUSE_NO_FREE_SLOT,
    REFUSE_OFF,
    push_accept,
    push_decision,
)

SHIP = 1 / 20_000  # 20k tokens shipped per second
ON = RoutingSettings(ship_push=True, ship_max_tokens=512)


def peer(
    name: str,
    *,
    matched: int = 0,
    wait: float = 0.0,
    link: float = 0.001,
    ship: float | None = SHIP,
    alive: bool = True,
) -> Candidate:
    return Candidate(
        name,
        False,
        matched,
        0,
        link,
        1 / 1024,
        0.1,
        alive=alive,
        wait_s=wait,
        ship_s_per_token=ship,
        ship_fixed_s=0.003,
    )


def test_a_busy_holder_offers_its_hot_prefix_to_the_idle_peer() -> None:
    d = push_decision(500, 4, 2.0, [peer("busy", wait=3.0), peer("idle")], ON)
    assert (d.why, d.to, d.tokens, d.queued) == (PUSH_OFFER, "idle", 500, 4)
    assert d.ship_s == pytest.approx(0.003 + 500 * SHIP)
    assert d.peer_s == pytest.approx(0.001 + d.ship_s)
    assert d.log_fields()["why"] == PUSH_OFFER


def test_the_offer_is_capped_at_what_a_state_can_carry() -> None:
    d = push_decision(600, 4, 2.0, [peer("idle")], ON)
    assert d.why == PUSH_OFFER and d.tokens == 512
    # The 88 tokens past the cap are prefilled at the peer: charged to it.
    assert d.peer_s == pytest.approx(0.001 + d.ship_s + 88 / 1024)
    # So a long prefix is not pushed where prefilling its tail costs the gain.
    assert push_decision(2512, 4, 2.0, [peer("idle")], ON).why == PUSH_NO_GAIN


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"settings": RoutingSettings()}, PUSH_OFF),
        ({"in_flight": True}, PUSH_IN_FLIGHT),
        ({"since_last_s": 0.5}, PUSH_RATE_LIMITED),
        ({"queued": 1}, PUSH_NOT_HOT),
        ({"held": 32}, PUSH_TOO_SHORT),
        ({"wait": 0.02}, PUSH_NO_GAIN),  # the holder is barely busy: the move costs more
        ({"peers": [peer("p", matched=500)]}, PUSH_NO_PEER),  # it holds it already
        ({"peers": [peer("p", ship=None)]}, PUSH_NO_PEER),  # cannot be pulled to
        ({"peers": [peer("p", alive=False)]}, PUSH_NO_PEER),
        ({"exclude": {"idle"}}, PUSH_NO_PEER),  # offered lately
        ({"full": {"idle"}}, PUSH_NO_PEER),  # no empty slot by its last heartbeat
        ({"peers": [peer("p", wait=1.9)]}, PUSH_NO_GAIN),  # the peer is as busy
    ],
)
def test_no_offer(kw: dict[str, object], why: str) -> None:
    settings = kw.pop("settings", ON)
    held, queued, wait = kw.pop("held", 500), kw.pop("queued", 4), kw.pop("wait", 2.0)
    peers = kw.pop("peers", [peer("idle")])
    d = push_decision(held, queued, wait, peers, settings, **kw)  # type: ignore[arg-type]
    assert d.why == why and d.to is None


def test_the_offer_is_whole_blocks() -> None:
    d = push_decision(483, 4, 2.0, [peer("idle")], ON, block_size=16)
    assert d.why == PUSH_OFFER and d.tokens == 480
    assert d.ship_s == pytest.approx(0.003 + 480 * SHIP)
    assert d.peer_s == pytest.approx(0.001 + d.ship_s + 3 / 1024)  # 3 held tokens left


def test_ties_go_to_the_lowest_node_id() -> None:
    d = push_decision(500, 4, 2.0, [peer("b"), peer("a")], ON)
    assert d.to == "a"


@given(
    held=st.integers(0, 4096),
    queued=st.integers(0, 20),
    wait=st.floats(0, 100),
    waits=st.lists(st.floats(0, 100), min_size=0, max_size=6),
    matches=st.lists(st.integers(0, 4096), min_size=6, max_size=6),
)
def test_an_offer_always_beats_the_wait_here_by_the_gain(
    held: int, queued: int, wait: float, waits: list[float], matches: list[int]
) -> None:
    peers = [peer(f"p{i}", wait=w, matched=matches[i]) for i, w in enumerate(waits)]
    d = push_decision(held, queued, wait, peers, ON)
    if d.why != PUSH_OFFER:
        assert d.to is None
        return
    chosen = next(p for p in peers if p.node_id == d.to)
    assert queued >= ON.ship_push_min_queued
    assert ON.ship_min_tokens <= d.tokens <= min(held, 512)
    assert d.tokens - chosen.matched_tokens >= ON.ship_min_tokens  # not held there
    assert wait - d.peer_s > max(ON.min_gain_s, ON.min_gain_frac * wait)
    # No other eligible peer would have started the prefix's requests sooner.
    for p in peers:
        if d.tokens - p.matched_tokens >= ON.ship_min_tokens:
            rest = (min(held, 4096) - d.tokens) * p.prefill_s_per_token
            assert d.peer_s <= p.link_delay_s + max(p.wait_s or 0.0, d.ship_s) + rest + 1e-9


def test_the_peer_accepts_only_into_a_free_slot_what_it_does_not_hold() -> None:
    assert push_accept(500, 0, 1, ON) == ACCEPT
    assert push_accept(500, 0, 0, ON) == REFUSE_NO_FREE_SLOT
    assert push_accept(500, 480, 2, ON) == REFUSE_HELD
    assert push_accept(500, 0, 2, RoutingSettings()) == REFUSE_OFF


def test_settings_are_checked() -> None:
    with pytest.raises(SettingError):
        RoutingSettings(ship_push_min_queued=0)
    with pytest.raises(SettingError):
        RoutingSettings(ship_push_interval_s=0.0)
    node = {"node_id": "n", "serve_addr": "tcp://127.0.0.1:1", "gossip_addr": "tcp://127.0.0.1:2"}
    with pytest.raises(ConfigError, match=r"routing\.ship_push_interval_s"):
        config_from_dict({**node, "routing": {"ship_push": True, "ship_push_interval_s": -1.0}})
    with pytest.raises(ConfigError, match=r"routing\.ship_push_min_queued"):
        config_from_dict({**node, "routing": {"ship_push_min_queued": 0}})
    cfg = config_from_dict({**node, "routing": {"ship_push": True}})
    assert not RoutingConfig().ship_push and cfg.routing.settings().ship_push


def test_the_offer_round_trips_and_is_validated() -> None:
    offer = P.KvOffer(request_id="o1", node_id="h", tenant="acme", tokens=[2, 3, 4])
    assert P.decode(P.encode(offer)) == offer
    reply = P.KvOfferReply(request_id="o1", node_id="p", accepted=False, why="no_free_slot")
    assert P.decode(P.encode(reply)) == reply
    P.validate_offer(offer, 8)
    for bad in (
        P.KvOffer(request_id="", node_id="h", tenant="acme", tokens=[2]),
        P.KvOffer(request_id="o", node_id="", tenant="acme", tokens=[2]),
        P.KvOffer(request_id="o", node_id="h", tenant="", tokens=[2]),
        P.KvOffer(request_id="o", node_id="h", tenant="acme", tokens=[]),
        P.KvOffer(request_id="o", node_id="h", tenant="acme", tokens=list(range(9))),
    ):
        with pytest.raises(P.ProtocolError) as exc:
            P.validate_offer(bad, 8)
        assert exc.value.code == P.INVALID_REQUEST


def test_a_malformed_offer_frame_is_a_protocol_error() -> None:
    import msgspec

    frame = msgspec.msgpack.encode({"type": "kvoffer", "v": 1, "request_id": "o", "tokens": [-1]})
    with pytest.raises(P.ProtocolError) as exc:
        P.decode(frame)
    assert exc.value.code == P.MALFORMED and exc.value.request_id == "o"
    future = msgspec.msgpack.encode(
        {"type": "kvoffer", "v": 2, "request_id": "o", "node_id": "h", "tenant": "t", "tokens": [1]}
    )
    with pytest.raises(P.ProtocolError) as exc:
        P.decode(future)
    assert exc.value.code == P.UNSUPPORTED_VERSION


def test_the_hot_prefix_is_the_one_most_waiting_requests_share() -> None:
    from zmesh.routing.shipping import hot_prefix

    s = RoutingSettings(ship_push=True, ship_min_tokens=32, ship_max_tokens=64)
    a = [1, 2, 3, 4, 5]  # block ids of prompt A (16-token blocks)
    b = [9, 8, 7, 6]
    waiting = [
        (80, a, 90),  # holds 80 of A: capped at 64 = 4 blocks, key a[3]
        (16, b, 70),  # holds one block of B: under ship_min_tokens, not counted
        (64, a, 100),  # 4 blocks of A: same prefix
        (48, b, 70),  # 3 blocks of B
    ]
    assert hot_prefix(waiting, 16, s) == (0, 4, 2, 64)  # the least held of the two: 64
    # One prompt token stays to decode: a prompt held whole counts one block less.
    assert hot_prefix([(64, a, 64)], 16, s) == (0, 3, 1, 63)
    assert hot_prefix([(16, b, 70)], 16, s) is None
    assert hot_prefix([], 16, s) is None


@given(
    st.lists(
        st.tuples(st.integers(0, 300), st.integers(0, 3), st.integers(1, 300)),
        max_size=12,
    )
)
def test_the_hot_prefix_counts_only_requests_holding_exactly_it(
    rows: list[tuple[int, int, int]],
) -> None:
    from zmesh.routing.shipping import hot_prefix

    s = RoutingSettings(ship_push=True, ship_min_tokens=32, ship_max_tokens=128)
    # Four prompt families; block k of family f has id f * 100 + k (a chain).
    waiting = [(held, [f * 100 + k for k in range(20)], prompt) for held, f, prompt in rows]
    hot = hot_prefix(waiting, 16, s)
    if hot is None:
        return
    i, n, count, held = hot
    assert 32 <= n * 16 <= 128 and held >= n * 16
    head = waiting[i][1][n - 1]
    sharing = [w for w in waiting if min(w[0], w[2] - 1, 128) // 16 == n and w[1][n - 1] == head]
    assert count == len(sharing) >= 1


def test_the_peer_takes_one_pushed_prefix_at_a_time() -> None:
    from zmesh.routing.shipping import REFUSE_PULLING

    assert push_accept(500, 0, 2, ON, pulling=True) == REFUSE_PULLING
