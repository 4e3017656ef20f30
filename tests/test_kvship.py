"""KV shipping at the engine: a slot's prefix exported by one engine and imported by
another answers as a cold prefill would; a state that does not fit is refused, and
nothing of it is left in a slot or a tree. Real model, real llama.cpp state bytes."""

from __future__ import annotations

from collections.abc import Iterator

import msgspec
import pytest
from test_engine import FEW_SHOT, GREEDY, _kl

from zmesh.config import EngineConfig
from zmesh.engine import Engine, Handle, Request
from zmesh.kvstate import KvLayout, KvRefused, KvState, checksum, make_state, pack, unpack
from zmesh.protocol import SamplingParams

CONFIG = EngineConfig(n_slots=4, slot_ctx=1024)
ONE = SamplingParams(max_tokens=1)
# The greedy path of this prompt wins each of its 12 steps by >= 3.5 logits
# (tests/test_engine.py): a different answer after an import is an import bug.
QUESTION = (
    "Question 14: Which body is closest to the Earth? A. Sirius B. The Moon "
    "C. Proxima Centauri D. Vega\nAnswer:"
)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Engine]:
    with Engine(CONFIG) as eng:
        yield eng


@pytest.fixture(scope="module")
def holder() -> Iterator[Engine]:
    """Its own engine: what its slots hold (and so the rounding of the shipped cells)
    does not depend on which tests ran before."""
    with Engine(CONFIG) as eng:
        yield eng


def _shipped(holder: Engine, namespace: str = "default") -> KvState:
    holder.generate(
        FEW_SHOT + "Question: warm the prefix up\nAnswer:", params=ONE, namespace=namespace
    )
    state = holder.export_prefix(holder.tokenize(FEW_SHOT + QUESTION), namespace)
    assert state is not None and state.n_tokens >= len(holder.tokenize(FEW_SHOT)) - 2
    return state


def _clear(eng: Engine) -> None:
    for s in range(eng.n_slots):
        eng._truncate(eng._slots[s], 0)
    eng.drain_events()


def test_an_imported_prefix_answers_like_a_cold_prefill(holder: Engine, receiver: Engine) -> None:
    _clear(receiver)
    state = _shipped(holder)
    header, payload = pack(state)
    assert receiver.import_prefix(unpack(header, payload), "default") == state.n_tokens
    assert receiver.check_consistency() == [] and holder.check_consistency() == []
    assert receiver.local_match(state.header.tokens, "default") == state.n_tokens
    # The import is advertised like any cached prefix.
    added = {b for b, _ in receiver.drain_events().added}
    assert added and added <= receiver.block_ids()
    # The same cells: a suffix decoded on the import and on the holder's own slot
    # gives the same logits (same positions, same batch).
    suffix = receiver.tokenize(" Which planet is red?\nAnswer:")[1:]
    probe = [*state.header.tokens, *suffix]
    on_import, n_import = receiver.next_token_logits(tokens=probe)
    on_holder, n_holder = holder.next_token_logits(tokens=probe)
    assert n_import == n_holder == state.n_tokens
    assert _kl(on_holder, on_import) < 1e-4

    warm = receiver.generate(FEW_SHOT + QUESTION, params=GREEDY)
    assert warm.cached_tokens >= state.n_tokens
    with Engine(CONFIG) as cold_engine:
        cold = cold_engine.generate(FEW_SHOT + QUESTION, params=GREEDY)
        assert cold.cached_tokens == 0
        assert warm.text == cold.text
        # Rounding only: the bound tests/test_engine.py measured for local reuse.
        prompt = FEW_SHOT + "Question: Which planet is red?\nAnswer:"
        shipped_logits, reused = receiver.next_token_logits(prompt)
        cold_logits, _ = cold_engine.next_token_logits(prompt, namespace="cold")
    assert reused >= state.n_tokens - 2
    assert _kl(cold_logits, shipped_logits) < 0.05
    assert receiver.check_consistency() == []


