"""Wire protocol: msgspec Structs in a tagged union, one msgpack frame per message.

Every message carries `type` (a short tag) and `v` (the protocol version). `decode`
is a pure format check: it returns a typed message or raises `ProtocolError` with
code `malformed` or `unsupported_version`, never anything else, whatever the bytes.
Semantic checks of a request (`validate_generate`, `validate_offer`), the error codes
and `ProtocolError` live in zmesh/validation.py; this module re-exports them.

Block ids, parents and digests are unsigned 64-bit ints; msgpack carries them as
uint64, and the `U64` annotation makes a negative id a decode error, so a peer that
hashes with signed ints fails loudly instead of silently never matching.
"""

from __future__ import annotations

from typing import Annotated, Final, TypeAlias

import msgspec

from zmesh.validation import (
    BUSY,
    DEADLINE_EXCEEDED,
    FORBIDDEN,
    INTERNAL,
    INVALID_REQUEST,
    KV_UNAVAILABLE,
    MALFORMED,
    MAX_ID_CHARS,
    OVERLOADED,
    PROMPT_TOO_LONG,
    TOO_MANY_REQUESTS,
    UNAVAILABLE,
    UNSUPPORTED_VERSION,
    ProtocolError,
    check_sampling,
    validate_generate,
    validate_offer,
)

__all__ = [
    "BUSY",
    "DEADLINE_EXCEEDED",
    "FORBIDDEN",
    "INTERNAL",
    "INVALID_REQUEST",
    "KV_PART_BYTES",
    "KV_UNAVAILABLE",
    "MALFORMED",
    "MAX_FRAME_BYTES",
    "MAX_ID_CHARS",
    "MAX_PROGRESS_INTERVAL_S",
    "OVERLOADED",
    "PROMPT_TOO_LONG",
    "PROTOCOL_VERSION",
    "SNAPSHOT_PART_BLOCKS",
    "TOO_MANY_REQUESTS",
    "U64",
    "UNAVAILABLE",
    "UNSUPPORTED_VERSION",
    "CacheDelta",
    "Cancel",
    "Chunk",
    "Done",
    "Error",
    "FaultSettings",
    "Generate",
    "Heartbeat",
    "KvFetch",
    "KvOffer",
    "KvOfferReply",
    "KvPart",
    "Message",
    "PeerInfo",
    "PeerStatus",
    "Ping",
    "Pong",
    "Progress",
    "ProtocolError",
    "SamplingParams",
    "Snapshot",
    "SnapshotRequest",
    "Status",
    "StatusRequest",
    "decode",
    "encode",
    "error_for",
    "validate_generate",
    "validate_offer",
]

PROTOCOL_VERSION: Final = 1
# Larger frames are refused before decoding; zmq's MAXMSGSIZE should use the same cap.
MAX_FRAME_BYTES: Final = 8 * 1024 * 1024
# Blocks per Snapshot part: 4096 (id, parent) pairs are ~80 KB of msgpack.
SNAPSHOT_PART_BLOCKS: Final = 4096
# Bytes of KV state per KvPart: well under the frame cap, small enough to interleave.
KV_PART_BYTES: Final = 1024 * 1024
# Longest keep-alive period a node may announce in Progress: a forwarder waits a few
# of them for the next frame, so a peer cannot make it wait minutes for nothing.
MAX_PROGRESS_INTERVAL_S: Final = 10.0

# msgspec cannot bound an int above int64 with Meta; msgpack itself stops at 2**64-1.
U64 = Annotated[int, msgspec.Meta(ge=0)]
# Figures a peer reports about itself feed routing arithmetic: a NaN or infinite one
# would poison every comparison, so such a frame is malformed (NaN fails both bounds).
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=1e6)]
UnixTime = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]

# ---- plain structs (embedded in messages, not tagged) ------------------------------


class SamplingParams(msgspec.Struct, kw_only=True):
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = []

    def validate(self) -> None:
        """Raise ValueError naming the first bad field (`validation.check_sampling`)."""
        check_sampling(self)


class PeerInfo(msgspec.Struct, kw_only=True):
    node_id: str
    serve_addr: str
    gossip_addr: str
    public_key: str | None = None  # CURVE public key (Z85) when the mesh runs with keys


class FaultSettings(msgspec.Struct, kw_only=True):
    """Faults injected on a node (config [faults], its control file; zmesh/faults.py)."""

    delay_ms: float = 0.0  # added to every message the node sends to its peers
    partition: list[str] = []  # peer node ids cut off both ways
    drop_deltas: float = 0.0  # fraction of outgoing cache deltas dropped


class PeerStatus(msgspec.Struct, kw_only=True):
    node_id: str
    state: str
    epoch: int
    seq: int
    n_blocks: int
    estimate_age_s: float  # seconds since we last heard the peer; -1 if never
    queue_depth: int
    link_delay_s: float


# ---- tagged messages ---------------------------------------------------------------


class _Msg(msgspec.Struct, kw_only=True, tag_field="type"):
    """Base of every wire message: the `type` tag plus the version."""

    v: int = PROTOCOL_VERSION


