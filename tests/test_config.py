"""Node config: the example file, every promised error, env overrides, TOML round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.config import (
    ConfigError,
    EngineConfig,
    FaultsConfig,
    GossipConfig,
    HttpConfig,
    NodeConfig,
    RoutingConfig,
    RuntimeConfig,
    SecurityConfig,
    Seed,
    apply_env_overrides,
    check_address,
    config_from_dict,
    dump_toml,
    load_config,
)
from zmesh.routing import POLICIES

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "local-node.toml"

MINIMAL = """\
node_id = "n1"
serve_addr = "tcp://127.0.0.1:5555"
gossip_addr = "tcp://127.0.0.1:5556"
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def load_error(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={} if env is None else env)
    assert str(ei.value).startswith(f"{path}: "), "every error names the file first"
    return ei.value


def base(**kw: Any) -> dict[str, Any]:
    return {
        "node_id": "n1",
        "serve_addr": "tcp://127.0.0.1:5555",
        "gossip_addr": "tcp://127.0.0.1:5556",
        **kw,
    }


# ---- the example and defaults -------------------------------------------------------


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.node_id == "n1"
    assert cfg.serve_addr == "tcp://127.0.0.1:5555"
    assert cfg.serve_endpoint == cfg.serve_addr  # no advertise address: the bind one
    # The example spells out the defaults, so it equals a minimal config.
    assert cfg == config_from_dict(base())
    text = EXAMPLE.read_text()
    tables = (
        NodeConfig,
        EngineConfig,
        GossipConfig,
        RoutingConfig,
        Seed,
        SecurityConfig,
        HttpConfig,
        RuntimeConfig,
    )
    for cls in (*tables, FaultsConfig):
        for name in cls.__struct_fields__:
            assert f"{name} =" in text or f"[{name}]" in text or f"[[{name}]]" in text, name


def test_defaults() -> None:
    cfg = config_from_dict(base())
    assert cfg.engine == EngineConfig()
    assert (cfg.engine.n_slots, cfg.engine.slot_ctx, cfg.engine.block_size) == (8, 2048, 16)
    assert cfg.gossip.suspect_after_s < cfg.gossip.dead_after_s
    assert cfg.routing.policy == "zmesh" and cfg.routing.max_hops == 1
    assert cfg.seeds == [] and cfg.max_queue == 64 and cfg.log_level == "info"


def test_full_config_with_seeds_and_advertise(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace("127.0.0.1", "0.0.0.0")
        + 'advertise_serve = "tcp://node1:5555"\n'
        + 'advertise_gossip = "tcp://node1:5556"\n'
        + "[[seeds]]\n"
        + 'serve = "tcp://node2:5555"\ngossip = "tcp://node2:5556"\n'
        + "[[seeds]]\n"
        + 'serve = "ipc:///tmp/n3.serve"\ngossip = "ipc:///tmp/n3.gossip"\n'
        + "[routing]\npolicy = 'least_loaded'\nmin_gain_s = 0\n",
    )
    cfg = load_config(path, env={})
    assert cfg.seeds == [
        Seed(serve="tcp://node2:5555", gossip="tcp://node2:5556"),
        Seed(serve="ipc:///tmp/n3.serve", gossip="ipc:///tmp/n3.gossip"),
    ]
    assert cfg.serve_endpoint == "tcp://node1:5555"
    assert cfg.gossip_endpoint == "tcp://node1:5556"
    assert cfg.routing.policy == "least_loaded"
    assert cfg.routing.min_gain_s == 0.0 and isinstance(cfg.routing.min_gain_s, float)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_routing_policy_is_accepted(policy: str) -> None:
    assert config_from_dict(base(routing={"policy": policy})).routing.policy == policy


# ---- errors: file and dotted key in every message -----------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "foo = 1\n")
    assert err.key == "foo"
    assert "unknown key 'foo'" in str(err)


def test_unknown_nested_key_suggests_the_right_one(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "[engine]\nn_slot = 4\n")
    assert str(err).endswith(
        "engine.n_slot: unknown key 'n_slot' in engine (did you mean 'n_slots'?)"
    )


def test_unknown_table(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "[engin]\nn_slots = 4\n")
    assert err.key == "engin"
    assert "did you mean 'engine'" in err.message


