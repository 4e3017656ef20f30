"""Local lab: N real node processes on loopback, started, converged and stopped cleanly.

Used by `zmesh lab`, by the multi-node tests and by the benchmarks. Each node runs
`python -m zmesh node --config <file>` with JSON logs to `<workdir>/<node>.log`.
"""

from __future__ import annotations

import asyncio
import contextlib
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

from zmesh import protocol as P
from zmesh.client import AsyncClient, ZmeshError
from zmesh.config import config_from_dict, dump_toml

NODE_NAMES = "abcdefghijklmnopqrstuvwxyz"


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

    def __post_init__(self) -> None:
        if self.n_nodes < 1:
            raise ValueError("a lab needs at least one node")
        if self.topology not in ("ring", "star"):
            raise ValueError(f"topology must be 'ring' or 'star', got {self.topology!r}")
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="zmesh-lab-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.base_port is None:
            ports = free_ports(2 * self.n_nodes, self.host)
        else:
            ports = [self.base_port + 10 * (i // 2) + (i % 2) for i in range(2 * self.n_nodes)]
        for i in range(self.n_nodes):
            name = node_name(i)
            self.nodes.append(
                LabNode(
                    name=name,
                    serve=f"tcp://{self.host}:{ports[2 * i]}",
                    gossip=f"tcp://{self.host}:{ports[2 * i + 1]}",
                    config_path=self.workdir / f"{name}.toml",
                    log_path=self.workdir / f"{name}.log",
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
        return config_from_dict(
            {
                **self.extra_config,
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
        """Seconds until every (listed) node's estimates match the others' own state."""
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
                    return time.monotonic() - t0
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
