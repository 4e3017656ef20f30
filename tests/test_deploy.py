"""Deployment: compose.yaml, its configs and the node image, checked statically and for real.

The static checks run everywhere. The lab tests (marked `docker` and `slow`) build a
local base image (debootstrap + `docker import`: no registry is reachable here), build
the node image on it, bring up the real compose.yaml, and talk to it from the host.
Run them alone with `pytest -m docker`; they skip when no Docker Engine or Compose is
installed. Repeat runs reuse the base image, the wheelhouse and Docker's layer cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from zmesh import protocol as P
from zmesh.client import AsyncClient, Client, ZmeshError
from zmesh.config import ConfigError, NodeConfig, load_config
from zmesh.lab import converged, free_ports

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "nodes" / "Dockerfile"
SCHEMA = Path(__file__).parent / "data" / "compose-spec.json"
NODE_CONFIG = "/etc/zmesh/node.toml"  # where the image reads its config
LAB_NODES = ["node-a", "node-b", "node-c"]
ADDR_RE = re.compile(r"tcp://(?P<host>[^:]+):(?P<port>\d+)")
VAR_RE = re.compile(r"\$\{(?P<name>\w+)(?::-(?P<default>[^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}`, as compose itself resolves it (env, else default)."""
    env = env or {}
    return VAR_RE.sub(lambda m: env.get(m["name"]) or m["default"] or "", text)


def port_of(addr: str) -> int:
    m = ADDR_RE.fullmatch(addr)
    assert m, f"not a tcp address: {addr}"
    return int(m["port"])


@dataclass
class Service:
    name: str
    spec: dict[str, Any]
    config_path: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def runs_node(self) -> bool:
        return self.spec.get("command", ["node"])[0] == "node"

    @property
    def auto_identity(self) -> bool:
        return self.env.get("NODE_AUTO_IDENTITY") == "1"

    def config(self) -> NodeConfig:
        assert self.config_path is not None, f"{self.name} mounts no config"
        # The service's environment applies, as in the container (ZMESH_* overrides).
        return load_config(self.config_path, env=self.env)

    def published(self) -> list[tuple[int, int]]:
        """(host port, container port) with compose's defaults for the variables."""
        out = []
        for entry in self.spec.get("ports", []):
            *_, host, container = interpolate(str(entry)).split(":")
            out.append((int(host), int(container.split("/")[0])))
        return out


def services() -> dict[str, Service]:
    out = {}
    for name, spec in compose()["services"].items():
        svc = Service(
            name, spec, env={k: str(v) for k, v in (spec.get("environment") or {}).items()}
        )
        for vol in spec.get("volumes", []):
            src, dst, *_ = vol.split(":")
            if dst == NODE_CONFIG:
                svc.config_path = ROOT / src
        out[name] = svc
    return out


# ---- compose.yaml against the Compose Specification and against configs/ -------------


def compose_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # The file names draft 2019-09 by a URI jsonschema does not know; say it plainly.
    assert "2019-09" in schema["$schema"]
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