def test_wrong_type(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[engine]\nn_slots = "four"\n')
    with pytest.raises(ConfigError) as ei:
        load_config(path, env={})
    assert str(ei.value) == f"{path}: engine.n_slots: expected int, got str"


def test_bool_is_not_an_int(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "max_queue = true\n")
    assert (err.key, err.message) == ("max_queue", "expected int, got bool")


def test_scalar_where_a_table_belongs(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + "routing = 3\n")
    assert (err.key, err.message) == ("routing", "expected table, got int")


def test_missing_required_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, 'node_id = "n1"\nserve_addr = "tcp://127.0.0.1:1"\n')
    assert (err.key, err.message) == ("gossip_addr", "missing required key")


def test_seed_errors_name_the_seed(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '[[seeds]]\nserve = "tcp://h:1"\n')
    assert (err.key, err.message) == ("seeds[0].gossip", "missing required key")
    err = load_error(
        tmp_path,
        MINIMAL
        + '[[seeds]]\nserve = "tcp://h:1"\ngossip = "tcp://h:2"\n'
        + '[[seeds]]\nserve = "tcp://h:3"\ngossip = "tcp://h:99999"\n',
    )
    assert err.key == "seeds[1].gossip"
    assert "port must be 1..65535" in err.message


@pytest.mark.parametrize(
    "addr",
    [
        "127.0.0.1:5555",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:0",
        "tcp://h:65536",
        "udp://h:1",
        "tcp://:5",
        "ipc://",
        "tcp://h:5 ",
    ],
)
def test_bad_bind_address(tmp_path: Path, addr: str) -> None:
    err = load_error(tmp_path, MINIMAL.replace("tcp://127.0.0.1:5555", addr))
    assert err.key == "serve_addr"
    assert repr(addr) in err.message or "ipc://" in err.message


@pytest.mark.parametrize("host", ["*", "0.0.0.0", "[::]"])
def test_wildcards_bind_but_do_not_advertise(tmp_path: Path, host: str) -> None:
    bound = config_from_dict(base(serve_addr=f"tcp://{host}:5555"))
    assert bound.serve_addr == f"tcp://{host}:5555"
    err = load_error(tmp_path, MINIMAL + f'advertise_serve = "tcp://{host}:5555"\n')
    assert err.key == "advertise_serve"
    assert "wildcard" in err.message
    err = load_error(tmp_path, MINIMAL + f'[[seeds]]\nserve = "tcp://{host}:1"\ngossip = "x"\n')
    assert err.key == "seeds[0].serve"


def test_check_address() -> None:
    assert check_address("tcp://[::1]:5555", bind=False) is None
    assert check_address("tcp://node-1.mesh.local:80", bind=False) is None
    assert check_address("ipc:///tmp/zmesh.sock", bind=False) is None
    assert check_address("tcp://*:5555", bind=True) is None
    assert check_address("tcp://*:5555", bind=False) is not None


def test_serve_and_gossip_must_differ(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL.replace(":5556", ":5555"))
    assert err.key == "gossip_addr" and "differ" in err.message


def test_bad_policy_lists_known_ones(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL + '[routing]\npolicy = "longest_match"\n')
    assert err.key == "routing.policy"
    assert "'longest_match'" in err.message
    assert all(p in err.message for p in POLICIES)


@pytest.mark.parametrize(("suspect", "dead"), [(3.0, 3.0), (5.0, 3.0)])
def test_suspect_must_come_before_dead(tmp_path: Path, suspect: float, dead: float) -> None:
    err = load_error(
        tmp_path, MINIMAL + f"[gossip]\nsuspect_after_s = {suspect}\ndead_after_s = {dead}\n"
    )
    assert err.key == "gossip.suspect_after_s"
    assert "dead_after_s" in err.message


