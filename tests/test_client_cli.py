"""Client library and CLI against a real 2-node lab: failover, errors, streaming, commands."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import zmq
from meshkit import started

from zmesh import (
    AsyncClient,
    Chunk,
    Client,
    Done,
    NoEndpointAvailable,
    RequestError,
    RequestTimeout,
)
from zmesh.lab import Lab, free_ports

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab2():
    with started(Lab(n_nodes=2, engine={"n_slots": 2, "slot_ctx": 512}), timeout=90) as lab:
        yield lab


def dead_endpoint() -> str:
    return f"tcp://127.0.0.1:{free_ports(1)[0]}"


def test_client_fails_over_from_a_dead_endpoint(lab2: Lab) -> None:
    with Client([dead_endpoint(), lab2.endpoints[1]], connect_timeout=0.3) as c:
        done = c.generate("The sea is", max_tokens=3)
    assert isinstance(done, Done) and done.completion_tokens >= 1
    assert done.served_by in {n.name for n in lab2.nodes}


def test_no_endpoint_and_timeout_errors_are_clear() -> None:
    with (
        Client([dead_endpoint()], connect_timeout=0.2) as c,
        pytest.raises(NoEndpointAvailable),
    ):
        c.generate("hello", max_tokens=2)
    # A socket that accepts but never answers: the client times out, not hangs.
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    try:
        with Client([f"tcp://127.0.0.1:{port}"]) as c, pytest.raises(RequestTimeout):
            c.generate("hello", max_tokens=2, timeout=0.5)
    finally:
        ctx.destroy(linger=0)


def test_request_errors_carry_codes_and_the_node_keeps_serving(lab2: Lab) -> None:
    with Client(lab2.endpoints) as c:
        with pytest.raises(RequestError) as info:
            c.generate("word " * 600, max_tokens=2)
        assert info.value.code == "prompt_too_long" and info.value.node_id
        with pytest.raises(RequestError) as info:
            c.generate("fine", max_tokens=0)
        assert info.value.code == "invalid_request"
        assert c.generate("Still alive?", max_tokens=2).completion_tokens >= 1


def test_stream_chunks_add_up_to_the_answer(lab2: Lab) -> None:
    with Client(lab2.endpoints) as c:
        events = list(c.stream("Name three colours:", max_tokens=16))
    chunks = [e for e in events if isinstance(e, Chunk)]
    final = events[-1]
    assert isinstance(final, Done) and chunks and final.completion_tokens >= 1
    assert "".join(ch.text for ch in chunks) == final.text
    assert all(ch.request_id == final.request_id and ch.attempt == 0 for ch in chunks)
    assert [ch.index for ch in chunks] == list(range(len(chunks)))


def test_async_client_runs_concurrent_requests(lab2: Lab) -> None:
    async def main() -> list[Done]:
        async with AsyncClient(lab2.endpoints) as c:
            return await asyncio.gather(
                *(c.generate(f"Fact {i}: the number {i} is", max_tokens=3) for i in range(6))
            )

    results = asyncio.run(main())
    assert len({r.request_id for r in results}) == 6
    assert all(r.completion_tokens >= 1 for r in results)


def zmesh_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zmesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_cli_ask_and_status(lab2: Lab) -> None:
    ep = lab2.endpoints[0]
    r = zmesh_cli("ask", "The moon is", "--max-tokens", "4", "--endpoint", ep)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "served by node-" in r.stderr
    r = zmesh_cli("ask", "The moon is", "--max-tokens", "4", "--endpoint", ep, "--json")
    assert json.loads(r.stdout)["served_by"].startswith("node-")
    r = zmesh_cli("status", "--endpoint", ep, "--json")
    st = json.loads(r.stdout)
    assert r.returncode == 0 and st["node_id"] == "node-a"
    assert [p["node_id"] for p in st["peers"]] == ["node-b"]
    r = zmesh_cli("status", "--endpoint", dead_endpoint(), "--timeout", "0.5")
    assert r.returncode == 1 and "could not connect" in r.stderr


def test_cli_lab_once_answers_and_stops() -> None:
    """README's main command, on free ports."""
    base = free_ports(1)[0]
    r = zmesh_cli(
        "lab",
        "--nodes",
        "2",
        "--base-port",
        str(base),
        "--slots",
        "2",
        "--ask",
        "The capital of France is",
        "--max-tokens",
        "4",
        "--once",
    )
    assert r.returncode == 0, r.stderr
    assert "converged" in r.stderr and "served by node-" in r.stderr and r.stdout


def test_cli_node_rejects_a_bad_config(tmp_path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'node_id = "x"\nserve_addr = "tcp://127.0.0.1:1"\n'
        'gossip_addr = "tcp://127.0.0.1:2"\n[engine]\nn_slot = 3\n'
    )
    r = zmesh_cli("node", "--config", str(bad), timeout=60)
    assert r.returncode == 2 and "engine" in r.stderr and "n_slot" in r.stderr
