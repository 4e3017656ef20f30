"""Figures shared by the cluster benchmark and the simulator, and their plots.

`summarize` turns per-request measurements into the figures both report (TTFT and
end-to-end mean / p50 / p99, throughput, cluster prefix-hit rate, forwards,
fallbacks, load spread). Plotting needs matplotlib (the ``bench`` or ``test`` extra); without it
the JSON is still written and the plots are skipped with a note.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "percentile",
    "plot_policy_bars",
    "plot_ttft_cdf",
    "ratio",
    "summarize",
    "ttft_ratios",
]


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1); NaN for no data."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def ttft_ratios(
    results: Mapping[str, Mapping[str, Any]],
    *,
    tag: str = "",
    ship: str | None = None,
    over_ship: Sequence[str] = (),
) -> dict[str, float]:
    """The Done-criteria ratios on mean TTFT over all requests: zmesh over every other
    policy, random over zmesh and, where policy `ship` (zmesh with KV shipping) ran,
    each of `over_ship` over it. `tag` goes before "over" in the keys: the cluster
    bench writes `zmesh_over_random`, the simulator `zmesh_ttft_over_random`."""
    out: dict[str, float] = {}
    z = results.get("zmesh")
    if z is None:
        return out
    for name, f in results.items():
        if name != "zmesh":
            out[f"zmesh_{tag}over_{name}"] = round(ratio(z["ttft_mean_s"], f["ttft_mean_s"]), 3)
    if "random" in results:
        out[f"random_{tag}over_zmesh"] = round(
            ratio(results["random"]["ttft_mean_s"], z["ttft_mean_s"]), 3
        )
    shipped = results.get(ship) if ship is not None else None
    if shipped is not None:
        for name in over_ship:
            if name in results:
                out[f"{name}_{tag}over_zmesh_ship"] = round(
                    ratio(results[name]["ttft_mean_s"], shipped["ttft_mean_s"]), 3
                )
    return out


def _r(x: float, nd: int = 4) -> float:
    return round(x, nd) if math.isfinite(x) else x


def summarize(
    *,
    ttft: Sequence[float],
    e2e: Sequence[float],
    prompt_tokens: Sequence[int],
    cached_tokens: Sequence[int],
    per_node: Sequence[int],
    wall_s: float,
    forwards: int,
    fallbacks: int,
    errors: int,
) -> dict[str, Any]:
    """The per-policy figures (times in seconds, hit rate = cached / prompt tokens)."""
    n = len(ttft)
    mean_load = statistics.fmean(per_node) if per_node else 0.0
    prompt = sum(prompt_tokens)
    return {
        "requests": n,
        "errors": errors,
        "ttft_mean_s": _r(statistics.fmean(ttft) if n else math.nan),
        "ttft_p50_s": _r(percentile(ttft, 0.5)),
        "ttft_p99_s": _r(percentile(ttft, 0.99)),
        "e2e_mean_s": _r(statistics.fmean(e2e) if n else math.nan),
        "e2e_p50_s": _r(percentile(e2e, 0.5)),
        "e2e_p99_s": _r(percentile(e2e, 0.99)),
        "throughput_rps": _r(n / wall_s if wall_s > 0 else math.nan, 3),
        "hit_rate": _r(sum(cached_tokens) / prompt if prompt else 0.0),
        "prompt_tokens": prompt,
        "cached_tokens": sum(cached_tokens),
        "forwards": forwards,
        "fallbacks": fallbacks,
        "load_spread": _r(max(per_node) / mean_load if mean_load else math.nan, 3),
        "per_node": list(per_node),
    }


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_policy_bars(
    policies: Mapping[str, Mapping[str, Any]],
    path: Path,
    title: str,
    say: Callable[[str], None] | None = None,
) -> Path | None:
    """Four panels: mean/p99 TTFT, hit rate, load spread, throughput, one bar per policy."""
    plt = _pyplot()
    if plt is None:
        if say:
            say("matplotlib is not installed: plots skipped (pip install matplotlib)")
        return None
    names = list(policies)
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.2))
    x = range(len(names))
    mean = [policies[p]["ttft_mean_s"] for p in names]
    p99 = [policies[p]["ttft_p99_s"] for p in names]
    axes[0].bar([i - 0.2 for i in x], mean, 0.4, label="mean")
    axes[0].bar([i + 0.2 for i in x], p99, 0.4, label="p99")
    axes[0].set_ylabel("TTFT (s)")
    axes[0].legend()
    axes[1].bar(x, [policies[p]["hit_rate"] for p in names], color="tab:green")
    axes[1].set_ylabel("prefix-hit rate (cached / prompt tokens)")
    axes[1].set_ylim(0, 1)
    axes[2].bar(x, [policies[p]["load_spread"] for p in names], color="tab:orange")
    axes[2].set_ylabel("load spread (max / mean requests per node)")
    axes[3].bar(x, [policies[p]["throughput_rps"] for p in names], color="tab:purple")
    axes[3].set_ylabel("throughput (requests / s)")
    for ax in axes:
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, rotation=30, ha="right")
    fig.suptitle(title)
    return _save(plt, fig, path)


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_cdf(
    samples: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
) -> Path | None:
    """The TTFT distribution of each policy (log-scale x)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, xs in samples.items():
        s = sorted(x for x in xs if math.isfinite(x) and x > 0)
        if s:
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return _save(plt, fig, path)
