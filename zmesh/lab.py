"""Local lab: N real node processes on loopback, started, converged and stopped cleanly.

Used by `zmesh lab`, by the multi-node tests and by the benchmarks. Each node runs
`python -m zmesh node --config <file>` with JSON logs to `<workdir>/<node>.log`.

Faults can be injected at run time without restarting a node (zmesh/faults.py):
`partition(i)` / `heal(i)` cut node i off from every other node and back,
`set_delay(i, ms)` slows every message node i sends to its peers, `set_faults(i, ...)`
sets any of them (and `drop_deltas`); `wait_faults()` returns once the nodes apply them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from zmesh import protocol as P
from zmesh.client import AsyncClient, ZmeshError
from zmesh.config import config_from_dict, dump_toml
from zmesh.faults import parse_faults

NODE_NAMES = "abcdefghijklmnopqrstuvwxyz"
# What `zmesh lab` says when it runs without --keys (docs/security.md, "Turning keys on").
KEYLESS_NOTE = (
    "running WITHOUT keys: anyone who can reach these ports (on this host: every local "
    "user and process) is trusted; they can join the mesh, read its gossip, claim load "
    "figures and send requests. Use --keys on a shared host."
)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the OS says are free right now (tests run labs side by side)."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def node_name(i: int) -> str:
    return f"node-{NODE_NAMES[i]}" if i < len(NODE_NAMES) else f"node-{i}"


@dataclass
class LabNode:
    name: str
    serve: str
    gossip: str
    config_path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    http: str | None = None  # base URL of its OpenAI-compatible API (None: off)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def converged(statuses: Sequence[P.Status]) -> bool:
    """Every node sees every other alive, at that node's own epoch, seq and size."""
    by_id = {s.node_id: s for s in statuses}
    for s in statuses:
        seen = {p.node_id: p for p in s.peers}
        for other in statuses:
            if other.node_id == s.node_id:
                continue
            p = seen.get(other.node_id)
            if (
                p is None
                or p.state != "alive"
                or p.epoch != other.epoch
                or p.seq != other.seq
                or p.n_blocks != other.n_blocks
            ):
                return False
    return len(by_id) == len(statuses)