def test_importing_what_a_slot_already_holds_changes_nothing(
    holder: Engine, receiver: Engine
) -> None:
    _clear(receiver)
    state = _shipped(holder)
    assert receiver.import_prefix(state, "default") == state.n_tokens
    before = receiver.slot_tokens()
    assert receiver.import_prefix(state, "default") == 0
    assert receiver.slot_tokens() == before


def _forged(state: KvState, **changes: object) -> KvState:
    header = msgspec.structs.replace(state.header, **changes)  # type: ignore[arg-type]
    return KvState(header, state.payload)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda s: _forged(s, namespace="tenant:other"), "namespace"),
        (
            lambda s: _forged(s, layout=msgspec.structs.replace(s.header.layout, slot_ctx=512)),
            "layout",
        ),
        (
            lambda s: _forged(s, layout=msgspec.structs.replace(s.header.layout, fingerprint="00")),
            "model",
        ),
        (
            lambda s: _forged(
                s, layout=msgspec.structs.replace(s.header.layout, llama_version="0.0.1")
            ),
            "layout",
        ),
        (lambda s: _forged(s, format=99), "format"),
        (lambda s: KvState(s.header, s.payload[: len(s.payload) // 2]), "truncated"),
        (
            lambda s: KvState(s.header, s.payload[:100] + b"\x00" + s.payload[101:]),
            "checksum",
        ),
        # Right length and checksum, bytes llama.cpp cannot read as this prefix.
        (
            lambda s: make_state(
                s.header.layout, s.header.namespace, s.header.tokens, bytes(len(s.payload))
            ),
            "rejected",
        ),
        (
            lambda s: make_state(
                s.header.layout, s.header.namespace, [*s.header.tokens, 1], s.payload
            ),
            "rejected",
        ),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_leaves_nothing(
    holder: Engine, receiver: Engine, mutate, reason: str
) -> None:
    _clear(receiver)
    state = mutate(_shipped(holder))
    with pytest.raises(KvRefused) as info:
        receiver.import_prefix(state, "default")
    assert info.value.reason == reason
    assert receiver.check_consistency() == []
    assert receiver.busy_slots() == 0
    assert receiver.local_match(state.header.tokens, "default") == 0
    # The engine still serves, and cold.
    r = receiver.generate(QUESTION, params=ONE)
    assert r.cached_tokens == 0 and r.completion_tokens == 1


def test_export_of_an_unknown_prefix_or_namespace_is_none(holder: Engine) -> None:
    holder.generate(FEW_SHOT + "Question: warm\nAnswer:", params=ONE)
    assert holder.export_prefix(holder.tokenize(FEW_SHOT), "tenant:nobody") is None
    unrelated = holder.export_prefix(holder.tokenize("Zebras are"), "default")
    assert unrelated is not None and unrelated.header.tokens == holder.tokenize("")[:1]  # BOS
    assert holder.export_prefix(holder.tokenize("Zebras are"), "default", min_tokens=2) is None
    assert holder.check_consistency() == []


def test_header_round_trip_and_garbage() -> None:
    layout = KvLayout(
        fingerprint="ab", llama_version="1", slot_ctx=64, kv_type="f16", swa_full=True
    )
    layout_state = make_state(layout, "default", [1, 2, 3], b"xyz")
    header, payload = pack(layout_state)
    assert unpack(header, payload) == layout_state
    assert layout_state.header.checksum == checksum(b"xyz")
    with pytest.raises(KvRefused) as info:
        unpack(b"\x93garbage", payload)
    assert info.value.reason == "malformed"


def test_a_prefix_longer_than_the_sliding_window_ships_its_first_window(
    holder: Engine, receiver: Engine, engine: Engine
) -> None:
    """llama.cpp leaves out cells older than Gemma 3's 512-token window when it exports
    a sequence, so only the first window travels; the rest is prefilled after import."""
    _clear(holder)
    _clear(receiver)
    long_prefix = FEW_SHOT * 2
    holder.generate(long_prefix + "Question: warm\nAnswer:", params=ONE)
    tokens = holder.tokenize(long_prefix + QUESTION)
    assert len(tokens) > holder.max_ship_tokens == 512
    state = holder.export_prefix(tokens, "default")
    assert state is not None and state.n_tokens == holder.max_ship_tokens
    assert receiver.import_prefix(state, "default") == state.n_tokens
    assert receiver.check_consistency() == []
    shipped = receiver.generate(long_prefix + QUESTION, params=GREEDY)
    cold = engine.generate(long_prefix + QUESTION, params=GREEDY, namespace="window-cold")
    assert shipped.cached_tokens >= state.n_tokens and cold.cached_tokens == 0
    assert shipped.text == cold.text
    assert receiver.check_consistency() == []


def test_a_second_import_in_one_engine_turn_leaves_the_first_imports_slot_alone() -> None:
    """Two pulled requests imported and queued in the same turn of the engine thread
    (the node's worker does import + submit in one `call_soon` each, and two can run
    back to back before a step): the second import must not overwrite the slot the
    first just filled before the first request claims it. Two slots: slot 0 holds a
    prefix of the second import (its holder, spared), so the first import's slot is the
    only other one."""
    with Engine(EngineConfig(n_slots=2, slot_ctx=256)) as eng:
        first = eng.tokenize("Zebras are striped, and their stripes are unique to each one.")
        second = eng.tokenize("The Moon is the closest body to the Earth; Venus comes next.")
        states = []
        for tokens in (first, second):
            eng.generate(tokens=tokens, params=ONE)
            state = eng.export_prefix(tokens, "default")
            assert state is not None and state.n_tokens == len(tokens)
            states.append(state)
        eng.clear()
        eng.generate(tokens=second[:8], params=ONE)  # slot 0: the second's holder
        ask = eng.tokenize(" Why?")[1:]

        def both() -> list[tuple[int, Handle]]:
            out = []
            for state, tokens in zip(states, (first, second), strict=True):
                try:
                    n = eng.import_prefix(state, "default")
                except KvRefused:  # no slot for it: the request prefills instead
                    n = 0
                out.append((n, eng.submit(Request(tokens=[*tokens, *ask], params=ONE))))
            return out

        (n1, h1), (n2, h2) = eng.call_soon(both).result(timeout=120)
        r1, r2 = h1.result(), h2.result()
        assert n1 == len(first) - 1  # new here: all but the BOS slot 0 holds too
        assert r1.cached_tokens == len(first), "the first import was overwritten"
        # The second import replaced its own holder (a shorter prefix of it) instead.
        assert n2 == len(second) - 8 and r2.cached_tokens == len(second)
        assert eng.check_consistency() == []


def test_a_pushed_import_takes_only_an_empty_slot_and_reserves_nothing(
    holder: Engine, receiver: Engine
) -> None:
    """Holder push (`import_prefix(..., free_only=True)`): into an empty idle slot, no
    reservation (no request will claim it); with none empty, refused and nothing
    evicted."""
    _clear(receiver)
    state = _shipped(holder)
    assert receiver.free_slots() == CONFIG.n_slots
    assert receiver.import_prefix(state, "default", free_only=True) == state.n_tokens
    assert receiver.free_slots() == CONFIG.n_slots - 1 and not receiver._reserved
    assert receiver.check_consistency() == []
    # Every slot holding something else: a push is refused, nothing is overwritten.
    _clear(receiver)
    for i in range(CONFIG.n_slots):
        receiver.generate(f"Filler {i}: " + " ".join(f"w{i}x{k}" for k in range(30)), params=ONE)
    assert receiver.free_slots() == 0
    before = receiver.block_ids()
    evictions = receiver.stats.evictions
    with pytest.raises(KvRefused) as exc:
        receiver.import_prefix(state, "default", free_only=True)
    assert exc.value.reason == "no_free_slot"
    assert receiver.block_ids() == before and receiver.stats.evictions == evictions
    assert receiver.local_match(state.header.tokens, "default") < state.n_tokens
    assert receiver.check_consistency() == []
