"""Wire protocol: round trips, u64 ids, hostile frames, versions, request validation."""

from __future__ import annotations

import math
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh import protocol as P

U64_MAX = 2**64 - 1
u64 = st.integers(min_value=0, max_value=U64_MAX)
text = st.text(max_size=40)
finite = st.floats(allow_nan=False)


def params(**kw: object) -> P.SamplingParams:
    return P.SamplingParams(**kw)  # type: ignore[arg-type]


def gen(**kw: object) -> P.Generate:
    base: dict[str, object] = {"request_id": "r1", "prompt": "hello"}
    return P.Generate(**{**base, **kw})  # type: ignore[arg-type]


def raw(d: dict[str, object]) -> bytes:
    return msgspec.msgpack.encode(d)


ONE_OF_EACH: list[P.Message] = [
    gen(
        tokens=None,
        tenant="acme",
        params=params(max_tokens=5, temperature=0.7, top_p=0.9, top_k=40, seed=7, stop=["\n"]),
        hops=1,
        deadline=1.7e9,
        origin="n2",
        stream=False,
        progress=True,
        admit_bar_s=4.5,
    ),
    P.Generate(request_id="r2", tokens=[1, 2, 3]),
    P.Chunk(request_id="r1", index=3, text="wor", attempt=1),
    P.Done(
        request_id="r1",
        text="hello world",
        finish_reason="length",
        served_by="n1",
        hops=1,
        route_reason="prefix",
        route_path=["n2", "n1"],
        prompt_tokens=600,
        cached_tokens=592,
        completion_tokens=5,
        ttft_s=0.04,
        prefill_s=0.01,
        decode_tps=80.5,
        queue_s=0.002,
    ),
    P.Error(request_id=None, code=P.MALFORMED, message="bad", node_id="n1"),
    P.Cancel(request_id="r1"),
    P.Progress(request_id="r1", node_id="n1", state="queued", queue_depth=3, interval_s=1.0),
    P.Heartbeat(
        node_id="n1",
        epoch=12345,
        seq=9,
        sent_at=1.7e9,
        serve_addr="tcp://127.0.0.1:5555",
        gossip_addr="tcp://127.0.0.1:5556",
        queue_depth=2,
        busy_slots=1,
        n_slots=8,
        n_blocks=40,
        digest=U64_MAX,
        prefill_s_per_token=0.0017,
        service_s=0.4,
        peers=[P.PeerInfo(node_id="n2", serve_addr="tcp://h:1", gossip_addr="tcp://h:2")],
        block_size=16,
        model_fingerprint="ab" * 16,
    ),
    P.CacheDelta(node_id="n1", epoch=1, seq=10, added=[(U64_MAX, 0)], removed=[2**63]),
    P.SnapshotRequest(request_id="s1", node_id="n2"),
    P.Snapshot(
        request_id="s1",
        node_id="n1",
        epoch=1,
        seq=10,
        part=0,
        parts=1,
        blocks=[(1, 2), (3, 1)],
        digest=2,
        n_blocks=2,
    ),
    P.StatusRequest(request_id="q"),
    P.Status(
        request_id="q",
        node_id="n1",
        epoch=1,
        seq=10,
        n_blocks=2,
        queue_depth=0,
        busy_slots=0,
        n_slots=8,
        peers=[
            P.PeerStatus(
                node_id="n2",
                state="alive",
                epoch=2,
                seq=4,
                n_blocks=7,
                estimate_age_s=0.1,
                queue_depth=1,
                link_delay_s=0.0004,
            )
        ],
        counters={"requests_served": 3},
    ),
    P.Ping(request_id="p", sent_at=1.5),
    P.Pong(request_id="p", sent_at=1.5, node_id="n2"),
    P.KvFetch(request_id="k", tenant="acme", tokens=[2, 10, 11], max_bytes=1 << 20, deadline=9.5),
    P.KvPart(request_id="k", part=0, parts=2, header=b"\x81\xa1h\x01", data=b"\x00\xff" * 8),
    P.KvOffer(request_id="o", node_id="n1", tenant="acme", tokens=[2, 10, 11]),
    P.KvOfferReply(request_id="o", node_id="n2", accepted=False, why="no_free_slot"),
]


def test_every_message_type_is_covered() -> None:
    union_members = set(typing.get_args(P.Message))
    assert {type(m) for m in ONE_OF_EACH} == union_members


@pytest.mark.parametrize("msg", ONE_OF_EACH, ids=lambda m: type(m).__name__)
def test_round_trip(msg: P.Message) -> None:
    frame = P.encode(msg)
    assert isinstance(frame, bytes)
    back = P.decode(frame)
    assert type(back) is type(msg)
    assert back == msg


