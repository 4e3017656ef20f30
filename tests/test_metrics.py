"""Prometheus metrics: real nodes in this process, scraped over HTTP and parsed with
prometheus_client's own text parser."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
from meshkit import RunningNode
from prometheus_client.parser import text_string_to_metric_families

from zmesh import protocol as P
from zmesh.client import Client
from zmesh.config import ConfigError, EngineConfig, NodeConfig, config_from_dict
from zmesh.engine import Engine
from zmesh.lab import free_ports
from zmesh.metrics import metrics_bind_host

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
SHARED = "Metrics test. " + "Shared preamble about rivers and their deltas. " * 12
# Another prefix for the two-node test: the module's engines already hold SHARED.
ONLY_ON_B = "Forwarding test. " + "A long preamble about mountains and glaciers. " * 12


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} from the Prometheus text format."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(resp.read().decode())


def node_config(
    name: str, ports: list[int], seeds: list[dict[str, str]], **kw: object
) -> NodeConfig:
    return config_from_dict(
        {
            "node_id": name,
            "serve_addr": f"tcp://127.0.0.1:{ports[0]}",
            "gossip_addr": f"tcp://127.0.0.1:{ports[1]}",
            "metrics_port": ports[2],
            "seeds": seeds,
            **kw,
        }
    )


@pytest.fixture(scope="module")
def engines() -> Iterator[list[Engine]]:
    # Engines of their own: nodes drain cache events the shared fixtures' tests expect.
    engs = [Engine(EngineConfig(n_slots=2, slot_ctx=512)) for _ in range(2)]
    yield engs
    for e in engs:
        e.close()


# ---- config and unit level ------------------------------------------------------------


def test_metrics_port_is_validated() -> None:
    base = {"node_id": "n", "serve_addr": "tcp://127.0.0.1:5555", "gossip_addr": "ipc:///tmp/g"}
    assert config_from_dict(base).metrics_port == 0  # off by default
    assert config_from_dict({**base, "metrics_port": 9100}).metrics_port == 9100
    with pytest.raises(ConfigError, match=r"metrics_port: must be in 0\.\.65535"):
        config_from_dict({**base, "metrics_port": 70000})
    with pytest.raises(ConfigError, match="metrics_port: 5555 is also the serve or gossip port"):
        config_from_dict({**base, "metrics_port": 5555})
    with pytest.raises(ConfigError, match="metrics_port: expected int"):
        config_from_dict({**base, "metrics_port": "9100"})


@pytest.mark.parametrize(
    ("serve", "host"),
    [
        ("tcp://127.0.0.1:5555", "127.0.0.1"),
        ("tcp://0.0.0.0:5555", "0.0.0.0"),
        ("tcp://*:5555", "0.0.0.0"),
        ("tcp://[::]:5555", "::"),
        ("tcp://10.1.2.3:5555", "10.1.2.3"),
        ("ipc:///tmp/zmesh.sock", "127.0.0.1"),
    ],
)
def test_metrics_listen_on_the_serve_host(serve: str, host: str) -> None:
    assert metrics_bind_host(serve) == host


def on_loop(running: RunningNode, fn: Callable[[], object]) -> None:
    """Run ``fn`` on the node's event-loop thread (where the node counts) and wait."""

    async def call() -> None:
        fn()

    asyncio.run_coroutine_threadsafe(call(), running.loop).result(timeout=10)


def test_counter_names_map_to_metrics(engines: list[Engine]) -> None:
    """Each counter name a real node counts lands in its metric; the gauges come from
    the node's status view."""
    done = P.Done(
        request_id="r",
        text="x",
        finish_reason="length",
        served_by="n",
        hops=0,
        route_reason="local_best",
        route_path=["n"],
        prompt_tokens=40,
        cached_tokens=32,
        completion_tokens=4,
        ttft_s=0.07,
        prefill_s=0.01,
        decode_tps=50.0,
    )
    ports = free_ports(3)
    running = RunningNode(node_config("n", ports, []), engines[0])
    try:
        node = running.node

        def events() -> None:
            for name in ["requests_received", "route_prefix", "route_prefix", "forwards"]:
                node.count(name)
            node.count("requests_overloaded")
            node.count("snapshots_served", 3)
            node.count("prompt_tokens", 40)
            node.metrics.answered(done, local=True, evicted_tokens=12)
            node.metrics.answered(done, local=False)

        on_loop(running, events)
        s = scrape(ports[2])
        model = str(node.engine.model_path)
    finally:
        running.stop()
    assert value(s, "zmesh_node_info", node_id="n", policy="zmesh", model=model) == 1
    assert value(s, "zmesh_requests_received_total") == 1
    assert value(s, "zmesh_route_decisions_total", reason="prefix") == 2
    assert value(s, "zmesh_forwards_total") == 1
    assert value(s, "zmesh_requests_failed_total", reason="overloaded") == 1
    assert value(s, "zmesh_events_total", event="snapshots_served") == 3
    assert value(s, "zmesh_prompt_tokens_total") == 40
    assert value(s, "zmesh_requests_total", outcome="served", route_reason="local_best") == 1
    assert value(s, "zmesh_requests_total", outcome="forwarded", route_reason="local_best") == 1
    # TTFT, completion tokens and evictions belong to the node that served it.
    assert value(s, "zmesh_ttft_seconds_count") == 1
    assert value(s, "zmesh_ttft_seconds_bucket", le="0.1") == 1
    assert value(s, "zmesh_ttft_seconds_bucket", le="0.05") == 0
    assert value(s, "zmesh_completion_tokens_total") == 4
    assert value(s, "zmesh_evictions_total") == 1
    assert value(s, "zmesh_evicted_tokens_total") == 12
    # The gauges: an idle node with two slots and no peers.
    assert value(s, "zmesh_slots_total") == 2
    assert value(s, "zmesh_queue_depth") == 0
    assert value(s, "zmesh_peers", state="alive") == 0


