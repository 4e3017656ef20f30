"""`zmesh bench gateway` on a tiny real run: lab nodes behind the real SGLang gateway."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("smg") is None, reason="the gateway (smg) is not installed"
    ),
]


@pytest.mark.timeout(400)
def test_gateway_benchmark_fronts_the_nodes_and_reports_each_system(tmp_path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "zmesh",
            "bench",
            "gateway",
            "--nodes",
            "2",
            "--slots",
            "2",
            "--workloads",
            "shared",
            "--groups",
            "2",
            "--requests",
            "8",
            "--systems",
            "zmesh,gateway-cache_aware",
            "--out",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=380,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)["workloads"]["shared"]
    assert set(res["systems"]) == {"zmesh", "gateway-cache_aware"}
    for name, f in res["systems"].items():
        assert f["requests"] == 8 and f["errors"] == 0, name
        assert f["ttft_mean_s"] > 0, name
        # Served requests were counted per node: the nodes' facts came through the
        # gateway's SSE pass-through (the last chunk's zmesh field and usage).
        assert sum(f["per_node"]) == 8, name
        assert 0 < f["hit_rate"] < 1, name
    # Behind the gateway the nodes run local-only: the gateway alone chose the node.
    assert res["systems"]["gateway-cache_aware"]["forwards"] == 0
    assert "zmesh_over_gateway-cache_aware" in res["ratios"]
    assert list(tmp_path.glob("gateway-*.json"))
    assert list(tmp_path.glob("gateway-*-shared.png"))
