"""What the HTTP door costs: TTFT over HTTP (SSE) against the ZeroMQ client, same node.

One lab node; the same short prompt (cached after the first request, so prefill is
one token) is sent `--requests` times over each path, alternating, streamed, one
at a time. TTFT is measured by the caller: the first chunk with text.

    zmesh bench http --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from zmesh import protocol as P
from zmesh.bench.figures import loadavg, say
from zmesh.client import AsyncClient
from zmesh.lab import Lab
from zmesh.workload.report import percentile

PROMPT = "The river runs through the valley and"


async def _zmq_ttft(c: AsyncClient, max_tokens: int) -> float:
    t0 = time.perf_counter()
    ttft = None
    async for ev in c.stream(PROMPT, max_tokens=max_tokens):  # read to the end, as HTTP
        if ttft is None and isinstance(ev, P.Chunk) and ev.text:
            ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0


async def _http_ttft(s: aiohttp.ClientSession, url: str, model: str, max_tokens: int) -> float:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    ttft = None
    async with s.post(f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.content:
            if ttft is None and line.startswith(b"data: {") and b'"text":""' not in line:
                ttft = time.perf_counter() - t0
    return ttft if ttft is not None else time.perf_counter() - t0


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(1e3 * statistics.median(xs), 3),
        "mean_ms": round(1e3 * statistics.fmean(xs), 3),
        "p99_ms": round(1e3 * percentile(xs, 0.99), 3),
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    lab = Lab(n_nodes=1, engine={"n_slots": 2, "slot_ctx": 256, "n_threads": args.threads})
    lab.start()
    try:
        await lab.wait_converged(timeout=120)
        url = lab.http_urls[0]
        zmq_t: list[float] = []
        http_t: list[float] = []
        async with AsyncClient(lab.endpoints) as c, aiohttp.ClientSession() as s:
            async with s.get(f"{url}/v1/models") as r:
                model = (await r.json())["data"][0]["id"]
            for _ in range(5):  # warm both paths and the cache
                await _zmq_ttft(c, args.max_tokens)
                await _http_ttft(s, url, model, args.max_tokens)
            for i in range(args.requests):
                # Alternate which goes first, so drift in machine load hits both alike.
                if i % 2:
                    zmq_t.append(await _zmq_ttft(c, args.max_tokens))
                    http_t.append(await _http_ttft(s, url, model, args.max_tokens))
                else:
                    http_t.append(await _http_ttft(s, url, model, args.max_tokens))
                    zmq_t.append(await _zmq_ttft(c, args.max_tokens))
    finally:
        lab.stop()
    z, h = _stats(zmq_t), _stats(http_t)
    return {
        "command": "bench http",
        "requests": args.requests,
        "zeromq": z,
        "http": h,
        "http_minus_zeromq_p50_ms": round(h["p50_ms"] - z["p50_ms"], 3),
        "load_average": loadavg(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="zmesh bench http", description=__doc__)
    ap.add_argument("--requests", type=int, default=200, help="per path")
    ap.add_argument("--max-tokens", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="llama.cpp threads")
    args = ap.parse_args(argv)
    out = asyncio.run(bench(args))
    z, h = out["zeromq"], out["http"]
    say(
        f"zmesh bench http: TTFT p50 ZeroMQ {z['p50_ms']} ms, HTTP {h['p50_ms']} ms: "
        f"HTTP adds {out['http_minus_zeromq_p50_ms']} ms"
    )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