def test_compose_file_validates_against_the_compose_specification() -> None:
    errors = sorted(compose_validator().iter_errors(compose()), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


@pytest.mark.parametrize(
    ("path", "key", "value"),
    [
        (["services", "node-a"], "portz", ["5555:5555"]),  # unknown key
        (["services", "node-a"], "profiles", "gpu"),  # wrong type
        (["services", "node-gpu", "deploy", "resources"], "reservations", {"gpus": 1}),
    ],
)
def test_the_schema_catches_a_bad_compose_file(path: list[str], key: str, value: Any) -> None:
    bad = compose()
    target = bad
    for part in path:
        target = target[part]
    target[key] = value
    assert not compose_validator().is_valid(bad)


def test_default_lab_is_three_nodes_on_one_network_and_the_rest_is_opt_in() -> None:
    svcs = services()
    default = [s for s in svcs.values() if not s.spec.get("profiles")]
    assert sorted(s.name for s in default) == LAB_NODES
    networks = {tuple(s.spec["networks"]) for s in svcs.values()}
    assert networks == {("mesh",)}
    for name in LAB_NODES:
        assert svcs[name].spec["command"] == ["node"]
    assert svcs["bench"].spec["profiles"] == ["bench"]
    assert svcs["node-gpu"].spec["profiles"] == ["gpu"]
    assert svcs["node-x"].spec["profiles"] == ["scale"]
    # Every service builds the same Dockerfile, so `docker compose up` is all it takes.
    for s in svcs.values():
        assert s.spec["build"]["dockerfile"] == "nodes/Dockerfile"
        assert s.spec["build"]["context"] == "."


def test_every_node_service_has_a_config_that_matches_its_service() -> None:
    svcs = services()
    for s in svcs.values():
        if not s.runs_node:
            continue
        cfg = s.config()
        # Containers bind every interface and advertise the service name.
        assert ADDR_RE.fullmatch(cfg.serve_addr)["host"] == "0.0.0.0", s.name  # type: ignore[index]
        assert ADDR_RE.fullmatch(cfg.gossip_addr)["host"] == "0.0.0.0", s.name  # type: ignore[index]
        assert cfg.metrics_port > 0, f"{s.name}: metrics off"
        if s.auto_identity:  # entrypoint.sh names and advertises each replica
            assert port_of(cfg.serve_addr) == 5555 and port_of(cfg.gossip_addr) == 5556
            continue
        assert cfg.node_id == s.name
        assert cfg.advertise_serve == f"tcp://{s.name}:{port_of(cfg.serve_addr)}"
        assert cfg.advertise_gossip == f"tcp://{s.name}:{port_of(cfg.gossip_addr)}"


def test_every_seed_names_a_real_service_and_its_ports() -> None:
    svcs = services()
    for s in svcs.values():
        if not s.runs_node:
            continue
        seeds = s.config().seeds
        assert seeds, f"{s.name} has no seeds: it could never join"
        for seed in seeds:
            host = ADDR_RE.fullmatch(seed.serve)["host"]  # type: ignore[index]
            assert host in svcs, f"{s.name}: seed {seed.serve} names no service"
            assert host != s.name, f"{s.name} seeds itself"
            assert ADDR_RE.fullmatch(seed.gossip)["host"] == host  # type: ignore[index]
            target = svcs[host].config()
            assert port_of(seed.serve) == port_of(target.serve_addr), (s.name, seed)
            assert port_of(seed.gossip) == port_of(target.gossip_addr), (s.name, seed)
            assert not svcs[host].spec.get("profiles"), f"{s.name} seeds an optional node"


def test_every_published_port_matches_a_bind() -> None:
    svcs = services()
    host_ports: list[int] = []
    for s in svcs.values():
        if not s.runs_node:
            assert not s.published(), f"{s.name} publishes ports but runs no node"
            continue
        cfg = s.config()
        binds = {port_of(cfg.serve_addr): "serve", cfg.metrics_port: "metrics"}
        binds[cfg.http.port] = "http"
        published = s.published()
        for _, container in published:
            assert container in binds, f"{s.name}: publishes {container}, which nothing binds"
        if s.auto_identity:
            assert not published, "scaled replicas cannot share host ports"
            continue
        assert {binds[c] for _, c in published} == {"serve", "metrics", "http"}, s.name
        host_ports += [h for h, _ in published]
    assert len(host_ports) == len(set(host_ports)), f"host ports collide: {host_ports}"
    # The CLI's default endpoints are the lab's serve ports: `zmesh ask` works as is.
    from zmesh.cli import DEFAULT_ENDPOINTS

    serve = [h for n in LAB_NODES for h, c in svcs[n].published() if c == 5555]
    assert [f"tcp://127.0.0.1:{p}" for p in serve] == DEFAULT_ENDPOINTS


def test_gpu_profile_reserves_nvidia_gpus_and_offloads_every_layer() -> None:
    gpu = services()["node-gpu"]
    devices = gpu.spec["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert gpu.config().engine.n_gpu_layers == -1
    args = gpu.spec["build"]["args"]
    assert "-DGGML_CUDA=on" in args["CMAKE_ARGS"].split()
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["BASE_IMAGE"]
    assert args["BUILDER_IMAGE"].startswith("nvidia/cuda:") and "devel" in args["BUILDER_IMAGE"]


def test_bench_waits_for_healthy_nodes_and_targets_their_serve_ports() -> None:
    svcs = services()
    bench = svcs["bench"]
    assert bench.spec["depends_on"] == {n: {"condition": "service_healthy"} for n in LAB_NODES}
    cmd = bench.spec["command"]
    endpoints = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--endpoint"]
    assert endpoints == [svcs[n].config().serve_endpoint for n in LAB_NODES]


# ---- configs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", sorted(ROOT.glob("configs/**/*.toml")), ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_config_loads(path: Path) -> None:
    load_config(path, env={})


def test_image_default_config_loads() -> None:
    cfg = load_config(ROOT / "nodes" / "node.toml", env={})
    assert cfg.serve_addr == "tcp://0.0.0.0:5555" and cfg.metrics_port == 5557


@pytest.mark.parametrize(
    ("edit", "key", "fragment"),
    [
        (
            ("metrics_port = 5557", "metrics_prot = 5557"),
            "metrics_prot",
            "did you mean 'metrics_port'",
        ),
        (("n_slots = 4", 'n_slots = "4"'), "engine.n_slots", "expected int, got str"),
        (("tcp://node-a:5555", "tcp://0.0.0.0:5555"), "advertise_serve", "wildcard"),
        (('serve = "tcp://node-b:5555"', 'serve = "node-b:5555"'), "seeds[0].serve", "not tcp://"),
        (("metrics_port = 5557", "metrics_port = 5555"), "metrics_port", "serve or gossip port"),
    ],
)
def test_bad_compose_configs_name_file_and_key(
    tmp_path: Path, edit: tuple[str, str], key: str, fragment: str
) -> None:
    text = (ROOT / "configs" / "compose" / "node-a.toml").read_text()
    assert edit[0] in text
    bad = tmp_path / "node-a.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(bad, env={})
    assert info.value.source == str(bad) and info.value.key == key
    assert fragment in str(info.value)


def test_container_env_overrides_apply_and_typos_are_caught() -> None:
    path = ROOT / "configs" / "compose" / "node-a.toml"
    cfg = load_config(path, env={"ZMESH_ENGINE__N_SLOTS": "2", "ZMESH_METRICS_PORT": "9100"})
    assert (cfg.engine.n_slots, cfg.metrics_port) == (2, 9100)
    with pytest.raises(ConfigError, match="ZMESH_ENGNE__N_SLOTS: unknown config key"):
        load_config(path, env={"ZMESH_ENGNE__N_SLOTS": "2"})


# ---- the Dockerfile, statically ------------------------------------------------------


def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", text, re.M)
    froms = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.M)
    assert [stage for _, stage in froms] == ["builder", "runtime"]
    runtime = text.split("AS runtime", 1)[1]
    assert "--from=builder /opt/zmesh" in runtime  # only the venv and the model cross over
    assert re.search(r"^USER zmesh$", runtime, re.M)
    assert re.search(r"^HEALTHCHECK .*zmesh-healthcheck", runtime, re.M)
    assert "ARG CMAKE_ARGS" in text
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert dockerignore[dockerignore.index("*") :][:1] == ["*"]  # deny first, then allow
    assert "!.venv" not in dockerignore


# ---- the real lab: docker -------------------------------------------------------------


def _compose_command() -> list[str] | None:
    for cmd in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cmd[0]) is None:
            continue
        if subprocess.run([*cmd, "version"], capture_output=True).returncode == 0:
            return cmd
    return None


