"""What a node refuses beyond the wire format, and the codes it refuses with.

The semantic checks of a decoded request (`validate_generate`, `validate_offer`,
`check_sampling`), the limits they apply, the error codes (`Error.code`,
`ProtocolError.code`) and `ProtocolError` itself. zmesh/protocol.py re-exports all of
it, so callers import `protocol` alone; this module imports the messages it checks
for typing only, so the two never import each other at run time.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from zmesh.protocol import Generate, KvOffer, SamplingParams

__all__ = [
    "BUSY",
    "DEADLINE_EXCEEDED",
    "FORBIDDEN",
    "INTERNAL",
    "INVALID_REQUEST",
    "KV_UNAVAILABLE",
    "MALFORMED",
    "MAX_ID_CHARS",
    "OVERLOADED",
    "PROMPT_TOO_LONG",
    "TOO_MANY_REQUESTS",
    "UNAVAILABLE",
    "UNSUPPORTED_VERSION",
    "ProtocolError",
    "check_sampling",
    "validate_generate",
    "validate_offer",
]

# Longest request id / tenant name accepted by validate_generate.
MAX_ID_CHARS: Final = 128

# Error codes (Error.code, ProtocolError.code).
MALFORMED: Final = "malformed"
UNSUPPORTED_VERSION: Final = "unsupported_version"
INVALID_REQUEST: Final = "invalid_request"
PROMPT_TOO_LONG: Final = "prompt_too_long"
OVERLOADED: Final = "overloaded"
DEADLINE_EXCEEDED: Final = "deadline_exceeded"
INTERNAL: Final = "internal"
UNAVAILABLE: Final = "unavailable"
FORBIDDEN: Final = "forbidden"  # an authenticated key asked for what it may not do
# One client has max_inflight_per_client requests in flight on this node already. Not
# retried on another node by the client library: the caller, not the node, is the cause.
TOO_MANY_REQUESTS: Final = "too_many_requests"
# A KvFetch this node will not answer with state: no slot of that tenant holds the
# prefix, it belongs to another tenant, or the state is over the asker's cap. One code
# and one message for all, so a fetch learns nothing about other tenants.
KV_UNAVAILABLE: Final = "kv_unavailable"
# A forward refused before it was queued: this node predicts its first token later than
# the forwarder's Generate.admit_bar_s (routing/admission.py). Sent instead of any token,
# so the forwarder serves the request itself (or tries another peer), never twice.
BUSY: Final = "busy"

_MAX_TOKENS = 8192
_MAX_TEMPERATURE = 5.0
_MAX_STOPS = 8
_MAX_STOP_CHARS = 256
_MAX_SEED = 2**32 - 1  # llama.cpp samplers take a uint32 seed
_MAX_TOP_K = 2**31 - 1  # llama.cpp takes an int32 k: a larger one would wrap (2**40 -> 0)


class ProtocolError(Exception):
    """A frame or request the node cannot accept; `code` is one of the error codes."""

    def __init__(self, code: str, message: str, request_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id


def check_sampling(p: SamplingParams) -> None:
    """`SamplingParams.validate`: raise ValueError naming the first bad field. Written
    so that NaN fails too."""
    if not 1 <= p.max_tokens <= _MAX_TOKENS:
        raise ValueError(f"max_tokens must be in 1..{_MAX_TOKENS}, got {p.max_tokens}")
    if not 0.0 <= p.temperature <= _MAX_TEMPERATURE:
        raise ValueError(f"temperature must be in 0..{_MAX_TEMPERATURE:g}, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.top_k <= _MAX_TOP_K:
        raise ValueError(f"top_k must be in 0..{_MAX_TOP_K} (0 disables it), got {p.top_k}")
    if p.seed is not None and not 0 <= p.seed <= _MAX_SEED:
        raise ValueError(f"seed must be in 0..{_MAX_SEED}, got {p.seed}")
    if len(p.stop) > _MAX_STOPS:
        raise ValueError(f"at most {_MAX_STOPS} stop strings, got {len(p.stop)}")
    for s in p.stop:
        if not 1 <= len(s) <= _MAX_STOP_CHARS:
            raise ValueError(f"each stop string must be 1..{_MAX_STOP_CHARS} chars, got {len(s)}")


def validate_generate(msg: Generate) -> None:
    """Semantic checks of a decoded Generate; raise ProtocolError(INVALID_REQUEST)."""

    def bad(why: str) -> ProtocolError:
        return ProtocolError(INVALID_REQUEST, why, msg.request_id or None)

    if not 1 <= len(msg.request_id) <= MAX_ID_CHARS:
        raise bad(f"request_id must be 1..{MAX_ID_CHARS} chars, got {len(msg.request_id)}")
    if (msg.prompt is None) == (msg.tokens is None):
        raise bad("exactly one of prompt or tokens must be given")
    if msg.prompt is not None and not msg.prompt:
        raise bad("prompt is empty")
    if msg.tokens is not None:
        if not msg.tokens:
            raise bad("tokens is empty")
        if min(msg.tokens) < 0:
            raise bad("token ids must be >= 0")
    if not 1 <= len(msg.tenant) <= MAX_ID_CHARS:
        raise bad(f"tenant must be 1..{MAX_ID_CHARS} chars, got {len(msg.tenant)}")
    if msg.hops < 0:
        raise bad(f"hops must be >= 0, got {msg.hops}")
    if msg.deadline is not None and not math.isfinite(msg.deadline):
        raise bad(f"deadline must be a finite unix time, got {msg.deadline}")
    try:
        msg.params.validate()
    except ValueError as exc:
        raise bad(f"params: {exc}") from None


def validate_offer(msg: KvOffer, max_tokens: int) -> None:
    """Semantic checks of a decoded KvOffer; raise ProtocolError(INVALID_REQUEST)."""

    def bad(why: str) -> ProtocolError:
        return ProtocolError(INVALID_REQUEST, f"KV offer: {why}", msg.request_id or None)

    if not 1 <= len(msg.request_id) <= MAX_ID_CHARS:
        raise bad(f"request_id must be 1..{MAX_ID_CHARS} chars, got {len(msg.request_id)}")
    if not 1 <= len(msg.node_id) <= MAX_ID_CHARS:
        raise bad(f"node_id must be 1..{MAX_ID_CHARS} chars, got {len(msg.node_id)}")
    if not 1 <= len(msg.tenant) <= MAX_ID_CHARS:
        raise bad(f"tenant must be 1..{MAX_ID_CHARS} chars, got {len(msg.tenant)}")
    if not 1 <= len(msg.tokens) <= max_tokens:
        raise bad(f"tokens must be 1..{max_tokens} ids, got {len(msg.tokens)}")
