"""Node configuration: TOML -> typed, validated msgspec Structs.

A `NodeConfig` that exists is valid: range and cross-field checks run in
`__post_init__`, so they apply to configs built in code as well as loaded ones.
Every error a user can cause is a `ConfigError` naming the source file and the
dotted key (`configs/x.toml: engine.n_slots: expected int, got str`).

Environment overrides: `ZMESH_<KEY>` sets a top-level key, a double underscore
nests (`ZMESH_ENGINE__N_SLOTS=4`, `ZMESH_GOSSIP__DEAD_AFTER_S=5`). String keys take
the value verbatim; other keys parse it as a TOML value (`4`, `true`, `0.5`,
`[{serve = "tcp://h:1", gossip = "tcp://h:2"}]`). An empty value resets an
optional string key to its default (None). Every `ZMESH_*` variable is taken as
an override, so a misspelt one is an error rather than silently ignored.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
import tomllib
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn, Union, get_args, get_origin

import msgspec

from zmesh.candidates import DEFAULT_HASH_PREFIX_TOKENS
from zmesh.faults import fault_problem
from zmesh.log import LEVELS
from zmesh.protocol import MAX_PROGRESS_INTERVAL_S, FaultSettings
from zmesh.routing import POLICIES, RoutingSettings, SettingError
from zmesh.security import SecurityError, load_authorized, load_keypair, load_public_key

__all__ = [
    "ENV_PREFIX",
    "LOG_LEVELS",
    "ConfigError",
    "EngineConfig",
    "FaultsConfig",
    "GossipConfig",
    "HttpApiKey",
    "HttpConfig",
    "NodeConfig",
    "RoutingConfig",
    "SecurityConfig",
    "Seed",
    "apply_env_overrides",
    "check_address",
    "config_from_dict",
    "dump_toml",
    "load_config",
]

ENV_PREFIX = "ZMESH_"
LOG_LEVELS = tuple(LEVELS)
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")
_TCP_RE = re.compile(r"tcp://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+):(?P<port>[0-9]+)")
_NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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


class EngineConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model_path: str | None = None  # None: the packaged default GGUF
    n_slots: int = 8  # KV slots = cached prefixes held at once
    slot_ctx: int = 2048  # max tokens (prompt + completion) per slot
    n_batch: int = 512
    n_threads: int = 0  # 0: os.cpu_count()
    n_gpu_layers: int = 0  # -1: all
    block_size: int = 16  # tokens per advertised block
    max_prompt_tokens: int = 0  # 0: slot_ctx - 1
    # A text prompt longer than this many characters per allowed token is refused
    # before it is tokenized (tokenizing megabytes takes seconds).
    prompt_chars_per_token: int = 32

    def __post_init__(self) -> None:
        if self.model_path is not None and not self.model_path:
            _fail("model_path", "must be a path or left out")
        if self.n_slots < 1:
            _fail("n_slots", f"must be >= 1, got {self.n_slots}")
        if self.slot_ctx < 64:
            _fail("slot_ctx", f"must be >= 64, got {self.slot_ctx}")
        if self.n_batch < 1:
            _fail("n_batch", f"must be >= 1, got {self.n_batch}")
        if self.n_threads < 0:
            _fail("n_threads", f"must be >= 0 (0 = all cores), got {self.n_threads}")
        if self.n_gpu_layers < -1:
            _fail("n_gpu_layers", f"must be >= -1 (-1 = all), got {self.n_gpu_layers}")
        if not 1 <= self.block_size <= 1024:
            _fail("block_size", f"must be in 1..1024, got {self.block_size}")
        if not 0 <= self.max_prompt_tokens < self.slot_ctx:
            _fail(
                "max_prompt_tokens",
                f"must be in 0..slot_ctx-1 ({self.slot_ctx - 1}), got {self.max_prompt_tokens}",
            )
        if not 1 <= self.prompt_chars_per_token <= 4096:
            _fail(
                "prompt_chars_per_token", f"must be in 1..4096, got {self.prompt_chars_per_token}"
            )


FORGET_AFTER_DEAD = 4.0  # default gossip.forget_after_s, in units of dead_after_s


class GossipConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    heartbeat_interval_s: float = 0.2
    delta_interval_s: float = 0.03
    suspect_after_s: float = 1.0  # silent this long: not routed to
    dead_after_s: float = 3.0  # silent this long: estimate dropped
    # Silent this long: forgotten (table entry, DEALER and subscription dropped), so
    # dead names do not fill max_peers. 0: FORGET_AFTER_DEAD times dead_after_s.
    forget_after_s: float = 0.0
    snapshot_timeout_s: float = 2.0
    ping_interval_s: float = 1.0
    # Peers this node keeps at most. Peers are learned from other peers' heartbeats,
    # so without a bound one bad (or buggy) peer could make a keyless node hold and
    # connect to any number of made-up ones.
    max_peers: int = 1024
    # Fault injection (tests and labs): drop this fraction of outgoing cache deltas,
    # so anti-entropy (gap detection + snapshots) has something to repair.
    drop_deltas: float = 0.0

    @property
    def forget_s(self) -> float:
        """forget_after_s in effect (its default follows dead_after_s)."""
        return self.forget_after_s or FORGET_AFTER_DEAD * self.dead_after_s

    def __post_init__(self) -> None:
        if not 0.0 <= self.drop_deltas <= 1.0:
            _fail("drop_deltas", f"must be in 0..1, got {self.drop_deltas}")
        _check_positive(
            self,
            "heartbeat_interval_s",
            "delta_interval_s",
            "suspect_after_s",
            "dead_after_s",
            "snapshot_timeout_s",
            "ping_interval_s",
        )
        if self.max_peers < 1:
            _fail("max_peers", f"must be at least 1, got {self.max_peers}")
        if self.forget_after_s != 0.0 and not self.forget_after_s > self.dead_after_s:
            _fail(
                "forget_after_s",
                f"must be 0 (= {FORGET_AFTER_DEAD:g} x dead_after_s) or more than "
                f"dead_after_s ({self.dead_after_s}), got {self.forget_after_s}",
            )
        if self.suspect_after_s >= self.dead_after_s:
            _fail(
                "suspect_after_s",
                f"must be less than dead_after_s ({self.dead_after_s}), got {self.suspect_after_s}",
            )
        if self.heartbeat_interval_s >= self.suspect_after_s:
            # Otherwise every healthy peer would flap to suspect between heartbeats.
            _fail(
                "heartbeat_interval_s",
                f"must be less than suspect_after_s ({self.suspect_after_s}), "
                f"got {self.heartbeat_interval_s}",
            )


_ROUTING = RoutingSettings()  # the one source of the policy knobs' defaults


class RoutingConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # The policy knobs (zmesh.routing.RoutingSettings: defaults and checks live there).
    policy: str = _ROUTING.policy
    max_hops: int = _ROUTING.max_hops
    min_gain_s: float = _ROUTING.min_gain_s  # forward only if the peer is this much sooner
    min_gain_frac: float = _ROUTING.min_gain_frac  # ...and by this fraction of local's estimate
    place_slack_frac: float = _ROUTING.place_slack_frac  # this close to the best: placed by hash
    balance_abs: int = _ROUTING.balance_abs
    balance_rel: float = _ROUTING.balance_rel
    # KV shipping (zmesh policy; routing/shipping.py): pull a peer's cached prefix and
    # serve here when that is predicted sooner than prefilling here or forwarding.
    ship: bool = _ROUTING.ship
    ship_min_tokens: int = _ROUTING.ship_min_tokens  # smaller gains are not worth a transfer
    # The node's own.
    # To a peer's first reply (then serve locally); after a Progress frame, as long as
    # the peer keeps sending them (and stays alive), up to the request's deadline.
    forward_timeout_s: float = 5.0
    # Period of the Progress keep-alives this node sends for a forwarded request it
    # holds (queued or running); at most protocol.MAX_PROGRESS_INTERVAL_S.
    progress_interval_s: float = 1.0
    hash_prefix_tokens: int = DEFAULT_HASH_PREFIX_TOKENS  # consistent_hash: prompt head hashed
    ship_timeout_s: float = 5.0  # a fetch not complete by then is prefilled locally
    ship_max_mb: float = 64.0  # largest KV state this node fetches or serves
    # Start values until the first measurement replaces them (kvtransfer.ShipCosts).
    ship_bandwidth_mbps: float = 1000.0  # a link never measured, megabits per second
    ship_bytes_per_token: float = 20_000.0  # gemma-3-270m: 18.5 KB per token measured
    ship_import_s_per_mb: float = 0.002  # loading state into llama.cpp (1.7 ms/MB measured)
    # Holder-side admission (routing/admission.py): a forward carries the latest first
    # token its forwarder still prefers; a peer predicting a later one refuses it (busy)
    # and the forwarder asks the runner-up, up to admit_retries times, then serves it.
    admission: bool = _ROUTING.admission
    admit_retries: int = _ROUTING.admit_retries
    admit_slack_frac: float = _ROUTING.admit_slack_frac  # the bar is raised by this fraction
    admit_slack_s: float = _ROUTING.admit_slack_s  # of itself, and by these seconds

    def settings(self, **node: Any) -> RoutingSettings:
        """The policy knobs as `decide` takes them; ``node``: what the node adds
        (``ship_max_tokens`` from its engine, ``give_up_s``)."""
        return RoutingSettings(
            policy=self.policy,
            max_hops=self.max_hops,
            min_gain_s=self.min_gain_s,
            min_gain_frac=self.min_gain_frac,
            place_slack_frac=self.place_slack_frac,
            balance_abs=self.balance_abs,
            balance_rel=self.balance_rel,
            ship=self.ship,
            ship_min_tokens=self.ship_min_tokens,
            admission=self.admission,
            admit_retries=self.admit_retries,
            admit_slack_frac=self.admit_slack_frac,
            admit_slack_s=self.admit_slack_s,
            **node,
        )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            _fail("policy", f"unknown policy {self.policy!r}; known: {', '.join(POLICIES)}")
        try:
            self.settings()
        except SettingError as exc:
            _fail(exc.name, exc.reason)
        _check_positive(self, "forward_timeout_s", "progress_interval_s")
        if self.progress_interval_s > MAX_PROGRESS_INTERVAL_S:
            _fail(
                "progress_interval_s",
                f"must be at most {MAX_PROGRESS_INTERVAL_S}, got {self.progress_interval_s}",
            )
        if self.hash_prefix_tokens < 1:
            _fail("hash_prefix_tokens", f"must be >= 1, got {self.hash_prefix_tokens}")
        _check_positive(
            self,
            "ship_timeout_s",
            "ship_max_mb",
            "ship_bandwidth_mbps",
            "ship_bytes_per_token",
            "ship_import_s_per_mb",
        )


class FaultsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fault injection for labs and tests (zmesh/faults.py); leave it off in production."""

    delay_ms: float = 0.0  # added to every message this node sends to a peer
    partition: list[str] = []  # peer node ids cut off both ways
    control_file: str | None = None  # JSON file checked every heartbeat: run-time changes

    def __post_init__(self) -> None:
        problem = fault_problem(FaultSettings(delay_ms=self.delay_ms, partition=self.partition))
        if problem is not None:
            _fail(*problem)
        if self.control_file is not None and not self.control_file:
            _fail("control_file", "must be a path or left out")


