"""Service-time model of one node, calibrated from the engine benchmark.

A request that finds ``cached`` of its ``prompt`` tokens in a slot costs::

    ttft    = base_s + (prompt - cached) * prefill_s_per_token
    service = ttft + (completion - 1) * decode_s_per_token

``base_s`` is what a fully cached prompt still costs (sampler, the last token's
logits): the engine benchmark's warm TTFT minus the few tokens it prefilled.

A node that runs k requests in one batch (continuous batching) serves each of them
``slowdown(k) = 1 + batch_beta * (k - 1)`` times slower than one alone: one
llama_decode step for k sequences costs that much more than a step for one.
``batch_beta`` comes from `zmesh bench engine --concurrency` (aggregate tokens/s at
k in flight over one at a time is k / slowdown(k)); 0 would be a free batch, 1 no
gain at all.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "CostModel", "load_cost_model"]


@dataclass(frozen=True, slots=True)
class CostModel:
    prefill_s_per_token: float
    base_s: float
    decode_s_per_token: float
    source: str = "custom"
    batch_beta: float = 0.0

    def slowdown(self, running: int) -> float:
        """How much slower each of ``running`` requests in one batch is served."""
        return 1.0 + self.batch_beta * max(running - 1, 0)

    def ttft_s(self, uncached: int) -> float:
        return self.base_s + max(uncached, 0) * self.prefill_s_per_token

    def service_s(self, uncached: int, completion: int) -> float:
        return self.ttft_s(uncached) + max(completion - 1, 0) * self.decode_s_per_token

    @classmethod
    def from_engine_bench(cls, res: dict[str, Any], source: str = "engine bench") -> CostModel:
        """From the JSON of `python -m zmesh.bench.engine --json`."""
        prefill = 1.0 / float(res["prefill_tokens_per_s"])
        uncached_warm = float(res["prompt_tokens"]) - float(res["warm_mean_cached_tokens"])
        base = max(float(res["warm_ttft_mean_s"]) - uncached_warm * prefill, 0.0)
        decode = 1.0 / float(res["decode_tokens_per_s"])
        return cls(prefill, base, decode, source)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Measured on this project's machines (2 CPU cores, gemma-3-270m Q4_K_M) with
# `python -m zmesh.bench.engine --json`: cold prefill ~500 tokens/s, warm TTFT
# 0.035 s for a 675-token prompt with 669 tokens cached, decode ~64 tokens/s.
CPU_ENGINE_BENCH = {
    "prefill_tokens_per_s": 500.0,
    "prompt_tokens": 675,
    "warm_mean_cached_tokens": 669,
    "warm_ttft_mean_s": 0.035,
    "decode_tokens_per_s": 64.0,
}
# `taskset -c 1 zmesh bench engine --concurrency 1,3,6 --sequential --threads 1
# --requests 12 --json` (docs/evaluation.md, continuous batching): 3 busy slots gave
# 1.44x the tokens/s of one at a time, so each of the 3 ran 3 / 1.44 = 2.08x slower.
CPU_BATCH_BETA = (3 / 1.44 - 1) / 2

PRESETS: dict[str, CostModel] = {
    "cpu": replace(
        CostModel.from_engine_bench(CPU_ENGINE_BENCH, "cpu: engine bench, 2 cores"),
        batch_beta=CPU_BATCH_BETA,
    ),
    # Not measured here: a GPU-class server (prefill 20k tokens/s, decode 100 tokens/s).
    # It shows where the inter-node delay, not prefill, dominates what a hit saves.
    # Decode there is bound by memory bandwidth: a batch of k costs little more than one.
    "gpu": CostModel(1 / 20000, 0.010, 0.010, "gpu: illustrative, not measured", 0.05),
}


def load_cost_model(spec: str | os.PathLike[str] | None) -> CostModel:
    """A preset name (``cpu``, ``gpu``) or a path to an engine-benchmark JSON file."""
    if spec is None:
        return PRESETS["cpu"]
    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if not path.exists():
        raise ValueError(f"unknown cost model {spec!r}: a preset ({', '.join(PRESETS)}) or a file")
    text = path.read_text().strip().splitlines()
    # The benchmark prints progress on stderr and one JSON object on stdout's last line.
    return CostModel.from_engine_bench(json.loads(text[-1]), f"engine bench {path.name}")