class Generate(_Msg, tag="gen", kw_only=True):
    """Client or peer -> serve ROUTER. Exactly one of `prompt` / `tokens`."""

    request_id: str
    prompt: str | None = None
    tokens: list[int] | None = None
    tenant: str = "default"
    params: SamplingParams = msgspec.field(default_factory=SamplingParams)
    hops: int = 0  # forwards so far; a node never forwards past its max_hops
    deadline: float | None = None  # unix time (s) after which the answer is useless
    origin: str | None = None  # node id that forwarded it, None from a client
    stream: bool = True  # send Chunks before Done
    # Send Progress frames while the request is accepted, queued or running (forwarders
    # ask for them, so a long answer is not mistaken for a dead peer).
    progress: bool = False
    # Holder-side admission (routing/admission.py), set by a forwarder: refuse with an
    # Error of code `busy` if your first token would come later than this many seconds
    # after receipt. None: always admit (a client, or a forwarder with admission off).
    admit_bar_s: Seconds | None = None


class Chunk(_Msg, tag="chunk", kw_only=True):
    request_id: str
    index: int
    text: str
    # Bumps when a forward failed and the request restarted elsewhere: a client
    # drops its partial text when it sees a new attempt.
    attempt: int = 0


class Done(_Msg, tag="done", kw_only=True):
    """Final reply: the full text plus who served it, why, and what it cost."""

    request_id: str
    text: str
    finish_reason: str  # "stop" | "length" | "eog" (| "cancelled")
    served_by: str
    hops: int
    route_reason: str
    route_path: list[str]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_s: float
    prefill_s: float
    decode_tps: float
    queue_s: float = 0.0
    # Of cached_tokens, how many came over the wire from pulled_from (KV shipping).
    shipped_tokens: int = 0
    pulled_from: str | None = None


class Error(_Msg, tag="err", kw_only=True):
    request_id: str | None
    code: str
    message: str
    node_id: str | None = None


class Cancel(_Msg, tag="cancel", kw_only=True):
    request_id: str


class Progress(_Msg, tag="progress", kw_only=True):
    """Keep-alive for a Generate sent with ``progress``: the node still holds the request
    (``state``: accepted | queued | running | forwarded) and sends the next one within
    ``interval_s`` unless the final reply comes first."""

    request_id: str
    node_id: str
    state: str
    queue_depth: Count = 0  # the node's queue, this request included while it waits
    interval_s: Annotated[float, msgspec.Meta(gt=0.0, le=MAX_PROGRESS_INTERVAL_S)]


class Heartbeat(_Msg, tag="hb", kw_only=True):
    """PUB, every heartbeat interval: load, advert position, and known peers."""

    node_id: str
    epoch: int
    seq: int
    sent_at: UnixTime
    serve_addr: str
    gossip_addr: str
    queue_depth: Count
    busy_slots: Count
    n_slots: Count
    n_blocks: Count
    digest: U64
    prefill_s_per_token: Seconds
    service_s: Seconds
    # Predicted seconds of work queued and running: a better wait estimate than
    # queue_depth x service_s when requests differ in size (cold vs cached prompts).
    backlog_s: Seconds = 0.0
    # Requests it runs at once (its engine's max_running; 0: not said, one at a time):
    # with queue_depth, whether a forward would find a place free there.
    places: Count = 0
    # Cached tokens a request it holds nothing of would overwrite (the slot its slot
    # policy takes for a miss; 0: a slot is free, or not said): the eviction charge.
    evict_tokens: Count = 0
    peers: list[PeerInfo] = []
    block_size: int
    model_fingerprint: str
    public_key: str | None = None  # the sender's CURVE public key (Z85), with keys on


class CacheDelta(_Msg, tag="delta", kw_only=True):
    """PUB: block ids added (with their parent) and removed since `seq - 1`."""

    node_id: str
    epoch: int
    seq: int
    added: list[tuple[U64, U64]]
    removed: list[U64]


class SnapshotRequest(_Msg, tag="snapreq", kw_only=True):
    request_id: str
    node_id: str  # the requester


class Snapshot(_Msg, tag="snap", kw_only=True):
    """One of `parts` replies to a SnapshotRequest; the set as of `seq`."""

    request_id: str
    node_id: str  # the sender
    epoch: int
    seq: int
    part: int
    parts: int
    blocks: list[tuple[U64, U64]]
    digest: U64
    n_blocks: int


class KvFetch(_Msg, tag="kvfetch", kw_only=True):
    """Peer -> holder's serve ROUTER: send me the KV state of the longest prefix of
    ``tokens`` that you hold for ``tenant`` (at most ``max_bytes``). Answered by
    KvParts, or one Error (``kv_unavailable``)."""

    request_id: str
    tenant: str
    tokens: list[Annotated[int, msgspec.Meta(ge=0)]]
    max_bytes: Annotated[int, msgspec.Meta(ge=0)]
    deadline: float | None = None


class KvPart(_Msg, tag="kvpart", kw_only=True):
    """One of ``parts`` replies to a KvFetch; part 0 also carries the state's header
    (zmesh.kvstate.KvHeader as msgpack), every part a slice of the payload."""

    request_id: str
    part: int
    parts: int
    header: bytes = b""
    data: bytes = b""


