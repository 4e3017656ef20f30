"""`zmesh bench mesh` runs end to end on a real 2-node lab and reports its figures:
the hop's paired differences and, with --null, the same difference for no hop."""

from __future__ import annotations

import json
import subprocess
import sys


def test_mesh_bench_reports_the_hop_and_the_null_pair() -> None:
    args = ["--nodes", "2", "--pairs", "4", "--null", "--no-failover", "--json"]
    out = subprocess.run(
        [sys.executable, "-m", "zmesh", "bench", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    (res,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert res["nodes"] == 2 and res["variant"] == "defaults"
    for name in ("hop_net_ms", "hop_holder_ms", "hop_outside_ms", "null_net_ms"):
        assert isinstance(res[f"{name}_p50"], float) and res[f"{name}_p99"] >= res[f"{name}_p50"]
    # Every request took its model's time: a latency, not a placeholder.
    assert res["direct_ms_p50"] > 0 and res["forwarded_ms_p50"] > 0
