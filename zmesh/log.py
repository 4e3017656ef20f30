"""Structured logging: one JSON object per line on stdout (a console renderer on a TTY).

Each line has `timestamp` (ISO 8601, UTC), `level`, `event`, and `node_id` once
`configure_logging(node_id=...)` ran. Events are stable names that tools grep for;
the ones in use:

    request.received   a Generate arrived (request_id, tenant, prompt_tokens)
    route.decided      the routing decision (policy, target, reason, estimates)
    request.forwarded  sent on to a peer
    request.completed  Done about to be sent (served_by, cached/prompt tokens, ttft_s)
    request.failed     Error sent (code)
    request.fallback   a forward failed or timed out; served locally instead
    gossip.gap         a peer's delta seq skipped; a snapshot will repair it
    gossip.snapshot    a peer's estimate was replaced by a snapshot
    peer.joined        first heartbeat from a peer
    peer.suspect       a peer went quiet past suspect_after_s (not routed to)
    peer.dead          a peer went quiet past dead_after_s (estimate dropped)
    peer.forgotten     a peer dropped from the table, its sockets closed (silent past
                       forget_after_s, or dead and the table full)
    peer.resync        a peer restarted (new epoch) or its digest disagreed
    cache.evicted      KV slots gave up cached tokens
    frame.malformed    a frame failed to decode (and was answered with Error if possible)
    auth.denied        (keys on) a CURVE handshake refused: key, ZAP domain, address, reason
    auth.denied_summary  (keys on) refusals past the log bound in one window (more_refused)
    auth.forbidden     (keys on) a client key asked for what it may not (answered forbidden)
    auth.peer_key_unknown  (keys on) a learned peer's key is not in the allowlist: not joined
    node.started       sockets bound, model loaded
    node.stopped       clean shutdown
"""

from __future__ import annotations

import logging
import sys
from typing import cast

import msgspec
import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

__all__ = ["LEVELS", "configure_logging", "get_logger"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


def _add_node_id(node_id: str) -> Processor:
    # A processor, not a contextvar: the engine's worker thread does not inherit
    # the loop's context, and its log lines must carry the node id too.
    def add(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("node_id", node_id)
        return event_dict

    return add


# Lines are rendered by msgspec: about 20 us a line where the json module took 35-50
# (`route.decided`, measured on one core); a node writes several per request. A value
# msgspec cannot encode is written as its repr, as structlog's own fallback does.
_ENCODER = msgspec.json.Encoder(enc_hook=repr)


def _dumps(obj: object, **_: object) -> str:
    return _ENCODER.encode(obj).decode()


def configure_logging(
    level: str = "info", json: bool | None = None, node_id: str | None = None
) -> None:
    """Set up structlog for this process. `json=None`: JSON unless stdout is a TTY."""
    try:
        min_level = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"unknown log level {level!r}; known: {', '.join(LEVELS)}") from None
    if json is None:
        json = not sys.stdout.isatty()
    processors: list[Processor] = [structlog.contextvars.merge_contextvars]
    if node_id is not None:
        processors.append(_add_node_id(node_id))
    processors += [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    if json:
        processors += [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty()))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(min_level),
        # No file given: each logger writes to sys.stdout as it is when first used,
        # so pytest's capture and redirected stdout both see the lines.
        logger_factory=structlog.PrintLoggerFactory(),
        # Not cached, so configure_logging can be called again (tests, the lab) and
        # loggers created earlier at import time follow the new settings.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str | None = None) -> FilteringBoundLogger:
    """A structlog logger; `name` (a module or part of the node) is bound as `component`."""
    # Initial values keep the proxy lazy (a .bind() would freeze today's config).
    # Not `logger=`: that name collides with structlog.wrap_logger's first parameter.
    log = structlog.get_logger(component=name) if name else structlog.get_logger()
    return cast(FilteringBoundLogger, log)
