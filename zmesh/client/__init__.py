"""Client library: any node is an entry point; failover to the next one when it is down.

    from zmesh import Client
    with Client(["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5565"]) as c:
        done = c.generate("The capital of France is", max_tokens=8)
        print(done.text, done.served_by, done.cached_tokens, done.route_reason)

`AsyncClient` is the same API for asyncio code. One DEALER socket per endpoint with
ZMQ_IMMEDIATE, so a request is never queued for a node that is not connected.

A mesh that runs with keys (CurveZMQ) needs the client's key pair and each node's
public key: `Client(endpoints, client_key="keys/app.key_secret",
server_key={"tcp://10.0.0.1:5555": "keys/node-a.key", ...})` (one key or file for
every endpoint also works). A node that does not know the client's key refuses the
handshake: the client raises `AuthenticationFailed` at once.

The parts: errors.py, endpoint.py (one node's socket, monitor and health), shown.py
(what a stream has delivered, across retries), async_client.py (`AsyncClient` and
failover), sync_client.py (`Client`).
"""

from zmesh.client.async_client import AsyncClient
from zmesh.client.endpoint import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, HEARTBEAT_TTL_MS
from zmesh.client.errors import (
    AuthenticationFailed,
    Completion,
    NoEndpointAvailable,
    RequestError,
    RequestTimeout,
    ZmeshError,
)
from zmesh.client.sync_client import Client

__all__ = [
    "HEARTBEAT_IVL_MS",
    "HEARTBEAT_TIMEOUT_MS",
    "HEARTBEAT_TTL_MS",
    "AsyncClient",
    "AuthenticationFailed",
    "Client",
    "Completion",
    "NoEndpointAvailable",
    "RequestError",
    "RequestTimeout",
    "ZmeshError",
]
