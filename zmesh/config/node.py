"""`NodeConfig`: the whole node config, its top-level keys and the checks across sections."""

from __future__ import annotations

import re

import msgspec

from zmesh.config.checks import _check_addr, _fail
from zmesh.config.routing import RoutingConfig
from zmesh.config.sections import (
    EngineConfig,
    FaultsConfig,
    GossipConfig,
    HttpConfig,
    RuntimeConfig,
    SecurityConfig,
    Seed,
)
from zmesh.log import LEVELS

LOG_LEVELS = tuple(LEVELS)

_NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class NodeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    node_id: str
    # Bind addresses. Named *_addr because `gossip` is the [gossip] timing table
    # (TOML cannot hold a key and a table of the same name).
    serve_addr: str
    gossip_addr: str
    # What peers connect to; defaults to the bind address (set when binding 0.0.0.0).
    advertise_serve: str | None = None
    advertise_gossip: str | None = None
    seeds: list[Seed] = []
    tenant_shared: list[str] = []  # tenants whose prefixes share one namespace
    max_queue: int = 64
    # Generate requests one client may have in flight here (0 = no limit); peers'
    # forwards are not counted. Beyond it: "too_many_requests".
    max_inflight_per_client: int = 32
    log_level: str = "info"
    metrics_port: int = 0  # Prometheus /metrics HTTP port; 0 = off
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    gossip: GossipConfig = msgspec.field(default_factory=GossipConfig)
    routing: RoutingConfig = msgspec.field(default_factory=RoutingConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    faults: FaultsConfig = msgspec.field(default_factory=FaultsConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    runtime: RuntimeConfig = msgspec.field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not _NODE_ID_RE.fullmatch(self.node_id):
            _fail("node_id", f"must be 1..64 of [A-Za-z0-9_.-], got {self.node_id!r}")
        _check_addr("serve_addr", self.serve_addr, bind=True)
        _check_addr("gossip_addr", self.gossip_addr, bind=True)
        if self.serve_addr == self.gossip_addr:
            _fail("gossip_addr", "must differ from serve_addr")
        if self.advertise_serve is not None:
            _check_addr("advertise_serve", self.advertise_serve, bind=False)
        if self.advertise_gossip is not None:
            _check_addr("advertise_gossip", self.advertise_gossip, bind=False)
        if any(not t for t in self.tenant_shared):
            _fail("tenant_shared", "tenant names must be non-empty")
        if self.security.enabled:
            for i, seed in enumerate(self.seeds):
                if seed.public_key is None:
                    _fail(
                        "seeds",
                        f"[{i}] ({seed.serve}) needs public_key: security.secret_key_file "
                        "is set, and a CURVE client must know its server's key",
                    )
        if self.max_queue < 1:
            _fail("max_queue", f"must be >= 1, got {self.max_queue}")
        if self.max_inflight_per_client < 0:
            _fail(
                "max_inflight_per_client",
                f"must be >= 0 (0 = no limit), got {self.max_inflight_per_client}",
            )
        if self.log_level not in LOG_LEVELS:
            _fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not 0 <= self.metrics_port <= 65535:
            _fail("metrics_port", f"must be in 0..65535 (0 = off), got {self.metrics_port}")
        if self.metrics_port and any(
            a.endswith(f":{self.metrics_port}") for a in (self.serve_addr, self.gossip_addr)
        ):
            _fail("metrics_port", f"{self.metrics_port} is also the serve or gossip port")
        if self.http.port and self.security.enabled and not self.http.api_keys:
            # Else HTTP callers would get past the CURVE allowlist with no key at all.
            _fail("http.api_keys", "required when [security] is on and http.port is set")

    @property
    def serve_endpoint(self) -> str:
        """The serve address peers and clients connect to."""
        return self.advertise_serve or self.serve_addr

    @property
    def gossip_endpoint(self) -> str:
        """The gossip address peers subscribe to."""
        return self.advertise_gossip or self.gossip_addr
