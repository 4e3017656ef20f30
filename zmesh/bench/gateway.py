"""zmesh's own routing against the SGLang model gateway (`smg`) on the same lab nodes.

Systems, each on a fresh lab (empty caches), the same requests in the same order,
every request over the nodes' OpenAI-compatible HTTP API and streamed:

- `zmesh`: each request goes to its entry node (the same random entry per request as
  `zmesh bench cluster`); the mesh routes it (prefix-aware, at most one forward);
- `gateway-cache_aware`: the nodes run local-only (`routing.max_hops = 0`, so a node
  serves whatever reaches it) behind `python -m smg launch --policy cache_aware`,
  whose approximate radix tree of what it sent where picks the node;
- `gateway-random`: the same with `--policy random`, the floor.

The gateway fronts the nodes as plain OpenAI-compatible workers: it registers each
from `GET /v1/models` (its `/server_info` and `/model_info` probes get 404 and are
tolerated), health-checks `GET /health`, and passes the SSE stream through, so the
last chunk's `zmesh` field still says which node served it and what it reused.

    zmesh bench gateway --requests 60 --workloads mmlu,shared

Writes ``<out>/gateway-<stamp>.json`` and one PNG of bars per workload (the workload
machinery and figures are `zmesh bench cluster`'s); ``--json`` prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from zmesh.bench.cluster import Plan, build_parser, build_plan, drive
from zmesh.bench.figures import figures, loadavg, machine, say, steady
from zmesh.bench.sender import Record
from zmesh.bench.vocab import Tokenizer
from zmesh.lab import Lab, free_ports
from zmesh.workload.report import plot_policy_bars, ratio

SYSTEMS = ("zmesh", "gateway-cache_aware", "gateway-random")


def gateway_command(port: int, workers: Sequence[str], policy: str) -> list[str]:
    """The SGLang model gateway in front of ``workers`` (base URLs)."""
    exe = shutil.which("smg") or ""
    head = [exe] if exe else [sys.executable, "-m", "smg"]
    return [
        *head,
        "launch",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *workers,
        "--policy",
        policy,
        "--log-level",
        "warn",
        "--disable-retries",  # a failure is the node's answer, as for zmesh's own path
    ]


@contextlib.contextmanager
def gateway(workers: Sequence[str], policy: str, log: Path) -> Iterator[str]:
    """Run the gateway until the block ends; yields its base URL."""
    port = free_ports(1)[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            gateway_command(port, workers, policy),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def wait_gateway(url: str, workers: Sequence[str], timeout: float = 60.0) -> float:
    """Seconds until the gateway lists every worker as registered."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with s.get(f"{url}/workers") as r:
                    text = await r.text()
                if r.status == 200 and all(w in text for w in workers):
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the gateway at {url} did not register {list(workers)}")
            await asyncio.sleep(0.2)