def test_frames_carry_short_tag_and_version() -> None:
    fields = msgspec.msgpack.decode(P.encode(P.Cancel(request_id="r")))
    assert fields == {"type": "cancel", "v": P.PROTOCOL_VERSION, "request_id": "r"}
    tags = {msgspec.msgpack.decode(P.encode(m))["type"] for m in ONE_OF_EACH}
    assert len(tags) == len({type(m) for m in ONE_OF_EACH})  # one distinct tag per type
    assert all(len(t) <= 8 for t in tags)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = P.encode(P.Cancel(request_id="r"))
    assert P.decode(bytearray(frame)) == P.Cancel(request_id="r")
    assert P.decode(memoryview(frame)) == P.Cancel(request_id="r")


# ---- property tests -----------------------------------------------------------------


@settings(max_examples=200)
@given(
    rid=st.text(min_size=1, max_size=20),
    prompt=st.one_of(st.none(), text),
    tokens=st.one_of(st.none(), st.lists(st.integers(0, 2**31 - 1), max_size=50)),
    hops=st.integers(0, 10),
    deadline=st.one_of(st.none(), finite),
    max_tokens=st.integers(-(2**63), 2**63 - 1),
    temperature=finite,
    stop=st.lists(text, max_size=10),
    seed=st.one_of(st.none(), st.integers(0, U64_MAX)),
)
def test_generate_round_trip(
    rid: str,
    prompt: str | None,
    tokens: list[int] | None,
    hops: int,
    deadline: float | None,
    max_tokens: int,
    temperature: float,
    stop: list[str],
    seed: int | None,
) -> None:
    # decode is a pure format check: even semantically invalid requests round-trip.
    msg = P.Generate(
        request_id=rid,
        prompt=prompt,
        tokens=tokens,
        hops=hops,
        deadline=deadline,
        params=params(max_tokens=max_tokens, temperature=temperature, stop=stop, seed=seed),
    )
    assert P.decode(P.encode(msg)) == msg


@settings(max_examples=200)
@given(
    epoch=u64,
    seq=st.integers(0, 2**63 - 1),
    added=st.lists(st.tuples(u64, u64), max_size=50),
    removed=st.lists(u64, max_size=50),
)
def test_cache_delta_u64_round_trip(
    epoch: int, seq: int, added: list[tuple[int, int]], removed: list[int]
) -> None:
    msg = P.CacheDelta(node_id="n1", epoch=epoch, seq=seq, added=added, removed=removed)
    back = P.decode(P.encode(msg))
    assert isinstance(back, P.CacheDelta)
    assert back.added == added and back.removed == removed
    assert all(isinstance(pair, tuple) for pair in back.added)


@settings(max_examples=200)
@given(
    blocks=st.lists(st.tuples(u64, u64), max_size=50),
    digest=u64,
    part=st.integers(0, 100),
)
def test_snapshot_u64_round_trip(blocks: list[tuple[int, int]], digest: int, part: int) -> None:
    msg = P.Snapshot(
        request_id="s",
        node_id="n1",
        epoch=1,
        seq=5,
        part=part,
        parts=part + 1,
        blocks=blocks,
        digest=digest,
        n_blocks=len(blocks),
    )
    assert P.decode(P.encode(msg)) == msg


@settings(max_examples=500)
@given(frame=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(frame: bytes) -> None:
    try:
        msg = P.decode(frame)
    except P.ProtocolError as exc:
        assert exc.code in (P.MALFORMED, P.UNSUPPORTED_VERSION)
        assert exc.message
    else:  # astronomically unlikely, but then it must really be a message
        assert msg.v == P.PROTOCOL_VERSION


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), U64_MAX) | finite | text | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300)
@given(
    tag=st.sampled_from(["gen", "chunk", "done", "delta", "snap", "hb", "nope", 3]),
    fields=st.dictionaries(
        st.sampled_from(["v", "request_id", "prompt", "tokens", "added", "params", "index"]),
        msgpack_values,
        max_size=5,
    ),
)
def test_well_formed_msgpack_maps_raise_only_protocol_error(
    tag: object, fields: dict[str, object]
) -> None:
    """Structurally plausible maps with wrong field types: the hard case for a decoder."""
    try:
        P.decode(raw({"type": tag, **fields}))
    except P.ProtocolError as exc:
        assert exc.code in (P.MALFORMED, P.UNSUPPORTED_VERSION)
        rid = fields.get("request_id")
        assert exc.request_id in (None, rid)


# ---- malformed frames and versions --------------------------------------------------


def test_unknown_version_is_unsupported_with_request_id() -> None:
    frame = raw({"type": "gen", "v": 2, "request_id": "abc", "prompt": "x"})
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert ei.value.code == P.UNSUPPORTED_VERSION
    assert ei.value.request_id == "abc"
    assert "2" in ei.value.message


