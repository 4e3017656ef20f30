"""The cluster benchmark's figures per policy, the ratios, and the machine they ran on."""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from zmesh import protocol as P
from zmesh.bench.sender import Record
from zmesh.workload.report import summarize, ttft_ratios

ORACLE = "oracle"
ZMESH_SHIP = "zmesh_ship"  # the zmesh policy with KV shipping on (routing.ship)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def figures(
    records: list[Record], wall: float, names: Sequence[str], statuses: Sequence[P.Status]
) -> dict[str, Any]:
    ok = [r for r in records if not r.error and not math.isnan(r.ttft_s)]
    per_node = [sum(1 for r in ok if r.served_by == n) for n in names]
    out = summarize(
        ttft=[r.ttft_s for r in ok],
        e2e=[r.e2e_s for r in ok],
        prompt_tokens=[r.prompt_tokens for r in ok],
        cached_tokens=[r.cached_tokens for r in ok],
        per_node=per_node,
        wall_s=wall,
        forwards=sum(1 for r in ok if r.hops > 0),
        fallbacks=sum(1 for r in ok if r.route_reason == "fallback"),
        errors=len(records) - len(ok),
    )
    out["server_ttft_mean_s"] = (
        round(statistics.fmean([r.server_ttft_s for r in ok]), 4) if ok else math.nan
    )
    out["wall_s"] = round(wall, 2)
    reasons: dict[str, int] = {}
    for r in ok:
        reasons[r.route_reason] = reasons.get(r.route_reason, 0) + 1
    out["reasons"] = dict(sorted(reasons.items()))
    counters: dict[str, int] = {}
    for st in statuses:
        for k in (
            "forwards",
            "forward_fallbacks",
            "snapshots_requested",
            "requests_served",
            "kv_fetched",
            "kv_fetched_bytes",
            "kv_fetch_failed",
            "kv_import_refused",
        ):
            counters[k] = counters.get(k, 0) + int(st.counters.get(k, 0))
    out["node_counters"] = counters
    shipped = [r for r in ok if r.shipped_tokens]
    out["shipped_requests"] = len(shipped)
    out["shipped_tokens_mean"] = (
        round(statistics.fmean(r.shipped_tokens for r in shipped), 1) if shipped else 0.0
    )
    out["shipped_bytes_per_request"] = (
        round(counters.get("kv_fetched_bytes", 0) / len(ok)) if ok else 0
    )
    # Seconds per prefilled token on cold requests: shows CPU contention (ours or others').
    cold = [
        (r.server_ttft_s - r.queue_s) / (r.prompt_tokens - r.cached_tokens)
        for r in ok
        if r.prompt_tokens - r.cached_tokens >= 100
    ]
    out["cold_prefill_s_per_token"] = round(statistics.fmean(cold), 5) if cold else math.nan
    mirrored = [r for r in ok if r.predicted_cached >= 0]
    if mirrored:
        # How often the oracle's slot mirror named the reuse the engine really got.
        exact = sum(r.predicted_cached == r.cached_tokens for r in mirrored)
        out["oracle_mirror_exact"] = round(exact / len(mirrored), 4)
    return out


def steady(records: list[Record], warmup: int) -> dict[str, float]:
    """Mean / p99 TTFT and hit rate without the first ``warmup`` requests (cold start)."""
    rest = [r for r in records[warmup:] if not r.error and not math.isnan(r.ttft_s)]
    if not rest:
        return {}
    xs = sorted(r.ttft_s for r in rest)
    prompt = sum(r.prompt_tokens for r in rest)
    return {
        "requests": len(rest),
        "ttft_mean_s": round(statistics.fmean(xs), 4),
        "ttft_p99_s": round(xs[min(len(xs) - 1, math.ceil(0.99 * len(xs)) - 1)], 4),
        "hit_rate": round(sum(r.cached_tokens for r in rest) / prompt, 4) if prompt else 0.0,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The Done-criteria ratios, on mean TTFT over all requests (with KV shipping's)."""
    return ttft_ratios(results, ship=ZMESH_SHIP, over_ship=("random", ORACLE))


def loadavg() -> float:
    """The 1-minute load average (other users of the machine skew timings)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return math.nan


def machine() -> dict[str, Any]:
    import os
    import platform

    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
