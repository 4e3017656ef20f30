"""Seeded, reproducible workloads and their figures, shared by the benchmarks and the simulator.

- `base`: `Request`, `Workload` (requests in issue order, streams), Zipf popularity;
- `arrivals`: `Arrivals` (Poisson, closed loop, bursts) and their seeded times;
- `mmlu`: MMLU 5-shot (subject prefixes, Zipf over subjects);
- `synthetic`: shared system prompts, multi-turn chat, bursty long conversations;
- `catalog`: `make_workload` by name, `WORKLOADS`;
- `report`: `summarize` (the figures every run reports) and the plots.

The same seed always gives the same requests, prompts and arrival times. Neither
`zmesh.bench` nor `zmesh.sim` is imported here: both import this package.
"""

from zmesh.workload.arrivals import Arrivals, burst_arrivals, poisson_arrivals
from zmesh.workload.base import Request, Workload, ZipfSampler, zipf_weights
from zmesh.workload.catalog import WORKLOADS, make_workload
from zmesh.workload.mmlu import (
    MMLU_ENV,
    MmluQuestion,
    load_mmlu,
    mmlu_dir,
    mmlu_prefix,
    mmlu_question,
    mmlu_workload,
)
from zmesh.workload.synthetic import bursty_workload, chat_workload, shared_prefix_workload

__all__ = [
    "MMLU_ENV",
    "WORKLOADS",
    "Arrivals",
    "MmluQuestion",
    "Request",
    "Workload",
    "ZipfSampler",
    "burst_arrivals",
    "bursty_workload",
    "chat_workload",
    "load_mmlu",
    "make_workload",
    "mmlu_dir",
    "mmlu_prefix",
    "mmlu_question",
    "mmlu_workload",
    "poisson_arrivals",
    "shared_prefix_workload",
    "zipf_weights",
]