def test_unknown_version_with_a_new_schema_is_still_unsupported() -> None:
    """A v2 message type we do not know must not read as malformed: say why."""
    frame = raw({"type": "gen2", "v": 7, "request_id": "abc", "whatever": [1, 2]})
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert (ei.value.code, ei.value.request_id) == (P.UNSUPPORTED_VERSION, "abc")


def test_bool_version_is_malformed_not_unsupported() -> None:
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(raw({"type": "cancel", "v": True, "request_id": "r"}))
    assert ei.value.code == P.MALFORMED


@pytest.mark.parametrize(
    ("frame", "request_id"),
    [
        (b"", None),
        (b"\xc1", None),  # never-used msgpack opcode
        (b"\x91" * 100_000 + b"\xc0", None),  # nesting deeper than any recursion limit
        (msgspec.msgpack.encode([1, 2, 3]), None),
        (raw({"type": "nope", "v": 1, "request_id": "r9"}), "r9"),
        (raw({"type": "gen", "v": 1, "request_id": "r9", "hops": "x"}), "r9"),
        (raw({"type": "gen", "v": 1, "request_id": 5}), None),
        (raw({"v": 1, "request_id": "r9"}), "r9"),  # no type tag
        (P.encode(P.Cancel(request_id="r")) + b"\x00", None),  # trailing bytes
    ],
)
def test_malformed_frames(frame: bytes, request_id: str | None) -> None:
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert ei.value.code == P.MALFORMED
    assert ei.value.request_id == request_id


BAD_UTF8 = "<bad>"  # replaced in the frame by as many bytes that are not UTF-8


def with_bad_utf8(d: dict[str, object]) -> bytes:
    return raw(d).replace(BAD_UTF8.encode(), b"\xff\xfe\xc3(\x80")


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": f"Say {BAD_UTF8}"},
        {"prompt": "x", "params": {"stop": [BAD_UTF8]}},
        {"prompt": "x", "tenant": BAD_UTF8},
    ],
)
def test_invalid_utf8_in_a_string_keeps_the_request_id(fields: dict[str, object]) -> None:
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(with_bad_utf8({"type": "gen", "v": 1, "request_id": "r-utf8", **fields}))
    assert (ei.value.code, ei.value.request_id) == (P.MALFORMED, "r-utf8")
    assert "utf-8" in ei.value.message.lower()
    with pytest.raises(P.ProtocolError) as ei:  # the version is read past them too
        P.decode(with_bad_utf8({"type": "gen", "v": 9, "request_id": "r-v9", **fields}))
    assert (ei.value.code, ei.value.request_id) == (P.UNSUPPORTED_VERSION, "r-v9")


def test_negative_block_id_is_malformed() -> None:
    frame = raw(
        {"type": "delta", "v": 1, "node_id": "n", "epoch": 1, "seq": 1, "added": [[-1, 0]]}
        | {"removed": []}
    )
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert ei.value.code == P.MALFORMED
    assert "added" in ei.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backlog_s", math.nan),
        ("service_s", math.inf),
        ("prefill_s_per_token", -0.001),
        ("sent_at", math.nan),
        ("queue_depth", -1),
        ("n_slots", 2**40),
    ],
)
def test_heartbeat_figures_out_of_range_are_malformed(field: str, value: float) -> None:
    hb = next(m for m in ONE_OF_EACH if isinstance(m, P.Heartbeat))
    frame = P.encode(msgspec.structs.replace(hb, **{field: value}))
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert ei.value.code == P.MALFORMED
    assert field in ei.value.message


def test_ids_beyond_u64_cannot_be_encoded() -> None:
    with pytest.raises(OverflowError):
        P.encode(P.CacheDelta(node_id="n", epoch=1, seq=1, added=[(2**64, 0)], removed=[]))


def test_oversized_frame_is_rejected_before_decoding() -> None:
    big = P.encode(P.Generate(request_id="big", prompt="x" * P.MAX_FRAME_BYTES))
    assert len(big) > P.MAX_FRAME_BYTES
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(big)
    assert ei.value.code == P.MALFORMED
    assert str(P.MAX_FRAME_BYTES) in ei.value.message
    # Just under the cap still decodes.
    ok = P.encode(P.Generate(request_id="ok", prompt="x" * (P.MAX_FRAME_BYTES - 1000)))
    assert isinstance(P.decode(ok), P.Generate)


def test_snapshot_part_fits_comfortably_in_a_frame() -> None:
    blocks = [(U64_MAX, U64_MAX)] * P.SNAPSHOT_PART_BLOCKS
    snap = P.Snapshot(
        request_id="s",
        node_id="n",
        epoch=U64_MAX,
        seq=1,
        part=0,
        parts=1,
        blocks=blocks,
        digest=U64_MAX,
        n_blocks=len(blocks),
    )
    assert len(P.encode(snap)) < P.MAX_FRAME_BYTES // 10