@pytest.mark.parametrize(
    ("table", "key", "value", "fragment"),
    [
        ("engine", "n_slots", "0", ">= 1"),
        ("engine", "slot_ctx", "63", ">= 64"),
        ("engine", "block_size", "0", "1..1024"),
        ("engine", "block_size", "1025", "1..1024"),
        ("engine", "max_prompt_tokens", "2048", "slot_ctx"),
        ("engine", "n_threads", "-1", ">= 0"),
        ("engine", "model_path", '""', "path"),
        ("gossip", "heartbeat_interval_s", "0", "> 0"),
        ("gossip", "delta_interval_s", "-0.1", "> 0"),
        ("gossip", "ping_interval_s", "nan", "> 0"),
        ("gossip", "heartbeat_interval_s", "1.5", "suspect_after_s"),
        ("routing", "max_hops", "-1", ">= 0"),
        ("routing", "balance_rel", "0.5", ">= 1.0"),
        ("routing", "forward_timeout_s", "0", "> 0"),
        ("routing", "hash_prefix_tokens", "0", ">= 1"),
        ("routing", "admit_retries", "-1", ">= 0"),
        ("routing", "admit_slack_frac", "nan", ">= 0"),
        ("routing", "admit_slack_s", "-0.5", ">= 0"),
        ("routing", "evict_charge", "1.5", "in [0, 1]"),
        ("faults", "delay_ms", "-1", "0..60000"),
        ("faults", "delay_ms", "inf", "0..60000"),
        ("faults", "partition", '["has space"]', "node id"),
        ("faults", "control_file", '""', "path"),
        ("runtime", "switch_interval_ms", "-1", "0..100"),
        ("runtime", "switch_interval_ms", "nan", "0..100"),
        ("runtime", "switch_interval_ms", "0.01", ">= 0.05"),
        ("runtime", "gc_freeze", "1", "bool"),
    ],
)
def test_range_checks(tmp_path: Path, table: str, key: str, value: str, fragment: str) -> None:
    err = load_error(tmp_path, MINIMAL + f"[{table}]\n{key} = {value}\n")
    assert err.key == f"{table}.{key}"
    assert fragment in err.message


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('node_id = "has space"', "node_id"),
        ("max_queue = 0", "max_queue"),
        ("max_inflight_per_client = -1", "max_inflight_per_client"),
        ('log_level = "loud"', "log_level"),
        ('tenant_shared = ["a", ""]', "tenant_shared"),
    ],
)
def test_top_level_checks(tmp_path: Path, line: str, key: str) -> None:
    text = MINIMAL.replace('node_id = "n1"\n', "") if key == "node_id" else MINIMAL
    err = load_error(tmp_path, text + line + "\n")
    assert err.key == key


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"nope\.toml: cannot read"):
        load_config(missing, env={})
    err = load_error(tmp_path, "node_id = \n")
    assert "invalid TOML" in err.message


def test_configs_built_in_code_are_validated_too() -> None:
    with pytest.raises(ValueError, match="n_slots: must be >= 1"):
        EngineConfig(n_slots=0)
    with pytest.raises(ValueError, match="suspect_after_s"):
        GossipConfig(suspect_after_s=9.0)


def test_config_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(base(engine={"n_slots": "x"}), source="lab n0")
    assert str(ei.value) == "lab n0: engine.n_slots: expected int, got str"


# ---- environment overrides ----------------------------------------------------------


def test_env_overrides_apply_typed_values(tmp_path: Path) -> None:
    env = {
        "ZMESH_NODE_ID": "n7",
        "ZMESH_SERVE_ADDR": "tcp://127.0.0.1:6000",
        "ZMESH_ENGINE__N_SLOTS": "4",
        "ZMESH_GOSSIP__DEAD_AFTER_S": "5",
        "ZMESH_ROUTING__POLICY": "random",
        "ZMESH_SEEDS": '[{serve = "tcp://h:1", gossip = "tcp://h:2"}]',
        "HOME": "/root",  # not ours: ignored
    }
    cfg = load_config(write(tmp_path, MINIMAL), env=env)
    assert cfg.node_id == "n7"
    assert cfg.serve_addr == "tcp://127.0.0.1:6000"
    assert cfg.engine.n_slots == 4
    assert cfg.gossip.dead_after_s == 5.0
    assert cfg.routing.policy == "random"
    assert cfg.seeds == [Seed(serve="tcp://h:1", gossip="tcp://h:2")]


