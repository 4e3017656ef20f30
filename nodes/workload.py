#!/opt/zmesh/venv/bin/python
"""A small shared-prefix workload through the client library (compose's `bench` service).

A few long "documents", several questions about each, sent round-robin to the
entry points: the first question about a document is a cold prefill somewhere;
later ones should be routed to the node that holds that document (route `prefix`)
and find most of their prompt cached. Prints one line per request and a summary;
exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time

from zmesh import Client, ZmeshError

TOPICS = ["volcanoes", "tides", "glaciers", "deserts", "rainforests", "coral reefs"]
QUESTIONS = ["What is the main idea?", "Name one cause.", "Name one effect.", "Summarise it."]


def document(topic: str) -> str:
    lines = [f"Reference notes about {topic}, for a quiz.\n"]
    lines += [
        f"Note {i}: {topic.capitalize()} change over long periods; observation {i} "
        f"records how {topic} respond to temperature, water and time.\n"
        for i in range(10)
    ]
    return "".join(lines) + "\nQuestion: "


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--endpoint",
        action="append",
        help="node serve address (repeatable; default: the compose lab's three nodes)",
    )
    ap.add_argument("--docs", type=int, default=3, help="documents (shared prefixes)")
    ap.add_argument("--questions", type=int, default=3, help="questions per document")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=180.0)
    args = ap.parse_args(argv)
    endpoints = args.endpoint or [f"tcp://node-{n}:5555" for n in "abc"]

    served: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    ttfts: list[float] = []
    prompt_total = cached_total = failures = 0
    t0 = time.monotonic()
    with Client(endpoints, timeout=args.timeout) as client:
        for q in range(args.questions):
            for d in range(args.docs):
                prompt = document(TOPICS[d % len(TOPICS)]) + QUESTIONS[q % len(QUESTIONS)]
                # Each round a document enters at another node: routing must find it.
                entry = endpoints[(d + q) % len(endpoints)]
                try:
                    done = client.generate(prompt, max_tokens=args.max_tokens, endpoint=entry)
                except ZmeshError as exc:
                    failures += 1
                    print(f"{entry:<22} FAILED {exc}", flush=True)
                    continue
                served[done.served_by] += 1
                reasons[done.route_reason] += 1
                ttfts.append(done.ttft_s)
                prompt_total += done.prompt_tokens
                cached_total += done.cached_tokens
                print(
                    f"{entry:<22} -> {done.served_by:<8} {' -> '.join(done.route_path):<18} "
                    f"{done.route_reason:<10} "
                    f"cached {done.cached_tokens:>4}/{done.prompt_tokens:<4} "
                    f"ttft {done.ttft_s * 1000:7.1f} ms",
                    flush=True,
                )
    ok = len(ttfts)
    print(f"\n{ok} answered, {failures} failed in {time.monotonic() - t0:.1f}s")
    if ok:
        print(f"served by: {dict(sorted(served.items()))}")
        print(f"route reasons: {dict(sorted(reasons.items()))}")
        share = cached_total / prompt_total
        print(f"cached prompt tokens: {cached_total}/{prompt_total} ({share:.0%})")
        print(
            f"ttft: median {statistics.median(ttfts) * 1000:.1f} ms, max {max(ttfts) * 1000:.1f} ms"
        )
    return 1 if failures or not ok else 0


if __name__ == "__main__":
    sys.exit(main())
