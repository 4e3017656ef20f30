"""CurveZMQ keys, the ZAP allowlist, and tenant isolation.

The fast tests use real ZeroMQ sockets without the model; the `slow` ones run a
keyed lab of real node processes with the real model.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio
from meshkit import log_events, started

from zmesh import protocol as P
from zmesh.blocks import SHARED_NAMESPACE, tenant_namespace
from zmesh.cli import main as cli_main
from zmesh.client import (
    AsyncClient,
    AuthenticationFailed,
    Client,
    NoEndpointAvailable,
    RequestError,
)
from zmesh.config import ConfigError, SecurityConfig, config_from_dict
from zmesh.lab import Lab
from zmesh.node.admission import forbidden
from zmesh.security import (
    DOMAIN_GOSSIP,
    DOMAIN_SERVE,
    AuthorizedKey,
    Denial,
    ZapHandler,
    generate,
    load_authorized,
    load_keypair,
    load_public_key,
    server_socket,
)

BASE = {
    "node_id": "n1",
    "serve_addr": "tcp://127.0.0.1:5555",
    "gossip_addr": "tcp://127.0.0.1:5556",
}


# ---- keys and config -----------------------------------------------------------------


def test_keys_gen_writes_loadable_certificates(tmp_path: Path, capsys) -> None:
    d = tmp_path / "keys"
    assert cli_main(["keys", "gen", "node-a", "node-b", "--dir", str(d)]) == 0
    assert cli_main(["keys", "gen", "app", "--dir", str(d), "--tenant", "acme"]) == 0
    out = capsys.readouterr().out
    assert "node-a: public" in out and "app: public" in out
    pair = load_keypair(d / "node-a.key_secret")
    assert load_public_key(str(d / "node-a.key")) == pair.public
    assert load_public_key(pair.public.decode()) == pair.public  # Z85 text works too
    assert stat.S_IMODE(os.stat(d / "node-a.key_secret").st_mode) == 0o600
    allowed = load_authorized(d)
    assert {a.name: (a.role, a.tenants) for a in allowed.values()} == {
        "node-a": ("node", None),
        "node-b": ("node", None),
        "app": ("client", frozenset({"acme"})),
    }
    # Never overwrites a key pair by accident.
    assert cli_main(["keys", "gen", "node-a", "--dir", str(d)]) == 1
    assert "exists already" in capsys.readouterr().err


def test_security_config_errors_name_the_key(tmp_path: Path) -> None:
    pub, sec = generate(tmp_path, "n1")

    def err(security: dict, **kw) -> str:
        with pytest.raises(ConfigError) as ei:
            config_from_dict({**BASE, "security": security, **kw}, source="t.toml")
        return str(ei.value)

    assert "security.secret_key_file" in err({"secret_key_file": str(tmp_path / "nope")})
    assert "cannot read" in err({"secret_key_file": str(tmp_path / "nope")})
    assert "give the .key_secret file" in err({"secret_key_file": str(pub)})
    bad = tmp_path / "bad.key_secret"
    bad.write_text('curve\n    public-key = "short"\n    secret-key = "short"\n')
    assert "Z85" in err({"secret_key_file": str(bad)})
    assert "security.authorized_keys" in err(
        {"secret_key_file": str(sec), "authorized_keys": ["x"]}
    )
    assert "not a directory" in err({"secret_key_file": str(sec), "authorized_dir": str(pub)})
    assert "security.secret_key_file" in err({"authorized_dir": str(tmp_path)})
    seeds = [{"serve": "tcp://h:1", "gossip": "tcp://h:2"}]
    assert "needs public_key" in err({"secret_key_file": str(sec)}, seeds=seeds)
    seeds[0]["public_key"] = str(tmp_path / "missing.key")
    assert "seeds[0].public_key" in err({"secret_key_file": str(sec)}, seeds=seeds)
    seeds[0]["public_key"] = str(pub)
    cfg = config_from_dict({**BASE, "security": {"secret_key_file": str(sec)}, "seeds": seeds})
    assert cfg.security.enabled and not SecurityConfig().enabled


# ---- the ZAP handler and the rules of roles ---------------------------------------------


def test_zap_rules(tmp_path: Path) -> None:
    generate(tmp_path, "node")
    generate(tmp_path, "app", role="client", tenants=["acme"])
    allowed = load_authorized(tmp_path)
    by_name = {a.name: a for a in allowed.values()}
    denials: list[Denial] = []
    ctx = zmq.asyncio.Context()
    try:
        zap = ZapHandler(ctx, allowed, denials.append)
        from zmq.utils import z85

        def req(domain: bytes, key: bytes, mech: bytes = b"CURVE") -> list[bytes]:
            cred = [z85.decode(key)] if mech == b"CURVE" else []
            return [b"1.0", b"1", domain, b"127.0.0.1", b"", mech, *cred]

        node, app = by_name["node"].public, by_name["app"].public
        ok = zap.handle(req(DOMAIN_SERVE, node))
        assert ok[2] == b"200" and ok[4] == node  # User-Id = the key
        assert zap.handle(req(DOMAIN_SERVE, app))[2] == b"200"
        assert zap.handle(req(DOMAIN_GOSSIP, app))[2] == b"400"  # clients see no gossip
        stranger = load_keypair(generate(tmp_path / "other", "x")[1]).public
        assert zap.handle(req(DOMAIN_SERVE, stranger))[2] == b"400"
        assert zap.handle(req(DOMAIN_SERVE, stranger))[2] == b"400"
        assert zap.handle(req(DOMAIN_SERVE, b"", b"NULL"))[2] == b"400"
        assert [d.log for d in denials] == [True, True, False, True]  # repeats: counted only
        assert denials[1].reason == "unknown key" and zap.denied == 4
        zap.close()
    finally:
        ctx.destroy(linger=0)

    node_key, app_key = by_name["node"], by_name["app"]
    gen = P.Generate(request_id="r", prompt="hi", tenant="acme")
    assert forbidden(node_key, msgs := gen) is None
    assert forbidden(app_key, msgs) is None
    assert "tenant 'beta'" in (
        forbidden(app_key, P.Generate(request_id="r", prompt="hi", tenant="beta")) or ""
    )
    assert forbidden(app_key, P.SnapshotRequest(request_id="s", node_id="x")) is not None
    assert forbidden(node_key, P.SnapshotRequest(request_id="s", node_id="x")) is None
    assert forbidden(app_key, P.StatusRequest(request_id="s")) is None
    assert forbidden(None, P.StatusRequest(request_id="s")) is not None
    assert AuthorizedKey(public=b"k", name="n").may_use_tenant("any")


def test_zap_bounds_denial_lines_over_all_keys_and_sums_the_rest(tmp_path: Path) -> None:
    """A stranger with a fresh key per connection: at most log_burst lines per window,
    every other refusal in that window summed once the window is over."""
    denials: list[Denial] = []
    summaries: list[tuple[int, float]] = []
    ctx = zmq.asyncio.Context()
    try:
        zap = ZapHandler(
            ctx,
            {},
            denials.append,
            log_every_s=10.0,
            log_burst=3,
            on_suppressed=lambda n, w: summaries.append((n, w)),
        )
        from zmq.utils import z85

        for _ in range(50):
            key = zmq.curve_keypair()[0]
            req = [b"1.0", b"1", DOMAIN_SERVE, b"127.0.0.1", b"", b"CURVE", z85.decode(key)]
            assert zap.handle(req)[2] == b"400"
        assert [d.log for d in denials].count(True) == 3 and len(denials) == zap.denied == 50
        zap.flush(time.monotonic())  # the window is not over yet
        assert summaries == []
        zap.flush(time.monotonic() + 10.0)
        assert [n for n, _ in summaries] == [47]
        zap.flush(time.monotonic() + 30.0)  # reported once
        assert len(summaries) == 1
        zap.close()
    finally:
        ctx.destroy(linger=0)


def test_client_with_unknown_key_gets_a_clear_error_at_once(tmp_path: Path) -> None:
    """A CURVE ROUTER with the ZAP handler: an allowed client is answered, a stranger
    gets AuthenticationFailed within the connect timeout (no waiting for the request
    timeout), and a client with the wrong server key is told so too."""
    server = load_keypair(generate(tmp_path, "server")[1])
    good = generate(tmp_path, "good", role="client")[1]
    bad = generate(tmp_path / "strangers", "bad", role="client")[1]
    wrong_server = load_keypair(generate(tmp_path / "strangers", "imposter")[1])

    async def main() -> None:
        ctx = zmq.asyncio.Context()
        denials: list[Denial] = []
        zap = ZapHandler(ctx, load_authorized(tmp_path), denials.append)
        zt = asyncio.create_task(zap.run())
        router = ctx.socket(zmq.ROUTER)
        server_socket(router, server, DOMAIN_SERVE)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        ep = f"tcp://127.0.0.1:{port}"

        async def answer() -> None:
            while True:
                ident, frame = await router.recv_multipart(copy=False)
                assert frame.get("User-Id") == load_keypair(good).public.decode()
                req = P.decode(frame.bytes)
                assert isinstance(req, P.StatusRequest)
                await router.send_multipart(
                    [
                        ident.bytes,
                        P.encode(
                            P.Status(
                                request_id=req.request_id,
                                node_id="srv",
                                epoch=1,
                                seq=0,
                                n_blocks=0,
                                queue_depth=0,
                                busy_slots=0,
                                n_slots=1,
                                peers=[],
                            )
                        ),
                    ]
                )

        at = asyncio.create_task(answer())
        try:
            async with AsyncClient(ep, client_key=good, server_key=server.public.decode()) as c:
                assert (await c.status()).node_id == "srv"
            t0 = time.monotonic()
            async with AsyncClient(
                ep, client_key=bad, server_key=server.public.decode(), connect_timeout=5
            ) as c:
                with pytest.raises(AuthenticationFailed, match="refused this client's key"):
                    await c.status()
            assert time.monotonic() - t0 < 3
            assert denials and denials[0].reason == "unknown key"
            async with AsyncClient(
                ep, client_key=good, server_key=wrong_server.public.decode(), connect_timeout=5
            ) as c:
                with pytest.raises(AuthenticationFailed, match="handshake"):
                    await c.status()
        finally:
            at.cancel()
            zt.cancel()
            await asyncio.gather(at, zt, return_exceptions=True)
            zap.close()
            ctx.destroy(linger=0)

    asyncio.run(main())


def test_shared_tenants_map_to_one_namespace_no_tenant_can_name() -> None:
    shared = {"pub1", "pub2"}
    assert tenant_namespace("pub1", shared) == tenant_namespace("pub2", shared) == SHARED_NAMESPACE
    assert tenant_namespace("acme", shared) == "acme"
    with pytest.raises(P.ProtocolError):  # a request cannot name the shared namespace
        P.validate_generate(P.Generate(request_id="r", prompt="x", tenant=SHARED_NAMESPACE))


# ---- a keyed lab: real processes, real model --------------------------------------------

FEW_SHOT = (
    "The following are multiple choice questions (with answers) about astronomy.\n\n"
    + "".join(
        f"Question {i}: Which planet is closest to the sun, case {i}? A. Mercury B. Mars "
        f"C. Venus D. Earth\nAnswer: A\n\n"
        for i in range(12)
    )
)


def wait_for(pred, timeout: float = 20.0) -> bool:
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if pred():
            return True
        time.sleep(0.2)
    return pred()


@pytest.fixture(scope="module")
def keyed_lab(tmp_path_factory):
    lab = Lab(
        n_nodes=2,
        keys=True,
        engine={"n_slots": 3, "slot_ctx": 1024, "n_threads": 1},
        # The tenant test pins a prefix on node-b by sending it there; placement hashing
        # would move a new prefix to another node.
        routing={"place_slack_frac": 0.0},
        extra_config={"tenant_shared": ["pub1", "pub2"]},
        workdir=tmp_path_factory.mktemp("keyed-lab"),
    )
    assert lab.keys_dir is not None
    # Written before the nodes start: they read the allowlist once.
    generate(lab.keys_dir, "acme-app", role="client", tenants=["acme"])
    with started(lab):
        yield lab


@pytest.mark.slow
def test_keyed_lab_converges_and_answers(keyed_lab: Lab) -> None:
    statuses = asyncio.run(keyed_lab.statuses())
    for st in statuses:
        assert {p.node_id for p in st.peers if p.state == "alive"} == {
            n.name for n in keyed_lab.nodes
        } - {st.node_id}
    with Client(keyed_lab.endpoints, timeout=60, **keyed_lab.client_kwargs()) as c:
        done = c.generate("The capital of France is", max_tokens=4)
    assert done.text and done.served_by in {n.name for n in keyed_lab.nodes}
    # Nothing was refused between members.
    for node in keyed_lab.nodes:
        assert log_events(node.log_path, "auth.denied") == []


@pytest.mark.slow
def test_keyed_lab_refuses_strangers_and_limits_client_keys(keyed_lab: Lab, tmp_path: Path) -> None:
    a = keyed_lab.nodes[0]
    server_key = keyed_lab.public_key(0)
    stranger = generate(tmp_path, "stranger", role="client")[1]
    with (
        Client(a.serve, client_key=stranger, server_key=server_key, connect_timeout=5) as c,
        pytest.raises(AuthenticationFailed),
    ):
        c.generate("hello", max_tokens=2)
    assert wait_for(lambda: log_events(a.log_path, "auth.denied"))
    denied = log_events(a.log_path, "auth.denied")[0]
    assert denied["domain"] == "serve" and denied["reason"] == "unknown key"
    assert denied["key"] == load_keypair(stranger).public.decode()
    # A keyless client cannot talk to a keyed node at all.
    with (
        Client(a.serve, connect_timeout=1, timeout=3) as c,
        pytest.raises(NoEndpointAvailable, match="needs client_key and server_key"),
    ):
        c.status()
    # A client key bound to tenant acme may use acme, and nothing else.
    app = str(keyed_lab.keys_dir / "acme-app.key_secret")  # type: ignore[operator]
    with Client(a.serve, client_key=app, server_key=server_key, timeout=60) as c:
        assert c.generate("Hello", max_tokens=2, tenant="acme").text is not None
        with pytest.raises(RequestError) as ei:
            c.generate("Hello", max_tokens=2, tenant="beta")
        assert ei.value.code == P.FORBIDDEN
    st = asyncio.run(keyed_lab.statuses([0]))[0]
    assert st.counters.get("auth_denied", 0) >= 1 and st.counters.get("requests_forbidden") == 1


@pytest.mark.slow
def test_node_with_unknown_key_cannot_join(keyed_lab: Lab, tmp_path: Path) -> None:
    a = keyed_lab.nodes[0]
    intruder = Lab(
        n_nodes=1,
        keys=True,  # its own keys, which the lab does not know
        engine={"n_slots": 1, "slot_ctx": 256},
        workdir=tmp_path / "intruder",
        extra_seeds=[{"serve": a.serve, "gossip": a.gossip, "public_key": keyed_lab.public_key(0)}],
    )
    # It knows node-a's public key (public, after all) and trusts it; only its own key
    # is unknown to the lab. A name of its own, so node-a cannot ignore it as itself.
    assert intruder.keys_dir is not None
    shutil.copy(keyed_lab.public_key(0), intruder.keys_dir / "target.key")
    cfg = intruder.nodes[0].config_path
    cfg.write_text(cfg.read_text().replace('node_id = "node-a"', 'node_id = "intruder"'))
    intruder.start()
    try:
        asyncio.run(intruder.wait_converged(timeout=120))  # a lone node: up and serving
        # Its DEALER (pings, snapshot pulls) and SUB (gossip) are refused by node-a.
        assert wait_for(
            lambda: (
                {r.get("domain") for r in log_events(a.log_path, "auth.denied")}
                >= {"serve", "gossip"}
            ),
            timeout=30,
        )
        # Both of its connections refused, and libzmq does not retry a connection after
        # a ZAP refusal: nothing else can come. A Status is answered after everything a
        # node received before it, so these tables are final, with no wait for time.
        ours = asyncio.run(keyed_lab.statuses())
        assert ours[0].counters.get("auth_denied", 0) >= 2
        for st in ours:
            assert all(p.node_id in {n.name for n in keyed_lab.nodes} for p in st.peers)
        theirs = asyncio.run(intruder.statuses())[0]
        assert [p for p in theirs.peers if p.state == "alive"] == []
    finally:
        intruder.stop()


@pytest.mark.slow
def test_tenants_never_see_each_others_prefixes_through_routing(keyed_lab: Lab) -> None:
    a, b = keyed_lab.nodes[0], keyed_lab.nodes[1]
    prompt = FEW_SHOT + "Question: Which planet has rings?\nAnswer:"
    with Client(keyed_lab.endpoints, timeout=60, **keyed_lab.client_kwargs()) as c:
        primed = c.generate(prompt, max_tokens=2, tenant="alice", endpoint=b.serve)
        assert primed.served_by == b.name
        asyncio.run(keyed_lab.wait_converged(timeout=30))  # node-a knows node-b's blocks
        # Tenant bob, same prompt, at node-a: no forward for prefix reasons, no reuse.
        bob = c.generate(prompt, max_tokens=2, tenant="bob", endpoint=a.serve)
        assert bob.cached_tokens == 0 and bob.route_reason != "prefix", bob
        assert bob.served_by == a.name
        bob_at_b = c.generate(prompt, max_tokens=2, tenant="carol", endpoint=b.serve)
        assert bob_at_b.cached_tokens == 0  # the engine never shares across tenants
        # Control: alice herself, at node-a, is sent to her cached prefix on node-b.
        alice = c.generate(
            FEW_SHOT + "Question: Which planet is red?\nAnswer:",
            max_tokens=2,
            tenant="alice",
            endpoint=a.serve,
        )
        assert alice.served_by == b.name and alice.route_reason == "prefix", alice
        assert alice.cached_tokens > 0

        # Tenants listed in tenant_shared do share: pub1 primes a node, pub2 entering at
        # the other is sent to it. (node-b's slots are all taken by now, so the eviction
        # charge may rightly send pub1 on to node-a's free ones.)
        shared = FEW_SHOT.replace("astronomy", "public astronomy") + "Question: Moon?\nAnswer:"
        pub1 = c.generate(shared, max_tokens=2, tenant="pub1", endpoint=b.serve)
        asyncio.run(keyed_lab.wait_converged(timeout=30))
        other = a if pub1.served_by == b.name else b
        pub2 = c.generate(shared, max_tokens=2, tenant="pub2", endpoint=other.serve)
        assert pub2.served_by == pub1.served_by and pub2.route_reason == "prefix", pub2
        assert pub2.cached_tokens > 0


# ---- the compose lab with keys ----------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_compose_keys_override_gives_every_node_a_valid_keyed_config(tmp_path: Path) -> None:
    """compose.keys.yaml's environment, applied to each compose config with keys made
    by scripts/compose-keys.sh, loads as a keyed config whose seeds all carry keys."""
    import subprocess
    import sys

    import yaml

    keys = tmp_path / "keys"
    env = {**os.environ, "ZMESH": str(Path(sys.executable).with_name("zmesh"))}
    subprocess.run([str(ROOT / "scripts" / "compose-keys.sh"), str(keys)], check=True, env=env)
    assert load_authorized(keys)  # the lab's secrets are readable by the container user
    override = yaml.safe_load((ROOT / "compose.keys.yaml").read_text())
    base = yaml.safe_load((ROOT / "compose.yaml").read_text())
    for service, spec in override["services"].items():
        assert spec["volumes"] == ["./keys/compose:/etc/zmesh/keys:ro"]
        assert service in base["services"]
        environ = {
            k: v.replace("/etc/zmesh/keys", str(keys)) for k, v in spec["environment"].items()
        }
        cfg = load_config_file(ROOT / "configs" / "compose" / f"{service}.toml", environ)
        assert cfg.security.enabled, service
        assert cfg.seeds and all(s.public_key for s in cfg.seeds), service
        # Same seeds as the keyless config, plus keys.
        plain = load_config_file(ROOT / "configs" / "compose" / f"{service}.toml", {})
        assert [(s.serve, s.gossip) for s in cfg.seeds] == [
            (s.serve, s.gossip) for s in plain.seeds
        ], service
    # The healthcheck asks a keyed node with the node's own key pair.
    hc = (ROOT / "nodes" / "healthcheck.py").read_text()
    assert "--client-key" in hc and "secret_key_file" in hc


def load_config_file(path: Path, env: dict[str, str]):
    from zmesh.config import load_config

    return load_config(path, env=env)


def test_cli_key_options_are_checked(tmp_path: Path, capsys) -> None:
    _, sec = generate(tmp_path, "app", role="client")
    assert cli_main(["ask", "--client-key", str(sec), "hi"]) == 2
    assert "zmesh ask: CURVE needs both --client-key and --server-key" in capsys.readouterr().err
    two = ["--endpoint", "tcp://127.0.0.1:1", "--endpoint", "tcp://127.0.0.1:2"]
    args = ["status", *two, "--client-key", str(sec), "--server-key", str(sec)]
    assert cli_main([*args, "--server-key", str(sec), "--server-key", str(sec)]) == 2
    err = capsys.readouterr().err
    assert "zmesh status: give one --server-key" in err and "one per --endpoint" in err