def _docker_problem() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return f"the Docker Engine does not answer: {info.stderr.strip()[:200]}"
    if _compose_command() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def run(cmd: list[str], timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kw)
    if proc.returncode != 0:
        out = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{out}")
    return proc


IMAGE = os.environ.get("LAB_TEST_IMAGE", "zmesh-node:test")  # not compose's default tag


@dataclass
class ComposeLab:
    cmd: list[str]  # compose command with -f and -p
    project: str
    env: dict[str, str]
    serve: dict[str, str]  # service -> host endpoint
    metrics: dict[str, int]  # service -> host port

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return run([*self.cmd, *args], timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()

    def logs(self, service: str) -> list[dict[str, Any]]:
        """The JSON lines a service logged on stdout (`compose logs`)."""
        out = []
        for line in self.compose("logs", "--no-color", service).stdout.splitlines():
            _, sep, rest = line.partition("| ")
            try:
                rec = json.loads(rest if sep else line)
            except json.JSONDecodeError:
                continue  # compose's own lines, or plain text from llama.cpp
            if isinstance(rec, dict):
                out.append(rec)
        return out

    def events(self, service: str, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.logs(service)
            if r.get("event") == event and all(r.get(k) == v for k, v in match.items())
        ]

    def scrape(self, service: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{self.metrics[service]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def statuses(self, services: list[str]) -> list[P.Status]:
        async def ask() -> list[P.Status]:
            async with AsyncClient([self.serve[s] for s in services], connect_timeout=2) as c:
                return list(
                    await asyncio.gather(*(c.status(self.serve[s], timeout=2) for s in services))
                )

        return asyncio.run(ask())

    def wait_converged(self, services: list[str], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if converged(self.statuses(services)):
                    return
            except ZmeshError:
                pass
            assert time.monotonic() < deadline, f"{services} did not converge in {timeout}s"
            time.sleep(0.2)


def _build_image() -> None:
    """Base image (debootstrap), wheelhouse and node image; each step reuses its cache."""
    env = {**os.environ, "PYTHON": sys.executable}  # its pip builds the wheelhouse
    if base := os.environ.get("LAB_BASE_IMAGE"):  # e.g. python:3.11-slim where pulls work
        env["BASE_IMAGE"] = base
    t0 = time.monotonic()
    run([str(ROOT / "scripts" / "docker-build.sh"), IMAGE], timeout=1800, env=env)
    print(f"node image {IMAGE} ready in {time.monotonic() - t0:.0f}s")


def _wait_healthy(lab: ComposeLab, services: list[str], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while True:
        health = {}
        for s in services:
            cid = lab.container(s)
            state = run(["docker", "inspect", "-f", "{{json .State}}", cid]).stdout
            st = json.loads(state)
            assert st["Running"], (
                f"{s} exited: {st}\n{lab.compose('logs', '--tail', '30', s).stdout}"
            )
            health[s] = st.get("Health", {}).get("Status")
        if all(h == "healthy" for h in health.values()):
            return
        assert time.monotonic() < deadline, f"not healthy after {timeout}s: {health}"
        time.sleep(1)


def _compose_lab(compose_cmd: list[str], project: str, files: list[Path]) -> ComposeLab:
    """A lab of the three nodes on free host ports, running this test's image."""
    # Every published port free, HTTP too: two labs (plain and keyed) may be up at once.
    ports = free_ports(9)
    names = ["NODE_A_PORT", "NODE_B_PORT", "NODE_C_PORT"]
    names += ["NODE_A_METRICS", "NODE_B_METRICS", "NODE_C_METRICS"]
    names += ["NODE_A_HTTP", "NODE_B_HTTP", "NODE_C_HTTP"]
    env = {
        **os.environ,
        **dict(zip(names, map(str, ports), strict=True)),
        "NODE_IMAGE": IMAGE,
        "LAB_HOST": "127.0.0.1",
    }
    return ComposeLab(
        cmd=[*compose_cmd, *(a for f in files for a in ("-f", str(f))), "-p", project],
        project=project,
        env=env,
        serve={n: f"tcp://127.0.0.1:{p}" for n, p in zip(LAB_NODES, ports[:3], strict=True)},
        metrics=dict(zip(LAB_NODES, ports[3:6], strict=True)),
    )


@pytest.fixture(scope="module")
def lab() -> Iterator[ComposeLab]:
    if why := _docker_problem():
        pytest.skip(f"needs a Docker Engine with Compose: {why}")
    compose_cmd = _compose_command()
    assert compose_cmd is not None
    _build_image()
    lab = _compose_lab(compose_cmd, f"zmesh-test-{os.getpid()}", [COMPOSE_FILE])
    try:
        t0 = time.monotonic()
        lab.compose("up", "-d", "--no-build")
        _wait_healthy(lab, LAB_NODES)
        print(f"compose lab healthy in {time.monotonic() - t0:.0f}s")
        yield lab
    finally:
        # Also on failure: nothing of the lab may outlive the test.
        subprocess.run(
            [*lab.cmd, "--profile", "bench", "down", "-v", "--remove-orphans", "-t", "5"],
            capture_output=True,
            env=lab.env,
            cwd=ROOT,
            timeout=180,
        )


FEW_SHOT = "".join(
    f"Question {i}: Which rock forms from cooled lava number {i}? A. Basalt B. Marble "
    f"C. Shale D. Slate\nAnswer: A\n\n"
    for i in range(12)
)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_is_unprivileged_compiler_free_and_needs_no_network(lab: ComposeLab) -> None:
    assert (
        run(["docker", "image", "inspect", "-f", "{{.Config.User}}", IMAGE]).stdout.strip()
        == "zmesh"
    )
    no_cc = "for c in cc gcc g++ c++ clang cmake make; do command -v $c && exit 1; done; id -u"
    uid = run(["docker", "run", "--rm", "--entrypoint", "sh", IMAGE, "-c", no_cc]).stdout.strip()
    assert uid != "0"
    # The healthcheck fails when no node answers...
    probe = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "zmesh-healthcheck", IMAGE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode != 0, probe.stdout
    # ...and a node without any network (nothing to download) still becomes healthy.
    cid = run(["docker", "run", "-d", "--network", "none", IMAGE]).stdout.strip()
    try:
        deadline = time.monotonic() + 180
        while (
            health := run(
                ["docker", "inspect", "-f", "{{.State.Health.Status}}", cid]
            ).stdout.strip()
        ) != "healthy":
            assert health in ("starting", ""), run(["docker", "logs", cid]).stderr[-2000:]
            assert time.monotonic() < deadline, "offline node never became healthy"
            time.sleep(1)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True, timeout=60)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_lab_converges_and_answers_from_the_host(lab: ComposeLab) -> None:
    lab.wait_converged(LAB_NODES)
    with Client(list(lab.serve.values()), timeout=120) as client:
        done = client.generate("The capital of France is", max_tokens=4)
    assert done.served_by in LAB_NODES and done.completion_tokens > 0
    for node in LAB_NODES:  # JSON logs on stdout, one object per line, with the node id
        started = lab.events(node, "node.started")
        assert started and started[0]["node_id"] == node


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_request_is_forwarded_to_the_node_holding_its_prefix(lab: ComposeLab) -> None:
    a, b = lab.serve["node-a"], lab.serve["node-b"]
    with Client([a, b], timeout=120) as client:
        first = client.generate(
            FEW_SHOT + "Question: What is granite?\nAnswer:", max_tokens=2, endpoint=b
        )
        assert first.served_by == "node-b", first
        lab.wait_converged(LAB_NODES)  # node-a now knows node-b's blocks
        hit = client.generate(
            FEW_SHOT + "Question: What is obsidian?\nAnswer:", max_tokens=2, endpoint=a
        )
    assert hit.served_by == "node-b" and hit.route_reason == "prefix", hit
    assert hit.route_path == ["node-a", "node-b"] and hit.hops == 1
    assert hit.cached_tokens >= hit.prompt_tokens - 20
    # The same story in the containers' JSON logs...
    decided = lab.events("node-a", "route.decided", request_id=hit.request_id)
    assert decided and decided[0]["forward"] is True and decided[0]["target"] == "node-b"
    forwarded = lab.events("node-a", "request.forwarded", request_id=hit.request_id)
    assert forwarded
    # node-b knows the request by the forward's wire id (the caller's id + a suffix).
    completed = lab.events("node-b", "request.completed", request_id=forwarded[0]["wire_id"])
    assert completed and completed[0]["hops"] == 1 and completed[0]["served_by"] == "node-b"
    # ...and in node-a's Prometheus metrics, published on the host.
    m = lab.scrape("node-a")
    assert m[("zmesh_forwards_total", ())] >= 1
    assert m[("zmesh_requests_total", (("outcome", "forwarded"), ("route_reason", "prefix")))] >= 1
    assert m[("zmesh_peers", (("state", "alive"),))] == 2


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_service_runs_a_workload_through_the_client(lab: ComposeLab) -> None:
    out = lab.compose("--profile", "bench", "run", "--rm", "bench", timeout=600).stdout
    assert "0 failed" in out, out
    assert re.search(r"^9 answered", out, re.M), out


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_a_partitioned_node_costs_no_request_and_rejoins(lab: ComposeLab) -> None:
    """`docker network disconnect` cuts node-c off its peers; the rest keeps answering,
    and once reconnected the three converge again."""
    lab.wait_converged(LAB_NODES)
    network, cid = f"{lab.project}_mesh", lab.container("node-c")
    run(["docker", "network", "disconnect", network, cid])
    try:
        with Client([lab.serve["node-a"], lab.serve["node-b"]], timeout=120) as client:
            for i in range(4):
                done = client.generate(FEW_SHOT + f"Question: cut off {i}\nAnswer:", max_tokens=2)
                assert done.served_by in ("node-a", "node-b"), done
        deadline = time.monotonic() + 60
        while True:
            states = {p.node_id: p.state for p in lab.statuses(["node-a"])[0].peers}
            if states.get("node-c") in ("suspect", "dead"):
                break
            assert time.monotonic() < deadline, f"node-a never noticed the partition: {states}"
            time.sleep(1)
    finally:
        run(["docker", "network", "connect", "--alias", "node-c", network, cid])
    lab.wait_converged(LAB_NODES, timeout=120)


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_requests_still_succeed_with_a_node_stopped(lab: ComposeLab) -> None:
    only_here = FEW_SHOT.replace("Question", "Quiz item")  # a prefix no node holds yet
    with Client([lab.serve["node-c"]], timeout=120) as client:
        primed = client.generate(only_here + "Quiz item: prime\nAnswer:", max_tokens=2)
    # Stop the node holding the prefix: the others then route to a peer that is gone.
    holder = primed.served_by
    others = [n for n in LAB_NODES if n != holder]
    lab.wait_converged(LAB_NODES)
    lab.compose("stop", holder)
    # The stopped node first in the list: the client must fail over to the others.
    endpoints = [lab.serve[holder], *(lab.serve[n] for n in others)]
    with Client(endpoints, timeout=120, connect_timeout=2) as client:
        for i in range(3):
            done = client.generate(only_here + f"Quiz item: after stop {i}\nAnswer:", max_tokens=2)
            assert done.served_by in others, done
        direct = client.generate(
            only_here + "Quiz item: direct\nAnswer:", endpoint=lab.serve[others[1]]
        )
        assert direct.served_by in others, direct
    deadline = time.monotonic() + 60
    while not lab.events(others[0], "peer.suspect", peer=holder):
        assert time.monotonic() < deadline, f"{others[0]} never noticed {holder} stopped"
        time.sleep(1)
    status = lab.statuses([others[0]])[0]
    assert {p.node_id: p.state for p in status.peers}[holder] in ("suspect", "dead")


@pytest.mark.docker
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_compose_lab_with_keys_answers_keyed_clients_only(tmp_path: Path) -> None:
    """compose.yaml + compose.keys.yaml: CURVE everywhere, keys from compose-keys.sh."""
    if why := _docker_problem():
        pytest.skip(f"needs a Docker Engine with Compose: {why}")
    compose_cmd = _compose_command()
    assert compose_cmd is not None
    _build_image()  # cached by the lab fixture's build when that ran first
    keys = tmp_path / "keys"
    zmesh_bin = str(Path(sys.executable).parent / "zmesh")
    run(
        [str(ROOT / "scripts" / "compose-keys.sh"), str(keys)],
        env={**os.environ, "ZMESH": zmesh_bin},
    )
    override = tmp_path / "compose.keys.yaml"  # the real override, pointed at these keys
    override.write_text(
        (ROOT / "compose.keys.yaml").read_text().replace("./keys/compose:", f"{keys}:")
    )
    lab = _compose_lab(compose_cmd, f"zmesh-keys-{os.getpid()}", [COMPOSE_FILE, override])
    try:
        lab.compose("up", "-d", "--no-build")
        _wait_healthy(lab, LAB_NODES)  # the healthcheck itself must use the node's key
        endpoints = list(lab.serve.values())
        server_key = {lab.serve[n]: str(keys / f"{n}.key") for n in LAB_NODES}
        client_key = str(keys / "client.key_secret")
        with Client(endpoints, client_key=client_key, server_key=server_key, timeout=120) as c:
            done = c.generate("The capital of France is", max_tokens=4)
            assert done.served_by in LAB_NODES and done.completion_tokens > 0
            deadline = time.monotonic() + 60  # peers find each other over CURVE too
            while not all(
                sum(p.state == "alive" for p in c.status(e).peers) == 2 for e in endpoints
            ):
                assert time.monotonic() < deadline, [c.status(e) for e in endpoints]
                time.sleep(0.5)
        with (
            Client(endpoints[:1], connect_timeout=2, timeout=5) as plain,
            pytest.raises(ZmeshError),
        ):
            plain.generate("The capital of France is", max_tokens=4)
    finally:
        subprocess.run(
            [*lab.cmd, "down", "-v", "--remove-orphans", "-t", "5"],
            capture_output=True,
            env=lab.env,
            cwd=ROOT,
            timeout=180,
        )