class KvOffer(_Msg, tag="kvoffer", kw_only=True):
    """Holder -> an idle peer's serve ROUTER: I hold the KV state of ``tokens`` for
    ``tenant`` and requests for it queue here; pull it (a `KvFetch` to ``node_id``) if
    a slot of yours is free. Answered by one `KvOfferReply` (or an `Error` when the
    offer is invalid). Holder push: routing/shipping.py, `push_decision`."""

    request_id: str
    node_id: str  # the holder, whom the peer fetches from
    tenant: str
    tokens: list[Annotated[int, msgspec.Meta(ge=0)]]


class KvOfferReply(_Msg, tag="kvoffrep", kw_only=True):
    """The offered peer's answer: it pulls now (``accepted``), or ``why`` it will not."""

    request_id: str
    node_id: str  # the peer that answers
    accepted: bool
    why: str = ""


class StatusRequest(_Msg, tag="statreq", kw_only=True):
    request_id: str


class Status(_Msg, tag="status", kw_only=True):
    request_id: str
    node_id: str
    epoch: int
    seq: int
    n_blocks: int
    queue_depth: int
    busy_slots: int
    n_slots: int
    peers: list[PeerStatus] = []
    counters: dict[str, int] = {}
    # Generate requests accepted and not answered yet (served here or relayed), and
    # how many distinct clients hold them: both return to 0 when the node is idle.
    inflight: int = 0
    inflight_clients: int = 0
    faults: FaultSettings = msgspec.field(default_factory=FaultSettings)  # in effect now


class Ping(_Msg, tag="ping", kw_only=True):
    request_id: str
    sent_at: float
    # Who pings: a node that joined through a seed is heard by that seed this way
    # (the seed never subscribed to it); None from a client or an older node.
    sender: PeerInfo | None = None


class Pong(_Msg, tag="pong", kw_only=True):
    request_id: str
    sent_at: float  # echoed from the Ping, so the sender's clock measures the delay
    node_id: str


Message: TypeAlias = (
    Generate
    | Chunk
    | Done
    | Error
    | Cancel
    | Progress
    | Heartbeat
    | CacheDelta
    | SnapshotRequest
    | Snapshot
    | KvFetch
    | KvPart
    | KvOffer
    | KvOfferReply
    | StatusRequest
    | Status
    | Ping
    | Pong
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Message] = msgspec.msgpack.Decoder(Message)
_raw_decoder = msgspec.msgpack.Decoder()


class _Envelope(msgspec.Struct):
    """What any frame's map says about itself. msgspec skips other fields unread, so
    bytes that fail a full decode (invalid UTF-8 in a prompt) still give these."""

    request_id: object = None
    v: object = None


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode(msg: Message) -> bytes:
    """One msgpack frame. Raises OverflowError for ints outside -2**63..2**64-1."""
    return _encoder.encode(msg)


def decode(frame: bytes | bytearray | memoryview) -> Message:
    """Decode one frame; raise ProtocolError (and only that) if it is not a valid message."""
    size = frame.nbytes if isinstance(frame, memoryview) else len(frame)
    if size > MAX_FRAME_BYTES:
        raise ProtocolError(MALFORMED, f"frame of {size} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        msg = _decoder.decode(frame)
    except Exception as exc:  # hostile bytes must surface as ProtocolError, nothing else
        raise _explain_failure(frame, exc) from None
    if msg.v != PROTOCOL_VERSION:
        # Well-formed for our schema, yet another version: refuse rather than guess.
        raise _unsupported(msg.v, getattr(msg, "request_id", None))
    return msg


def _explain_failure(frame: bytes | bytearray | memoryview, exc: Exception) -> ProtocolError:
    """Re-read a frame the typed decoder refused, for its version and request id."""
    try:
        raw = _raw_decoder.decode(frame)
    except Exception:
        try:
            env = _envelope_decoder.decode(frame)
        except Exception:
            return ProtocolError(MALFORMED, f"undecodable frame: {exc}")
        raw = {"request_id": env.request_id, "v": env.v}
    if not isinstance(raw, dict):
        return ProtocolError(MALFORMED, f"expected a msgpack map, got {type(raw).__name__}")
    rid = raw.get("request_id")
    request_id = rid if isinstance(rid, str) and rid else None
    v = raw.get("v")
    if isinstance(v, int) and not isinstance(v, bool) and v != PROTOCOL_VERSION:
        return _unsupported(v, request_id)
    return ProtocolError(MALFORMED, str(exc), request_id)


def _unsupported(v: int, request_id: str | None) -> ProtocolError:
    return ProtocolError(
        UNSUPPORTED_VERSION,
        f"protocol version {v} is not supported (this node speaks {PROTOCOL_VERSION})",
        request_id,
    )


def error_for(exc: ProtocolError, node_id: str | None) -> Error:
    """The Error reply for a refused frame or request."""
    return Error(request_id=exc.request_id, code=exc.code, message=exc.message, node_id=node_id)
