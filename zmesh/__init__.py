"""zmesh: a decentralized, prefix-cache-aware LLM serving mesh.

The public client API lives here; nodes run with `zmesh node` / `zmesh lab`.
"""

from zmesh.client import (
    AsyncClient,
    AuthenticationFailed,
    Client,
    Completion,
    NoEndpointAvailable,
    RequestError,
    RequestTimeout,
    ZmeshError,
)
from zmesh.protocol import Chunk, Done, SamplingParams

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AuthenticationFailed",
    "Chunk",
    "Client",
    "Completion",
    "Done",
    "NoEndpointAvailable",
    "RequestError",
    "RequestTimeout",
    "SamplingParams",
    "ZmeshError",
    "__version__",
]
