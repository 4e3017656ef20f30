"""What every part of a node reads: its config, engine, peer table, log and counters.

One `NodeContext` per node, made by the actor and handed to each part; it owns no
behaviour beyond counting an event (the `Status` counters and the Prometheus metric
together) and naming a tenant's cache namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zmesh.blocks import tenant_namespace
from zmesh.config import NodeConfig
from zmesh.engine import Engine
from zmesh.metrics import NodeMetrics
from zmesh.peers import PeerTable


@dataclass(eq=False, slots=True)
class NodeContext:
    config: NodeConfig
    engine: Engine
    peers: PeerTable
    metrics: NodeMetrics
    log: Any  # structlog logger bound to node_id
    counters: dict[str, int] = field(default_factory=dict)
    shared_tenants: frozenset[str] = frozenset()

    @property
    def node_id(self) -> str:
        return self.config.node_id

    def count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        self.metrics.count(name, n)

    def namespace(self, tenant: str) -> str:
        """The cache namespace of a tenant: its own, or the one the tenant_shared share."""
        return tenant_namespace(tenant, self.shared_tenants)
