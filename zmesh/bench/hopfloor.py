"""The floor under `zmesh bench mesh`'s hop figures: one hop of bare pyzmq, no zmesh.

Three processes as in the mesh bench's forwarded case, with nothing of a node in them:
a *holder* (asyncio loop, ROUTER: answers each message at once), a *forwarder*
(asyncio loop, a ROUTER for the client and a DEALER to the holder: passes each
message on and each answer back) and this process as the client (asyncio DEALERs).
The same payload goes to the holder directly and through the forwarder, interleaved,
and the paired difference is what one hop of sockets, wake-ups and scheduling costs
on this machine at this load: no routing, logging, msgpack or engine. What a node's
hop costs above it is zmesh's.

With ``busy_ms`` the holder also runs a thread that executes pure Python for that long,
then sleeps as long, over and over (the engine thread's Python between two decodes,
at its worst); ``switch_ms`` sets the holder's GIL switch interval, to show what the
GIL costs a loop thread that shares it.

    python -m zmesh.bench.hopfloor [--pairs 200] [--busy-ms 2] [--switch-ms 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import zmq
import zmq.asyncio

PAYLOAD = os.urandom(2048)  # about a forward of 400 token ids


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))]


async def _holder(port: int, busy_ms: float) -> None:
    if busy_ms > 0:

        def spin() -> None:
            while True:
                end = time.perf_counter() + busy_ms / 1000
                n = 0
                while time.perf_counter() < end:
                    n += 1  # pure Python: holds the GIL but for forced switches
                time.sleep(busy_ms / 1000)

        threading.Thread(target=spin, daemon=True).start()
    ctx = zmq.asyncio.Context()
    s = ctx.socket(zmq.ROUTER)
    s.bind(f"tcp://127.0.0.1:{port}")
    while True:
        ident, payload = await s.recv_multipart()
        await s.send_multipart([ident, payload[:64]])


async def _forwarder(port: int, holder: int) -> None:
    ctx = zmq.asyncio.Context()
    front = ctx.socket(zmq.ROUTER)
    front.bind(f"tcp://127.0.0.1:{port}")
    back = ctx.socket(zmq.DEALER)
    back.connect(f"tcp://127.0.0.1:{holder}")
    waiting: dict[bytes, bytes] = {}  # message tag -> the client's identity

    async def replies() -> None:
        while True:
            (payload,) = await back.recv_multipart()
            ident = waiting.pop(payload[:8], None)
            if ident is not None:
                await front.send_multipart([ident, payload])

    task = asyncio.create_task(replies())
    try:
        while True:
            ident, payload = await front.recv_multipart()
            waiting[payload[:8]] = ident
            await back.send_multipart([payload])
    finally:
        task.cancel()


async def _client(holder: int, forwarder: int, pairs: int) -> dict[str, float]:
    ctx = zmq.asyncio.Context()
    direct = ctx.socket(zmq.DEALER)
    direct.connect(f"tcp://127.0.0.1:{holder}")
    via = ctx.socket(zmq.DEALER)
    via.connect(f"tcp://127.0.0.1:{forwarder}")

    async def ask(sock: zmq.asyncio.Socket, tag: int, timeout: float = 5.0) -> float:
        msg = tag.to_bytes(8, "little") + PAYLOAD
        t0 = time.perf_counter()
        await sock.send(msg)
        if not await sock.poll(int(timeout * 1000)):
            raise TimeoutError
        await sock.recv()
        return (time.perf_counter() - t0) * 1000

    # Both paths up (bounded): the processes bind while we connect.
    for sock in (direct, via):
        for attempt in range(100):
            try:
                await ask(sock, 10**9 + attempt, timeout=0.1)
                break
            except TimeoutError:
                continue
        else:
            raise RuntimeError("hop floor: a process never answered")
        while await sock.poll(50):  # drain late answers to the probes
            await sock.recv()
    d_ms: list[float] = []
    v_ms: list[float] = []
    diffs: list[float] = []
    for i in range(pairs):
        order = [(direct, d_ms), (via, v_ms)]
        for sock, out in order if i % 2 == 0 else order[::-1]:
            out.append(await ask(sock, i))
        diffs.append(v_ms[-1] - d_ms[-1])
    ctx.destroy(linger=0)
    return {
        "direct_ms_p50": round(statistics.median(d_ms), 3),
        "direct_ms_p99": round(_pct(d_ms, 0.99), 3),
        "hop_ms_p50": round(statistics.median(diffs), 3),
        "hop_ms_p99": round(_pct(diffs, 0.99), 3),
    }


def measure(pairs: int = 200, busy_ms: float = 0.0, switch_ms: float = 0.0) -> dict[str, float]:
    """Start the holder and forwarder processes, measure, stop them."""
    from zmesh.lab import free_ports

    holder, forwarder = free_ports(2, "127.0.0.1")
    cmd = [sys.executable, "-m", "zmesh.bench.hopfloor"]
    procs = [
        subprocess.Popen(
            [
                *cmd,
                "--role",
                "holder",
                "--port",
                str(holder),
                "--busy-ms",
                str(busy_ms),
                "--switch-ms",
                str(switch_ms),
            ]
        ),
        subprocess.Popen(
            [*cmd, "--role", "forwarder", "--port", str(forwarder), "--holder", str(holder)]
        ),
    ]
    try:
        res = asyncio.run(_client(holder, forwarder, pairs))
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return {"busy_ms": busy_ms, "switch_ms": switch_ms, **res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="zmesh bench hopfloor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--busy-ms", type=float, default=0.0, help="holder's busy Python thread")
    ap.add_argument("--switch-ms", type=float, default=0.0, help="holder's GIL switch interval")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--role", choices=["client", "holder", "forwarder"], default="client")
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--holder", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "holder":
        if args.switch_ms > 0:
            sys.setswitchinterval(args.switch_ms / 1000)
        asyncio.run(_holder(args.port, args.busy_ms))
        return 0
    if args.role == "forwarder":
        asyncio.run(_forwarder(args.port, args.holder))
        return 0
    res = {**measure(args.pairs, args.busy_ms, args.switch_ms), "load_avg_1m": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            print(f"{k:<16} {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
