"""Node configuration: TOML -> typed, validated msgspec Structs.

A `NodeConfig` that exists is valid: range and cross-field checks run in
`__post_init__`, so they apply to configs built in code as well as loaded ones.
Every error a user can cause is a `ConfigError` naming the source file and the
dotted key (`configs/x.toml: engine.n_slots: expected int, got str`).

The parts: checks.py (the error type and shared checks), sections.py (one Struct
per table), routing.py ([routing]), node.py (`NodeConfig`), load.py (TOML and
`ZMESH_*` environment overrides -> `NodeConfig`), dump.py (`NodeConfig` -> TOML).
"""

from zmesh.config.checks import ConfigError, check_address
from zmesh.config.dump import dump_toml
from zmesh.config.load import ENV_PREFIX, apply_env_overrides, config_from_dict, load_config
from zmesh.config.node import LOG_LEVELS, NodeConfig
from zmesh.config.routing import RoutingConfig
from zmesh.config.sections import (
    FORGET_AFTER_DEAD,
    EngineConfig,
    FaultsConfig,
    GossipConfig,
    HttpApiKey,
    HttpConfig,
    RuntimeConfig,
    SecurityConfig,
    Seed,
)

__all__ = [
    "ENV_PREFIX",
    "FORGET_AFTER_DEAD",
    "LOG_LEVELS",
    "ConfigError",
    "EngineConfig",
    "FaultsConfig",
    "GossipConfig",
    "HttpApiKey",
    "HttpConfig",
    "NodeConfig",
    "RoutingConfig",
    "RuntimeConfig",
    "SecurityConfig",
    "Seed",
    "apply_env_overrides",
    "check_address",
    "config_from_dict",
    "dump_toml",
    "load_config",
]
