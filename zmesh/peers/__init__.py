"""Everything we know about our peers: membership, cache estimates, failure detection.

Sans-IO: no sockets and no clock; every input carries ``now`` (seconds, monotonic) and
every method returns plain data that the node turns into messages.

The parts: estimate.py (`PeerEstimate`: one peer's mirror, deltas and snapshot
repair) and table.py (`PeerTable`: membership and the failure detector).
"""

from zmesh.peers.estimate import (
    DEFAULT_BUFFER_LIMIT,
    IGNORED,
    NEED_SNAPSHOT,
    OK,
    PENDING,
    Action,
    PeerEstimate,
    PeerState,
)
from zmesh.peers.table import PeerEvent, PeerTable

__all__ = [
    "DEFAULT_BUFFER_LIMIT",
    "IGNORED",
    "NEED_SNAPSHOT",
    "OK",
    "PENDING",
    "Action",
    "PeerEstimate",
    "PeerEvent",
    "PeerState",
    "PeerTable",
]
