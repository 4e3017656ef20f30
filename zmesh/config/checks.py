"""The config's error type and the checks its sections share (addresses, positivity).

Checks raise `ValueError("key: why")` from a section's `__post_init__`; loading
(zmesh/config/load.py) turns that into a `ConfigError` naming the dotted key.
"""

from __future__ import annotations

import math
import re
from typing import NoReturn

import msgspec

_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")
_TCP_RE = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>[0-9]+)")


class ConfigError(Exception):
    """A config the node cannot run with; `str()` is the full message for the user."""

    def __init__(self, source: str, key: str | None, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key
        self.message = message


def _fail(key: str, message: str) -> NoReturn:
    # "key: message" is how __post_init__ names the field; _translate splits it back.
    raise ValueError(f"{key}: {message}")


def check_address(addr: str, *, bind: bool) -> str | None:
    """Why `addr` is not a usable zmq endpoint, or None if it is.

    `bind` addresses may use a wildcard host (`*`, `0.0.0.0`); an address others
    connect to (advertise, seeds) may not.
    """
    if addr.startswith("ipc://"):
        return None if len(addr) > len("ipc://") else f"{addr!r}: ipc:// needs a path"
    m = _TCP_RE.fullmatch(addr)
    if m is None:
        return f"{addr!r} is not tcp://host:port or ipc://path"
    if not 1 <= int(m["port"]) <= 65535:
        return f"{addr!r}: port must be 1..65535"
    if not bind and (m["host"] in _WILDCARD_HOSTS or "*" in m["host"]):
        return f"{addr!r} is a wildcard bind address; peers need a host they can reach"
    return None


def _check_addr(key: str, addr: str, *, bind: bool) -> None:
    if (why := check_address(addr, bind=bind)) is not None:
        _fail(key, why)


def _check_positive(obj: msgspec.Struct, *keys: str) -> None:
    for key in keys:
        value = getattr(obj, key)
        if not (value > 0 and math.isfinite(value)):
            _fail(key, f"must be > 0, got {value}")