# ---- real nodes, scraped over HTTP ----------------------------------------------------


def test_single_node_metrics_move_when_a_request_is_served(engines: list[Engine]) -> None:
    ports = free_ports(3)
    running = RunningNode(node_config("solo", ports, []), engines[0])
    try:
        before = scrape(ports[2])
        assert value(before, "zmesh_requests_received_total") == 0
        assert value(before, "zmesh_slots_total") == 2
        assert value(before, "zmesh_queue_depth") == 0
        with Client([f"tcp://127.0.0.1:{ports[0]}"], timeout=60) as client:
            first = client.generate(SHARED + "Question one?", max_tokens=4)
            second = client.generate(SHARED + "Question two?", max_tokens=4)
        assert second.cached_tokens > 0, second  # the shared preamble was reused
        after = scrape(ports[2])
    finally:
        running.stop()
    assert value(after, "zmesh_requests_received_total") == 2
    assert value(after, "zmesh_requests_total", outcome="served", route_reason="no_peers") == 2
    assert value(after, "zmesh_route_decisions_total", reason="no_peers") == 2
    assert value(after, "zmesh_ttft_seconds_count") == 2
    assert value(after, "zmesh_ttft_seconds_sum") > 0
    assert value(after, "zmesh_prompt_tokens_total") == first.prompt_tokens + second.prompt_tokens
    assert value(after, "zmesh_cached_tokens_total") == first.cached_tokens + second.cached_tokens
    assert value(after, "zmesh_completion_tokens_total") == (
        first.completion_tokens + second.completion_tokens
    )
    assert value(after, "zmesh_slots_used") >= 1
    assert value(after, "zmesh_cached_blocks") > 0
    assert value(after, "zmesh_forwards_total") == 0


@pytest.mark.slow
def test_two_nodes_export_forwards_and_per_peer_gossip(engines: list[Engine]) -> None:
    pa, pb = free_ports(3), free_ports(3)
    seed_b = {"serve": f"tcp://127.0.0.1:{pb[0]}", "gossip": f"tcp://127.0.0.1:{pb[1]}"}
    a = RunningNode(node_config("m-a", pa, [seed_b]), engines[0])
    b = RunningNode(node_config("m-b", pb, []), engines[1])
    try:
        with Client([f"tcp://127.0.0.1:{pa[0]}"], timeout=60) as client:
            primed = client.generate(
                ONLY_ON_B + "Prime b.", max_tokens=2, endpoint=f"tcp://127.0.0.1:{pb[0]}"
            )
            assert primed.served_by == "m-b"
            # Wait until node-a's estimate of m-b holds everything m-b advertises.
            deadline = time.monotonic() + 30
            while True:
                own = client.status(f"tcp://127.0.0.1:{pb[0]}").n_blocks
                seen = [
                    p.n_blocks
                    for p in client.status(f"tcp://127.0.0.1:{pa[0]}").peers
                    if p.node_id == "m-b"
                ]
                if seen == [own] and own > 0:
                    break
                assert time.monotonic() < deadline, "m-a never learned m-b's blocks"
                time.sleep(0.05)
            hit = client.generate(ONLY_ON_B + "Forward me.", max_tokens=2)
        assert hit.served_by == "m-b" and hit.route_reason == "prefix", hit
        sa, sb = scrape(pa[2]), scrape(pb[2])
    finally:
        a.stop()
        b.stop()
    assert value(sa, "zmesh_forwards_total") == 1
    assert value(sa, "zmesh_forwards_answered_total") == 1
    assert value(sa, "zmesh_requests_total", outcome="forwarded", route_reason="prefix") == 1
    assert value(sa, "zmesh_ttft_seconds_count") == 0  # served elsewhere
    assert value(sb, "zmesh_requests_total", outcome="served", route_reason="hop_limit") == 1
    assert value(sb, "zmesh_ttft_seconds_count") == 2
    assert value(sa, "zmesh_peers", state="alive") == 1
    assert value(sa, "zmesh_peer_estimate_blocks", peer="m-b") > 0
    assert 0 <= value(sa, "zmesh_peer_estimate_age_seconds", peer="m-b") < 1.0
    assert ("zmesh_peer_gossip_lag_seconds", (("peer", "m-b"),)) in sa
    assert value(sa, "zmesh_peer_estimate_seq_lag", peer="m-b") == 0