async def send(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int, rec: Record
) -> None:
    """One streamed completion; fills ``rec`` from the chunks (TTFT: the first chunk
    with text) and from the last one's usage and `zmesh` facts."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                return
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    rec.error = str(ev["error"].get("message"))
                    return
                if any(c.get("text") for c in ev.get("choices", [])) and math.isnan(rec.ttft_s):
                    rec.ttft_s = time.perf_counter() - sent
                if (z := ev.get("zmesh")) is not None:
                    rec.served_by, rec.route_reason = z["served_by"], z["route_reason"]
                    rec.hops = z["hops"]
                if (u := ev.get("usage")) is not None:
                    rec.prompt_tokens = u["prompt_tokens"]
                    rec.completion_tokens = u["completion_tokens"]
                    rec.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
        return
    rec.e2e_s = time.perf_counter() - sent
    if math.isnan(rec.ttft_s):
        rec.ttft_s = rec.e2e_s


async def run_system(
    system: str, plan: Plan, lab: Lab, url: str | None, model: str
) -> tuple[list[Record], float]:
    """The plan against one started lab: to ``url`` (a gateway), else each entry node."""
    wl = plan.workload
    names = [n.name for n in lab.nodes]
    records = [Record(r.index, system, names[plan.entries[r.index]]) for r in wl.requests]
    timeout = aiohttp.ClientTimeout(total=600)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        t0 = time.perf_counter()

        async def one(i: int) -> None:
            rec = records[i]
            rec.sent_at = time.perf_counter() - t0
            target = url or lab.http_urls[plan.entries[i]]
            await send(session, target, model, wl.prompt(i), wl.requests[i].max_tokens, rec)

        await drive(plan, one, t0)
        wall = time.perf_counter() - t0
    return records, wall


async def bench_workload(args: argparse.Namespace, workload: str) -> dict[str, Any]:
    args.workload = workload
    with Tokenizer() as tok:
        plan = build_plan(args, tok)
    wl = plan.workload
    say(
        f"zmesh bench gateway: {wl.name}, {len(wl)} requests on {args.nodes} nodes x "
        f"{args.slots} slots, {plan.arrivals.describe()}, systems {','.join(args.systems)}"
    )
    out: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for system in args.systems:
        behind = system.startswith("gateway-")
        workdir = args.out / "labs" / f"gateway-{wl.name}-{system}"
        lab = Lab(
            n_nodes=args.nodes,
            engine={"n_slots": args.slots, "slot_ctx": args.slot_ctx, "n_threads": args.threads},
            routing={"max_hops": 0} if behind else dict(args.zmesh_routing),
            workdir=workdir,
        )
        lab.start()
        try:
            await lab.wait_converged(timeout=180)
            model = await _model(lab)
            if behind:
                policy = system.removeprefix("gateway-")
                with gateway(lab.http_urls, policy, workdir / "gateway.log") as url:
                    await wait_gateway(url, lab.http_urls)
                    recs, wall = await run_system(system, plan, lab, url, model)
            else:
                recs, wall = await run_system(system, plan, lab, None, model)
            statuses = await lab.statuses(timeout=5.0)
        finally:
            lab.stop()
        f = figures(recs, wall, [n.name for n in lab.nodes], statuses)
        f["steady"] = steady(recs, args.warmup)
        f["load_average"] = round(loadavg(), 2)
        out[system] = f
        records[system] = [asdict(r) for r in recs]
        say(
            f"  [{system}] ttft mean {f['ttft_mean_s']:.3f}s p99 {f['ttft_p99_s']:.3f}s, "
            f"hit {f['hit_rate']:.3f}, spread {f['load_spread']:.2f}, errors {f['errors']}, "
            f"{wall:.1f}s, load average {f['load_average']}"
        )
    ratios = {
        f"zmesh_over_{s}": round(ratio(out["zmesh"]["ttft_mean_s"], out[s]["ttft_mean_s"]), 3)
        for s in out
        if s != "zmesh" and "zmesh" in out
    }
    return {
        "workload": wl.params | {"name": wl.name},
        "systems": out,
        "ratios": ratios,
        "records": records,
    }


async def _model(lab: Lab) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{lab.http_urls[0]}/v1/models") as r:
        return str((await r.json())["data"][0]["id"])


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    ap.prog = "zmesh bench gateway"
    ap.description = __doc__
    ap.add_argument("--workloads", default="mmlu,shared", help="comma list (mmlu, shared, chat)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {SYSTEMS}")
    ap.add_argument(
        "--zmesh-routing",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a [routing] setting of the zmesh system's nodes (TOML value), e.g. "
        "forward_timeout_s=30 (repeatable)",
    )
    args = ap.parse_args(argv)
    try:
        args.zmesh_routing = [
            (k, tomllib.loads(f"v = {v}")["v"])
            for k, v in (kv.split("=", 1) for kv in args.zmesh_routing)
        ]
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        ap.error(f"--zmesh-routing takes KEY=VALUE (a TOML value): {exc}")
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := [s for s in args.systems if s not in SYSTEMS]:
        ap.error(f"unknown systems {bad}; known: {', '.join(SYSTEMS)}")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    t0 = time.monotonic()
    results = {w: asyncio.run(bench_workload(args, w)) for w in workloads}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gateway-" + time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"{stem}.json"
    summary = {
        "command": "bench gateway",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": machine(),
        "workloads": {
            w: {k: v for k, v in r.items() if k != "records"} for w, r in results.items()
        },
    }
    path.write_text(
        json.dumps({**summary, "records": {w: r["records"] for w, r in results.items()}})
    )
    for w, r in results.items():
        title = f"{args.nodes} nodes x {args.slots} slots, {w}, {args.requests} requests over HTTP"
        plot_policy_bars(r["systems"], args.out / f"{stem}-{w}.png", title, say)
        line = {
            s: (f["ttft_mean_s"], f["ttft_p99_s"], f["hit_rate"]) for s, f in r["systems"].items()
        }
        say(f"  {w}: (mean TTFT, p99 TTFT, hit rate) {line}; ratios {r['ratios']}")
    say(f"zmesh bench gateway: done in {time.monotonic() - t0:.0f}s; wrote {path} (+ PNG plots)")
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