@dataclass
class Lab:
    n_nodes: int = 3
    host: str = "127.0.0.1"
    base_port: int | None = None  # None: free ports chosen by the OS
    policy: str = "zmesh"
    engine: dict[str, Any] = field(default_factory=dict)  # EngineConfig overrides
    gossip: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] = field(default_factory=dict)
    workdir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_seeds: list[dict[str, str]] = field(default_factory=list)  # {"serve":..,"gossip":..}
    # "ring": node i is seeded with node i+1; "star": every node with node 0 only, and
    # node 0 with none, so node 0 hears of the others only when they announce themselves.
    topology: str = "ring"
    # CurveZMQ: keys=True writes a key pair per node and one for the lab's client
    # ("client") into keys_dir (default <workdir>/keys; existing pairs are reused), and
    # every node allows exactly those keys. `client_kwargs()` are the Client's options.
    keys: bool = False
    keys_dir: Path | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)  # top-level config keys
    nodes: list[LabNode] = field(default_factory=list)
    # Run-time faults written to each node's control file, by node index.
    faults: dict[int, dict[str, Any]] = field(default_factory=dict)
    http: bool = True  # each node serves the OpenAI-compatible HTTP API (zmesh/http/)
    http_keys: list[dict[str, Any]] = field(default_factory=list)  # [http] api_keys

    def __post_init__(self) -> None:
        if self.n_nodes < 1:
            raise ValueError("a lab needs at least one node")
        if self.topology not in ("ring", "star"):
            raise ValueError(f"topology must be 'ring' or 'star', got {self.topology!r}")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="zmesh-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.keys and not self.http_keys:
            self.http = False  # a node with CURVE serves HTTP only to API keys
        if self.base_port is None:
            ports = free_ports(3 * self.n_nodes, self.host)
            http_ports = ports[2 * self.n_nodes :]
        else:
            ports = [self.base_port + 10 * (i // 2) + (i % 2) for i in range(2 * self.n_nodes)]
            http_ports = [self.base_port + 10 * i + 8 for i in range(self.n_nodes)]
        for i in range(self.n_nodes):
            name = node_name(i)
            self.nodes.append(
                LabNode(
                    name=name,
                    serve=f"tcp://{self.host}:{ports[2 * i]}",
                    gossip=f"tcp://{self.host}:{ports[2 * i + 1]}",
                    config_path=self.workdir / f"{name}.toml",
                    log_path=self.workdir / f"{name}.log",
                    http=f"http://{self.host}:{http_ports[i]}" if self.http else None,
                )
            )
        if self.keys:
            self._make_keys()
        for i, node in enumerate(self.nodes):
            node.config_path.write_text(dump_toml(self.node_config(i)))

    def _make_keys(self) -> None:
        from zmesh.security import generate

        assert self.workdir is not None
        self.keys_dir = Path(self.keys_dir or self.workdir / "keys").resolve()
        for name, role in [*((n.name, "node") for n in self.nodes), ("client", "client")]:
            if not (self.keys_dir / f"{name}.key_secret").exists():
                generate(self.keys_dir, name, role=role)

    def public_key(self, i: int) -> str:
        """Node i's public certificate file (keys=True)."""
        assert self.keys_dir is not None, "the lab runs without keys"
        return str(self.keys_dir / f"{self.nodes[i].name}.key")

    def client_kwargs(self) -> dict[str, Any]:
        """Client / AsyncClient options that reach this lab (keys for a keyed lab)."""
        if not self.keys:
            return {}
        assert self.keys_dir is not None
        return {
            "client_key": str(self.keys_dir / "client.key_secret"),
            "server_key": {n.serve: self.public_key(i) for i, n in enumerate(self.nodes)},
        }

    def node_config(self, i: int) -> Any:
        me = self.nodes[i]
        # One seed per node at most: the rest is learned by gossip.
        seed = (i + 1) % self.n_nodes if self.topology == "ring" else 0
        seeds: list[dict[str, str]] = (
            []
            if seed == i
            else [{"serve": self.nodes[seed].serve, "gossip": self.nodes[seed].gossip}]
        )
        security: dict[str, Any] = {}
        if self.keys:
            assert self.keys_dir is not None
            for s in seeds:
                s["public_key"] = self.public_key(seed)
            security = {
                "secret_key_file": str(self.keys_dir / f"{me.name}.key_secret"),
                "authorized_dir": str(self.keys_dir),
            }
        seeds += self.extra_seeds
        faults = {**self.extra_config.get("faults", {}), "control_file": str(self.faults_path(i))}
        http = dict(self.extra_config.get("http", {}))
        if me.http:
            http.update(port=int(me.http.rsplit(":", 1)[1]), api_keys=self.http_keys)
        return config_from_dict(
            {
                **self.extra_config,
                "faults": faults,
                "http": http,
                "security": security,
                "node_id": me.name,
                "serve_addr": me.serve,
                "gossip_addr": me.gossip,
                "seeds": seeds,
                "engine": dict(self.engine),
                "gossip": dict(self.gossip),
                "routing": {"policy": self.policy, **self.routing},
            },
            source=f"lab {me.name}",
        )

    @property
    def endpoints(self) -> list[str]:
        return [n.serve for n in self.nodes]

    @property
    def http_urls(self) -> list[str]:
        """Each node's OpenAI-compatible API (``base_url`` is URL + "/v1")."""
        return [n.http for n in self.nodes if n.http]

    # ---- processes ---------------------------------------------------------

    def start(self) -> None:
        for i in range(self.n_nodes):
            self.start_node(i)

    def start_node(self, i: int) -> None:
        node = self.nodes[i]
        if node.alive:
            return
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        log = node.log_path.open("ab")
        node.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "zmesh",
                "node",
                "--config",
                str(node.config_path),
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        log.close()

    def kill_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[i]
        if node.proc is not None and node.proc.poll() is None:
            node.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node, then SIGKILL whatever is still up after ``timeout``."""
        for node in self.nodes:
            if node.alive:
                node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        give_up = time.monotonic() + timeout
        for node in self.nodes:
            if node.proc is None:
                continue
            try:
                node.proc.wait(timeout=max(0.1, give_up - time.monotonic()))
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=5)

    def __enter__(self) -> Lab:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- fault injection (zmesh/faults.py) -------------------------------------

    def faults_path(self, i: int) -> Path:
        """Node i's fault control file (JSON), checked by the node every heartbeat."""
        assert self.workdir is not None
        return self.workdir.resolve() / f"{self.nodes[i].name}.faults.json"

    def set_faults(self, i: int, **changes: Any) -> P.FaultSettings:
        """Change node i's faults at run time: any of delay_ms, partition (peer node
        ids), drop_deltas. Returns what node i will apply (see `wait_faults`)."""
        wanted = {**self.faults.get(i, {}), **changes}
        data = json.dumps(wanted).encode()
        settings = parse_faults(data, self._base_faults(i))  # refuse bad values here
        path = self.faults_path(i)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: the node never reads half a file
        self.faults[i] = wanted
        return settings

    def set_delay(self, i: int, ms: float) -> None:
        """Add ``ms`` to every message node i sends to its peers."""
        self.set_faults(i, delay_ms=ms)

    def partition(self, i: int) -> None:
        """Cut node i off from every other node, both ways (gossip, forwards, pings)."""
        self._cut(i, add=True)

    def heal(self, i: int) -> None:
        """Undo `partition(i)`."""
        self._cut(i, add=False)

    def _cut(self, i: int, add: bool) -> None:
        me = self.nodes[i].name
        for j, other in enumerate(self.nodes):
            if j == i:
                continue
            for a, b in ((i, other.name), (j, me)):
                cut = set(self.faults.get(a, {}).get("partition", []))
                self.set_faults(a, partition=sorted(cut | {b} if add else cut - {b}))

    def _base_faults(self, i: int) -> P.FaultSettings:
        cfg = self.node_config(i)
        return P.FaultSettings(
            delay_ms=cfg.faults.delay_ms,
            partition=list(cfg.faults.partition),
            drop_deltas=cfg.gossip.drop_deltas,
        )

    def expected_faults(self, i: int) -> P.FaultSettings:
        """What node i should report in `Status.faults` once it read its control file."""
        return parse_faults(json.dumps(self.faults.get(i, {})).encode(), self._base_faults(i))

    async def wait_faults(self, timeout: float = 10.0) -> float:
        """Seconds until every running node reports the faults the lab wrote for it."""
        t0 = time.monotonic()
        idx = [i for i, n in enumerate(self.nodes) if n.alive]
        while True:
            with contextlib.suppress(ZmeshError):
                sts = await self.statuses(idx, timeout=1.0)
                if all(
                    _same_faults(st.faults, self.expected_faults(i))
                    for i, st in zip(idx, sts, strict=True)
                ):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"nodes did not apply their faults within {timeout}s")
            await asyncio.sleep(0.05)

    # ---- convergence ---------------------------------------------------------

    async def statuses(
        self, indices: Sequence[int] | None = None, timeout: float = 2.0
    ) -> list[P.Status]:
        idx = range(self.n_nodes) if indices is None else indices
        async with AsyncClient(
            self.endpoints, connect_timeout=timeout, **self.client_kwargs()
        ) as c:
            return list(
                await asyncio.gather(*(c.status(self.nodes[i].serve, timeout=timeout) for i in idx))
            )

    async def wait_converged(
        self,
        timeout: float = 120.0,
        indices: Sequence[int] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> float:
        """Seconds until every (listed) node's estimates match the others' own state
        and its HTTP API (if on) answers: a node answers `Status` before its HTTP
        front listens, and a test's first HTTP call must not race that."""
        t0 = time.monotonic()
        idx = list(range(self.n_nodes)) if indices is None else list(indices)
        last = ""
        while True:
            for i in idx:
                node = self.nodes[i]
                if node.proc is not None and node.proc.poll() is not None:
                    raise RuntimeError(
                        f"{node.name} exited with {node.proc.returncode}; see {node.log_path}"
                    )
            try:
                sts = await self.statuses(idx, timeout=1.0)
                if converged(sts):
                    urls = [u for i in idx if (u := self.nodes[i].http)]
                    answers = await asyncio.gather(*(http_answers(u, 1.0) for u in urls))
                    if all(answers):
                        return time.monotonic() - t0
                    msg = "converged, waiting for the HTTP API to listen"
                else:
                    msg = "nodes up, waiting for gossip to converge"
            except ZmeshError:
                msg = "waiting for nodes to load the model and bind"
            if progress and msg != last:
                progress(msg)
                last = msg
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(
                    f"lab did not converge within {timeout}s; logs in {self.workdir}"
                )
            await asyncio.sleep(0.1)


async def http_answers(url: str, timeout: float) -> bool:
    """Whether an HTTP server answers at ``url`` (any status: a node's /health says
    503 until it has joined; the fact wanted is that it listens and replies)."""
    u = urlsplit(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(u.hostname, u.port), timeout
        )
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(b"GET /health HTTP/1.0\r\nHost: lab\r\n\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        return line.startswith(b"HTTP/1.")
    except (OSError, TimeoutError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _same_faults(a: P.FaultSettings, b: P.FaultSettings) -> bool:
    return (a.delay_ms, sorted(a.partition), a.drop_deltas) == (
        b.delay_ms,
        sorted(b.partition),
        b.drop_deltas,
    )
