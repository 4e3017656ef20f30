"""Engine benchmark: cold vs warm time to first token for a shared ~600-token prefix.

Cold and warm requests are interleaved in one run on one engine: each cold request
uses a namespace of its own (namespaces never share cache, so it prefills everything);
warm requests share one namespace whose prefix was cached by a priming request.
Then KV shipping on one machine: the warm prefix is exported, packed and unpacked as
the wire carries it, imported into a second engine, and the request served there
(export, import and the TTFT after the import; the wire itself is `bench cluster`'s).

    python -m zmesh.bench.engine [--suffixes 20] [--prefix-tokens 600] [--json]

With ``--concurrency 1,3,6`` it measures continuous batching instead
(zmesh/bench/batching.py): closed-loop clients, and with ``--sequential`` the
one-at-a-time engine in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from zmesh.bench.output import print_result
from zmesh.config import EngineConfig
from zmesh.engine import Engine, GenerationResult
from zmesh.kvstate import pack, unpack
from zmesh.protocol import SamplingParams

TOPICS = [
    "astronomy",
    "anatomy",
    "chemistry",
    "geography",
    "economics",
    "logic",
    "physics",
    "history",
    "statistics",
    "biology",
    "law",
    "philosophy",
]


def shared_prefix(engine: Engine, target_tokens: int) -> str:
    """A deterministic few-shot style prefix of about ``target_tokens`` tokens."""
    text = "The following are multiple choice questions (with answers) about science.\n\n"
    i = 0
    while len(engine.tokenize(text)) < target_tokens:
        topic = TOPICS[i % len(TOPICS)]
        text += (
            f"Question {i + 1}: In {topic}, which of these statements about item {i * 7 % 97} "
            f"is correct?\nA. It is larger than {i * 3}\nB. It equals {i * 5}\n"
            f"C. It is smaller than {i + 11}\nD. None of the above\nAnswer: {'ABCD'[i % 4]}\n\n"
        )
        i += 1
    return text


def suffix(i: int) -> str:
    return f"Question: What is the name of fact number {i} in {TOPICS[i % len(TOPICS)]}?\nAnswer:"


def run(n_suffixes: int, prefix_tokens: int, max_tokens: int, n_threads: int) -> dict[str, object]:
    cfg = EngineConfig(n_slots=8, slot_ctx=max(1024, prefix_tokens + 256), n_threads=n_threads)
    t = time.perf_counter()
    with Engine(cfg) as engine:
        load_s = time.perf_counter() - t
        prefix = shared_prefix(engine, prefix_tokens)
        params = SamplingParams(max_tokens=max_tokens)
        engine.generate(prefix + suffix(-1), params=params, namespace="warm")  # prime
        cold: list[GenerationResult] = []
        warm: list[GenerationResult] = []
        for i in range(n_suffixes):
            cold.append(engine.generate(prefix + suffix(i), params=params, namespace=f"cold-{i}"))
            warm.append(engine.generate(prefix + suffix(i), params=params, namespace="warm"))
            print(
                f"  [{i + 1}/{n_suffixes}] cold ttft {cold[-1].ttft_s * 1000:7.1f} ms"
                f"   warm ttft {warm[-1].ttft_s * 1000:6.1f} ms"
                f" (cached {warm[-1].cached_tokens}/{warm[-1].prompt_tokens})",
                file=sys.stderr,
            )
        slot_bytes = engine.slot_state_bytes(warm[-1].slot)
        slot_tokens = len(engine.slot_tokens()[warm[-1].slot][1])
        assert all(c.cached_tokens == 0 for c in cold), "a cold request reused cache"
        shipped = ship(engine, cfg, prefix, params, min(n_suffixes, 5))

    def mean(xs: list[float]) -> float:
        return statistics.fmean(xs)

    cold_ttft = mean([r.ttft_s for r in cold])
    warm_ttft = mean([r.ttft_s for r in warm])
    decode = [r.decode_tps for r in cold + warm if r.completion_tokens > 1]
    return {
        "model_load_s": round(load_s, 3),
        "prompt_tokens": cold[0].prompt_tokens,
        "requests": 2 * n_suffixes,
        "cold_ttft_mean_s": round(cold_ttft, 4),
        "cold_ttft_p50_s": round(statistics.median([r.ttft_s for r in cold]), 4),
        "warm_ttft_mean_s": round(warm_ttft, 4),
        "warm_ttft_p50_s": round(statistics.median([r.ttft_s for r in warm]), 4),
        "ttft_ratio_cold_over_warm": round(cold_ttft / warm_ttft, 1),
        "prefill_tokens_per_s": round(mean([r.prompt_tokens / r.prefill_s for r in cold]), 1),
        "decode_tokens_per_s": round(mean(decode), 1) if decode else 0.0,
        "warm_mean_cached_tokens": round(mean([r.cached_tokens for r in warm]), 1),
        "slot_reuse_rate": round(sum(r.cached_tokens > 0 for r in warm) / len(warm), 3),
        "slot_state_bytes": slot_bytes,
        "slot_state_tokens": slot_tokens,
        "kv_bytes_per_token": round(slot_bytes / max(slot_tokens, 1)),
        **shipped,
        "ttft_ratio_cold_over_shipped": round(
            cold_ttft / float(shipped["shipped_total_mean_s"]), 1
        ),
    }


def ship(
    holder: Engine, cfg: EngineConfig, prefix: str, params: SamplingParams, n: int
) -> dict[str, float]:
    """Export the warm prefix from ``holder``, import it into a fresh engine, serve."""
    export_s, import_s, ttft_s, nbytes, tokens = [], [], [], [], []
    with Engine(cfg) as receiver:
        for i in range(n):
            receiver.clear()
            prompt = prefix + suffix(100 + i)
            t = time.perf_counter()
            state = holder.export_prefix(holder.tokenize(prompt), "warm")
            assert state is not None, "the warm prefix is not cached"
            header, payload = pack(state)
            export_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            receiver.import_prefix(unpack(header, payload), "warm")
            import_s.append(time.perf_counter() - t)
            r = receiver.generate(prompt, params=params, namespace="warm")
            assert r.cached_tokens >= state.n_tokens - 1, "the import was not reused"
            ttft_s.append(r.ttft_s)
            nbytes.append(len(payload))
            tokens.append(state.n_tokens)
            print(
                f"  [ship {i + 1}/{n}] {state.n_tokens} tokens, {len(payload) / 1e6:.1f} MB:"
                f" export {export_s[-1] * 1000:.1f} ms, import {import_s[-1] * 1000:.1f} ms,"
                f" ttft after {r.ttft_s * 1000:.1f} ms",
                file=sys.stderr,
            )
    total = [e + m + t for e, m, t in zip(export_s, import_s, ttft_s, strict=True)]
    return {
        "shipped_tokens": round(statistics.fmean(tokens), 1),
        "shipped_state_bytes": round(statistics.fmean(nbytes)),
        "kv_export_ms_mean": round(statistics.fmean(export_s) * 1000, 2),
        "kv_import_ms_mean": round(statistics.fmean(import_s) * 1000, 2),
        "shipped_ttft_mean_s": round(statistics.fmean(ttft_s), 4),
        "shipped_total_mean_s": round(statistics.fmean(total), 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zmesh bench engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--suffixes", type=int, default=20, help="distinct suffixes (default 20)")
    ap.add_argument("--prefix-tokens", type=int, default=600, help="shared prefix size")
    ap.add_argument(
        "--max-tokens", type=int, help="tokens generated per request (16; batching: 64)"
    )
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = all cores)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--concurrency", help="batching: client levels, e.g. 1,3,6")
    ap.add_argument("--sequential", action="store_true", help="batching: also one at a time")
    ap.add_argument("--requests", type=int, default=24, help="batching: requests per run")
    ap.add_argument("--prompt-tokens", type=int, default=160, help="batching: prompt size")
    ap.add_argument("--slots", type=int, default=3, help="batching: KV slots")
    ap.add_argument("--prefill-chunk", type=int, default=128, help="batching: chunk size")
    ap.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded (-1: all)")
    ap.add_argument("--model", help="batching: a GGUF file (default: the packaged model)")
    args = ap.parse_args(argv)
    if args.concurrency:
        from zmesh.bench.batching import run as run_batching

        res = run_batching(
            [int(x) for x in args.concurrency.split(",")],
            args.sequential,
            n_requests=args.requests,
            prompt_tokens=args.prompt_tokens,
            max_tokens=args.max_tokens or 64,
            n_threads=args.threads,
            n_slots=args.slots,
            prefill_chunk=args.prefill_chunk,
            n_gpu_layers=args.gpu_layers,
            model_path=args.model,
        )
        print(json.dumps(res) if args.json else json.dumps(res, indent=1))
        return 0
    print(
        f"engine benchmark: {args.suffixes} suffixes on a ~{args.prefix_tokens}-token prefix",
        file=sys.stderr,
    )
    res = run(args.suffixes, args.prefix_tokens, args.max_tokens or 16, args.threads)
    print_result(res, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