class Seed(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A peer to contact at start; the rest of the mesh is learned by gossip."""

    serve: str
    gossip: str
    # The peer's CURVE public key (40 Z85 chars, or its certificate file); required
    # when [security] is on, since a CURVE client must know the server's key.
    public_key: str | None = None

    def __post_init__(self) -> None:
        _check_addr("serve", self.serve, bind=False)
        _check_addr("gossip", self.gossip, bind=False)
        if self.public_key is not None:
            try:
                load_public_key(self.public_key)
            except SecurityError as exc:
                _fail("public_key", str(exc))


class SecurityConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """CurveZMQ on every socket, when this node has a key pair (see zmesh/security.py)."""

    secret_key_file: str | None = None  # this node's NAME.key_secret; None: no CURVE
    authorized_dir: str | None = None  # public certificates (*.key) allowed to connect
    authorized_keys: list[str] = []  # more allowed public keys (Z85), taken as nodes

    def __post_init__(self) -> None:
        for i, key in enumerate(self.authorized_keys):
            try:
                load_authorized(None, [key])
            except SecurityError:
                _fail("authorized_keys", f"[{i}] is not a 40-character Z85 CURVE key")
        if self.secret_key_file is None:
            if self.authorized_dir is not None or self.authorized_keys:
                _fail(
                    "secret_key_file",
                    "required when authorized_dir or authorized_keys is set "
                    "(CURVE needs this node's key pair; `zmesh keys gen NAME`)",
                )
            return
        try:
            load_keypair(self.secret_key_file)
        except SecurityError as exc:
            _fail("secret_key_file", str(exc))
        if self.authorized_dir is not None:
            try:
                load_authorized(self.authorized_dir)
            except SecurityError as exc:
                _fail("authorized_dir", str(exc))

    @property
    def enabled(self) -> bool:
        return self.secret_key_file is not None


class HttpApiKey(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One `Authorization: Bearer` key of the HTTP API and the tenants it may use."""

    key: str  # the bearer token itself; keep the config file private (mode 0600)
    tenants: list[str] = msgspec.field(
        default_factory=lambda: ["default"]
    )  # the first is used unless x-zmesh-tenant names another
    name: str | None = None  # for logs; default: the key's first 4 characters

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            _fail("key", "must be at least 16 characters")
        if not self.tenants or any(not 1 <= len(t) <= 64 for t in self.tenants):
            _fail("tenants", "must list 1..64-character tenant names")


class HttpConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The OpenAI-compatible HTTP API of the node (zmesh/http/); off unless port > 0."""

    port: int = 0
    host: str | None = None  # default: serve_addr's host (loopback stays loopback)
    model_name: str | None = None  # the model id callers name; default: the GGUF file stem
    chat_template: str | None = None  # llama.cpp template name or text; default: the GGUF's
    # Empty: no key asked; a caller names its tenant (x-zmesh-tenant), default "default".
    api_keys: list[HttpApiKey] = []
    max_body_bytes: int = 4 * 1024 * 1024
    timeout_s: float = 600.0  # a request's deadline, as the ZeroMQ client's timeout

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            _fail("port", f"must be in 0..65535 (0 = off), got {self.port}")
        if self.max_body_bytes < 1024:
            _fail("max_body_bytes", f"must be >= 1024, got {self.max_body_bytes}")
        _check_positive(self, "timeout_s")
        if len({k.key for k in self.api_keys}) != len(self.api_keys):
            _fail("api_keys", "keys must be distinct")


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


# ---- schema walking (for error paths and env overrides) -----------------------------


def _fields(cls: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(cls)}


def _as_struct(tp: Any) -> type[msgspec.Struct] | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _struct_at(path: str) -> type[msgspec.Struct] | None:
    """The Struct type at a dotted path like `seeds[0]` or `engine`, if any."""
    cls: type[msgspec.Struct] | None = NodeConfig
    for part in filter(None, path.split(".")):
        name, indexed = part.split("[", 1)[0], "[" in part
        tp = _fields(cls).get(name) if cls else None
        if indexed and get_origin(tp) is list:
            tp = get_args(tp)[0]
        cls = _as_struct(tp)
    return cls


def _is_str_type(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) in (Union, types.UnionType):
        return all(a is str or a is type(None) for a in get_args(tp))
    return False


# ---- msgspec errors -> ConfigError -------------------------------------------------

_AT_RE = re.compile(r"(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?", re.DOTALL)
_UNKNOWN_RE = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")
_MISSING_RE = re.compile(r"Object missing required field `(?P<key>[^`]*)`")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _translate(exc: msgspec.ValidationError) -> tuple[str | None, str]:
    """(dotted key, message) for a msgspec validation error."""
    m = _AT_RE.fullmatch(str(exc))
    assert m is not None  # the pattern matches any string
    msg, path = m["msg"], (m["path"] or "").lstrip(".")
    if um := _UNKNOWN_RE.fullmatch(msg):
        key = um["key"]
        text = f"unknown key '{key}' in {path or 'the top level'}"
        cls = _struct_at(path)
        if cls is not None and (near := difflib.get_close_matches(key, _fields(cls), n=1)):
            text += f" (did you mean '{near[0]}'?)"
        return _join(path, key), text
    if mm := _MISSING_RE.fullmatch(msg):
        return _join(path, mm["key"]), "missing required key"
    if msg.startswith("Expected"):
        text = msg.replace("`object`", "table").replace("`", "")
        return path or None, text[0].lower() + text[1:]
    # A __post_init__ ValueError: "field: why", raised inside the struct at `path`.
    field, sep, why = msg.partition(": ")
    cls = _struct_at(path)
    if sep and cls is not None and field in _fields(cls):
        return _join(path, field), why
    return path or None, msg


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> NodeConfig:
    """Build a validated NodeConfig from plain data (a parsed TOML document)."""
    try:
        return msgspec.convert(d, NodeConfig)
    except msgspec.ValidationError as exc:
        key, message = _translate(exc)
        raise ConfigError(source, key, message) from None


# ---- environment overrides ---------------------------------------------------------


def _env_value(raw: str, tp: Any) -> Any:
    if _is_str_type(tp):
        return None if raw == "" and tp is not str else raw
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw  # let type checking report it: "expected int, got str"
    return value if isinstance(value, str | int | float | bool | list | dict) else raw


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    """(variable, key path, value) for each ZMESH_* variable, in name order."""
    out = []
    for name in sorted(environ):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = tuple(name[len(ENV_PREFIX) :].lower().split("__"))
        cls: type[msgspec.Struct] | None = NodeConfig
        tp: Any = None
        for i, part in enumerate(parts):
            if cls is None:
                raise ConfigError("environment", name, f"'{'.'.join(parts[:i])}' is not a table")
            fields = _fields(cls)
            if part not in fields:
                dotted = ".".join(parts)
                raise ConfigError("environment", name, f"unknown config key '{dotted}'")
            tp = fields[part]
            cls = _as_struct(tp)
        out.append((name, parts, _env_value(environ[name], tp)))
    return out


def apply_env_overrides(d: Mapping[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of the config dict `d` with `ZMESH_*` variables from `environ` applied."""
    out = copy.deepcopy(dict(d))
    for name, parts, value in _env_overrides(environ):
        table = out
        for part in parts[:-1]:
            sub = table.setdefault(part, {})
            if not isinstance(sub, dict):
                raise ConfigError("environment", name, f"'{part}' is not a table in the config")
            table = sub
        table[parts[-1]] = value
    return out


# ---- loading -----------------------------------------------------------------------


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> NodeConfig:
    """Read a TOML node config; `ZMESH_*` from `env` (default os.environ) override it."""
    source = str(path)
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, None, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(source, None, f"not UTF-8 text: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, None, f"invalid TOML: {exc}") from None
    environ = os.environ if env is None else env
    overrides = _env_overrides(environ)
    data = apply_env_overrides(data, environ)
    try:
        return config_from_dict(data, source)
    except ConfigError as exc:
        # Point at the variable when the bad value came from the environment.
        for name, parts, _ in overrides:
            dotted = ".".join(parts)
            if exc.key and (exc.key == dotted or exc.key.startswith((dotted + ".", dotted + "["))):
                raise ConfigError(source, exc.key, f"{exc.message} (set by {name})") from None
        raise


# ---- writing -----------------------------------------------------------------------

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f"}
_ESCAPES["\r"] = "\\r"


def _toml_str(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_key(k: str) -> str:
    return k if _BARE_KEY_RE.fullmatch(k) else _toml_str(k)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):  # before int: bool is an int
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)  # 'inf', 'nan', '1e-05' are all valid TOML
    if isinstance(v, str):
        return _toml_str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as a TOML value")


def _is_table_list(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, msgspec.Struct) for x in v)


def _emit_table(obj: msgspec.Struct, prefix: str, lines: list[str]) -> None:
    """Scalars first, then [[arrays of tables]], then [sub.tables]: TOML's order."""
    items = [(f.name, getattr(obj, f.name)) for f in msgspec.structs.fields(obj)]
    items = [(k, v) for k, v in items if v is not None]  # TOML has no null: None = default
    for k, v in items:
        if not isinstance(v, msgspec.Struct) and not _is_table_list(v):
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
    for k, v in items:
        if _is_table_list(v):
            for item in v:
                lines.extend(["", f"[[{prefix}{_toml_key(k)}]]"])
                _emit_table(item, f"{prefix}{_toml_key(k)}.", lines)
    for k, v in items:
        if isinstance(v, msgspec.Struct):
            lines.extend(["", f"[{prefix}{_toml_key(k)}]"])
            _emit_table(v, f"{prefix}{_toml_key(k)}.", lines)


def dump_toml(cfg: msgspec.Struct) -> str:
    """TOML text for a config Struct (every key written); load_config reads it back equal."""
    lines: list[str] = []
    _emit_table(cfg, "", lines)
    return "\n".join(lines).lstrip("\n") + "\n"
