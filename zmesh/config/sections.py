"""The node config's sections, one Struct each: [engine], [gossip], [faults], [[seeds]],
[security], [http], [runtime]. [routing] has a module of its own (zmesh/config/routing.py).

Each validates itself in `__post_init__`, so a section that exists is valid.
"""

from __future__ import annotations

import math

import msgspec

from zmesh.config.checks import _check_addr, _check_positive, _fail
from zmesh.faults import fault_problem
from zmesh.protocol import FaultSettings
from zmesh.security import SecurityError, load_authorized, load_keypair, load_public_key


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
    # Prompt tokens prefilled per step while other slots decode: a long prompt
    # delays each of their tokens by one chunk, never by its whole prefill.
    prefill_chunk: int = 128
    max_running: int = 0  # requests decoding at once; 0: n_slots, 1: one at a time

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
        if self.prefill_chunk < 1:
            _fail("prefill_chunk", f"must be >= 1, got {self.prefill_chunk}")
        if self.max_running < 0:
            _fail("max_running", f"must be >= 0 (0 = n_slots), got {self.max_running}")
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


class RuntimeConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The interpreter settings a node process runs under (zmesh/node/runtime.py).

    A node's loop thread shares the GIL with the engine thread (and the tokenizer's):
    with CPython's default switch interval (5 ms) a reply the loop could send at once
    may wait up to 5 ms for the GIL while another thread runs Python. A shorter
    interval bounds that wait, at the cost of more GIL handoffs; measured at 0.5 ms it
    changed neither the hop's p99 (within noise) nor tokens/s (docs/evaluation.md), so
    it is off by default. ``gc_freeze`` moves everything alive once
    the node is up (model, modules, config) out of the collector's sight, so a
    collection scans only what requests allocated since.
    """

    switch_interval_ms: float = 0.0  # sys.setswitchinterval; 0: leave Python's (5 ms)
    gc_freeze: bool = True  # gc.freeze() once the node is up

    def __post_init__(self) -> None:
        if not (0 <= self.switch_interval_ms <= 100 and math.isfinite(self.switch_interval_ms)):
            _fail(
                "switch_interval_ms",
                f"must be in 0..100 ms (0 = Python's default), got {self.switch_interval_ms}",
            )
        if 0 < self.switch_interval_ms < 0.05:
            # Below ~50 us the GIL changes hands faster than a step's Python can run.
            _fail("switch_interval_ms", f"must be >= 0.05 ms or 0, got {self.switch_interval_ms}")
