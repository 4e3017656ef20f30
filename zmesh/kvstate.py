"""A cached prefix's KV state as it travels between nodes: header, payload, checks.

The engine exports the KV cells of a slot's first n tokens (`Engine.export_prefix`) as
llama.cpp's sequence state and imports it into a free slot (`Engine.import_prefix`).
What travels is one `KvHeader` (msgpack) and the raw state bytes. The header says
everything an importer must agree with before it lets llama.cpp read the bytes: the
model (fingerprint), the llama.cpp build (llama-cpp-python version), the KV layout
(context per slot, cell type, full sliding-window cache), the namespace (tenant) and
the token ids the state holds, plus the payload's length and checksum. A state that
disagrees in anything is refused (`KvRefused`), never imported.

Sans-IO: no sockets, no llama.cpp; the engine and the transport call in here.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import msgspec

KV_FORMAT = 1  # bump when the header or the payload's meaning changes


class KvRefused(Exception):
    """A shipped state this engine must not import; ``reason`` is a short stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class KvLayout(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What must be equal on both ends for llama.cpp's bytes to mean the same cells."""

    fingerprint: str  # model fingerprint (hex)
    llama_version: str  # llama-cpp-python version: it vendors llama.cpp
    slot_ctx: int  # context (cells) per slot
    kv_type: str  # cell type of K and V ("f16" unless configured otherwise)
    swa_full: bool  # the sliding-window cache keeps every cell


class KvHeader(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    format: int
    layout: KvLayout
    namespace: str
    tokens: list[int]  # the prefix the state holds, positions 0..len-1
    nbytes: int
    checksum: str  # blake2b-128 of the payload (hex)


@dataclass(frozen=True, slots=True)
class KvState:
    header: KvHeader
    payload: bytes

    @property
    def n_tokens(self) -> int:
        return len(self.header.tokens)


def checksum(payload: bytes) -> str:
    return hashlib.blake2b(payload, digest_size=16).hexdigest()


def make_state(layout: KvLayout, namespace: str, tokens: list[int], payload: bytes) -> KvState:
    header = KvHeader(
        format=KV_FORMAT,
        layout=layout,
        namespace=namespace,
        tokens=tokens,
        nbytes=len(payload),
        checksum=checksum(payload),
    )
    return KvState(header, payload)


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(KvHeader)


def pack(state: KvState) -> tuple[bytes, bytes]:
    """The two frames that carry a state: the header, then the payload."""
    return _encoder.encode(state.header), state.payload


def unpack(header: bytes, payload: bytes) -> KvState:
    try:
        return KvState(_header_decoder.decode(header), payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise KvRefused("malformed", f"KV state header does not decode: {exc}") from exc


def verify(state: KvState, layout: KvLayout, namespace: str, max_tokens: int) -> None:
    """Raise `KvRefused` unless ``state`` may be imported by an engine with ``layout``
    into ``namespace``. Cheap checks first; the checksum reads every byte."""
    h = state.header
    if h.format != KV_FORMAT:
        raise KvRefused("format", f"KV state format {h.format}; this node reads {KV_FORMAT}")
    if h.layout.fingerprint != layout.fingerprint:
        raise KvRefused("model", "KV state comes from another model")
    if h.layout != layout:
        raise KvRefused("layout", f"KV layout differs: {h.layout} here {layout}")
    if h.namespace != namespace:
        raise KvRefused("namespace", "KV state belongs to another namespace")
    if not 0 < len(h.tokens) <= max_tokens:
        raise KvRefused("tokens", f"KV state holds {len(h.tokens)} tokens; allowed 1..{max_tokens}")
    if len(state.payload) != h.nbytes:
        raise KvRefused("truncated", f"KV payload has {len(state.payload)} of {h.nbytes} bytes")
    if checksum(state.payload) != h.checksum:
        raise KvRefused("checksum", "KV payload checksum does not match its header")
