"""The errors the client raises, and `Completion` (the final answer it returns)."""

from __future__ import annotations

from zmesh import protocol as P

Completion = P.Done  # the final answer, with its provenance


class ZmeshError(Exception):
    """Base class of every error the client raises."""


class RequestError(ZmeshError):
    """A node answered with an error (bad request, prompt too long, overloaded...)."""

    def __init__(self, code: str, message: str, node_id: str | None = None) -> None:
        super().__init__(f"{code}: {message}" + (f" (node {node_id})" if node_id else ""))
        self.code, self.message, self.node_id = code, message, node_id


class RequestTimeout(ZmeshError, TimeoutError):
    """No endpoint answered within the timeout."""


class NoEndpointAvailable(ZmeshError):
    """None of the endpoints accepted a connection."""


class AuthenticationFailed(NoEndpointAvailable):
    """A node refused this client's key, or the CURVE handshake failed (wrong server key,
    or keys on one side only). Subclasses NoEndpointAvailable: the request went nowhere."""