def test_error_for_carries_code_message_and_ids() -> None:
    exc = P.ProtocolError(P.UNSUPPORTED_VERSION, "version 2", "r7")
    err = P.error_for(exc, "n1")
    assert err == P.Error(
        request_id="r7", code=P.UNSUPPORTED_VERSION, message="version 2", node_id="n1"
    )
    assert P.decode(P.encode(err)) == err
    assert str(exc) == "unsupported_version: version 2"


def test_admission_bar_round_trips_and_is_optional_on_the_wire() -> None:
    # A forward's admission bar (routing/admission.py) and the "busy" refusal of one.
    fwd = gen(hops=1, origin="n2", progress=True, admit_bar_s=3.25)
    assert P.decode(P.encode(fwd)) == fwd
    # A frame from a node without the field decodes with no bar: always admitted.
    old = raw({"type": "gen", "v": P.PROTOCOL_VERSION, "request_id": "r1", "prompt": "hi"})
    decoded = P.decode(old)
    assert isinstance(decoded, P.Generate) and decoded.admit_bar_s is None
    busy = P.Error(request_id="r1~ab", code=P.BUSY, message="first token in 9.1 s", node_id="n1")
    assert P.decode(P.encode(busy)) == busy
    assert P.BUSY == "busy"


@pytest.mark.parametrize("bar", [-0.5, math.nan, math.inf, 2e6])
def test_admission_bar_out_of_range_is_malformed(bar: float) -> None:
    frame = P.encode(gen(admit_bar_s=bar))
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(frame)
    assert ei.value.code == P.MALFORMED
    assert "admit_bar_s" in ei.value.message


# ---- validate_generate --------------------------------------------------------------


def test_valid_requests_pass() -> None:
    P.validate_generate(gen())
    P.validate_generate(P.Generate(request_id="r", tokens=[0, 5]))
    P.validate_generate(gen(params=params(max_tokens=8192, temperature=5.0, top_p=1e-9)))
    P.validate_generate(gen(params=params(stop=["x" * 256] * 8, seed=2**32 - 1, top_k=1)))
    P.validate_generate(gen(params=params(top_k=2**31 - 1)))  # llama.cpp's int32 k


@pytest.mark.parametrize(
    ("msg", "fragment"),
    [
        (gen(request_id=""), "request_id"),
        (gen(request_id="r" * (P.MAX_ID_CHARS + 1)), "request_id"),
        (P.Generate(request_id="r"), "exactly one of prompt or tokens"),
        (gen(tokens=[1]), "exactly one of prompt or tokens"),
        (gen(prompt=""), "prompt is empty"),
        (P.Generate(request_id="r", tokens=[]), "tokens is empty"),
        (P.Generate(request_id="r", tokens=[1, -2]), "token ids"),
        (gen(tenant=""), "tenant"),
        (gen(hops=-1), "hops"),
        (gen(deadline=math.nan), "deadline"),
        (gen(deadline=math.inf), "deadline"),
        (gen(params=params(max_tokens=0)), "max_tokens"),
        (gen(params=params(max_tokens=8193)), "max_tokens"),
        (gen(params=params(temperature=-0.1)), "temperature"),
        (gen(params=params(temperature=5.01)), "temperature"),
        (gen(params=params(temperature=math.nan)), "temperature"),
        (gen(params=params(top_p=0.0)), "top_p"),
        (gen(params=params(top_p=1.01)), "top_p"),
        (gen(params=params(top_p=math.nan)), "top_p"),
        (gen(params=params(top_k=-1)), "top_k"),
        (gen(params=params(top_k=2**31)), "top_k"),
        (gen(params=params(top_k=2**40)), "top_k"),  # wrapped to 0 by ctypes once
        (gen(params=params(seed=-1)), "seed"),
        (gen(params=params(seed=2**32)), "seed"),
        (gen(params=params(stop=["a"] * 9)), "stop"),
        (gen(params=params(stop=[""])), "stop"),
        (gen(params=params(stop=["x" * 257])), "stop"),
    ],
)
def test_invalid_requests_are_rejected(msg: P.Generate, fragment: str) -> None:
    with pytest.raises(P.ProtocolError) as ei:
        P.validate_generate(msg)
    assert ei.value.code == P.INVALID_REQUEST
    assert fragment in ei.value.message
    assert ei.value.request_id == (msg.request_id or None)


def test_sampling_params_validate_raises_value_error() -> None:
    P.SamplingParams().validate()  # defaults are valid
    with pytest.raises(ValueError, match=r"max_tokens must be in 1\.\.8192, got 0"):
        P.SamplingParams(max_tokens=0).validate()