def test_env_string_keys_are_verbatim_and_empty_resets_optional() -> None:
    d = base(advertise_serve="tcp://h:1")
    out = apply_env_overrides(d, {"ZMESH_NODE_ID": "123", "ZMESH_ADVERTISE_SERVE": ""})
    assert out["node_id"] == "123"  # not parsed into an int
    assert out["advertise_serve"] is None
    assert d["advertise_serve"] == "tcp://h:1", "the input dict is not mutated"
    assert config_from_dict(out).node_id == "123"


def test_env_overrides_via_os_environ_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ZMESH_MAX_QUEUE", "9")
    assert load_config(write(tmp_path, MINIMAL)).max_queue == 9
    assert load_config(write(tmp_path, MINIMAL), env={}).max_queue == 64


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("ZMESH_ENGINE__N_SLOTZ", "unknown config key 'engine.n_slotz'"),
        ("ZMESH_NODEID", "unknown config key 'nodeid'"),
        ("ZMESH_NODE_ID__X", "'node_id' is not a table"),
    ],
)
def test_unknown_env_keys_are_errors(tmp_path: Path, name: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, MINIMAL), env={name: "1"})
    assert str(ei.value) == f"environment: {name}: {fragment}"


def test_bad_env_value_names_the_variable(tmp_path: Path) -> None:
    err = load_error(tmp_path, MINIMAL, env={"ZMESH_ENGINE__N_SLOTS": "lots"})
    assert err.key == "engine.n_slots"
    assert err.message == "expected int, got str (set by ZMESH_ENGINE__N_SLOTS)"


# ---- dump_toml ----------------------------------------------------------------------


def test_dump_toml_round_trips_through_load(tmp_path: Path) -> None:
    cfg = config_from_dict(
        base(
            advertise_serve="tcp://node1:5555",
            seeds=[
                {"serve": "tcp://h:1", "gossip": "tcp://h:2"},
                {"serve": "ipc:///tmp/a b", "gossip": "ipc:///tmp/c"},
            ],
            tenant_shared=["acme", 'we "quote"\\ and\ttab'],
            engine={"model_path": "/m/x.gguf", "n_slots": 3, "n_gpu_layers": -1},
            gossip={"delta_interval_s": 1e-05, "dead_after_s": 4},
            routing={"policy": "consistent_hash", "balance_rel": 2.0},
        )
    )
    text = dump_toml(cfg)
    assert load_config(write(tmp_path, text), env={}) == cfg
    assert "advertise_gossip" not in text  # None is left out: TOML has no null


def test_dump_toml_of_defaults_equals_the_example() -> None:
    cfg = load_config(EXAMPLE, env={})
    # The example leaves [[seeds]] commented out (a lone node); the writer says seeds = [].
    assert tomllib.loads(dump_toml(cfg)) == {"seeds": [], **tomllib.loads(EXAMPLE.read_text())}


@settings(max_examples=100)
@given(
    tenants=st.lists(st.text(min_size=1, max_size=20), max_size=4),
    n_slots=st.integers(1, 64),
    min_gain=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
def test_dump_toml_round_trips_any_text(tenants: list[str], n_slots: int, min_gain: float) -> None:
    """Control characters, quotes, DEL and non-ASCII all survive the writer."""
    cfg = config_from_dict(
        base(tenant_shared=tenants, engine={"n_slots": n_slots}, routing={"min_gain_s": min_gain})
    )
    assert config_from_dict(tomllib.loads(dump_toml(cfg))) == cfg


@pytest.mark.parametrize(
    ("http", "key", "why"),
    [
        ({"port": 70000}, "http.port", "0..65535"),
        ({"api_keys": [{"key": "short"}]}, "http.api_keys", "at least 16"),
        ({"api_keys": [{"key": "k" * 20, "tenants": []}]}, "http.api_keys", "tenant names"),
        ({"api_keys": [{"key": "k" * 20}, {"key": "k" * 20}]}, "http.api_keys", "distinct"),
        ({"timeout_s": 0}, "http.timeout_s", "> 0"),
    ],
)
def test_http_section_is_checked(http: dict[str, Any], key: str, why: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict(base(http=http))
    assert exc.value.key is not None and exc.value.key.startswith(key), exc.value
    assert why in exc.value.message
    assert config_from_dict(base(http={"port": 8080})).http.api_keys == []
