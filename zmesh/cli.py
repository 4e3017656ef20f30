"""The `zmesh` command: node, lab, ask, status, bench, sim."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence

import msgspec

DEFAULT_ENDPOINTS = ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:5565", "tcp://127.0.0.1:5575"]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cmd_node(args: argparse.Namespace) -> int:
    from zmesh.config import ConfigError, load_config
    from zmesh.log import configure_logging
    from zmesh.node import run_node

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        _say(f"zmesh node: {exc}")
        return 2
    json_logs = {"json": True, "console": False, "auto": None}[args.log_format]
    configure_logging(cfg.log_level, json=json_logs, node_id=cfg.node_id)
    _say(f"zmesh node {cfg.node_id}: loading model...")
    run_node(cfg, on_ready=lambda n: _say(f"zmesh node {cfg.node_id}: serving on {n.serve_addr}"))
    return 0


def _print_done(done: object, as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode(done).decode())
        return
    d = done
    print(d.text)  # type: ignore[attr-defined]
    _say(
        f"-- served by {d.served_by} (path {' -> '.join(d.route_path)}, hops {d.hops}, "  # type: ignore[attr-defined]
        f"route {d.route_reason}); prompt {d.prompt_tokens} tokens, cached {d.cached_tokens}; "  # type: ignore[attr-defined]
        f"ttft {d.ttft_s * 1000:.1f} ms, {d.completion_tokens} tokens at {d.decode_tps:.1f} tok/s"  # type: ignore[attr-defined]
    )


def _key_kwargs(args: argparse.Namespace, endpoints: list[str]) -> dict[str, object]:
    """Client options for --client-key / --server-key (one key for all, or one each)."""
    keys = args.server_key or []
    if not args.client_key and not keys:
        return {}
    if not args.client_key or not keys:
        raise ValueError("CURVE needs both --client-key and --server-key")
    if len(keys) == 1:
        return {"client_key": args.client_key, "server_key": keys[0]}
    if len(keys) != len(endpoints):
        raise ValueError(
            f"give one --server-key for all endpoints or one per --endpoint "
            f"({len(endpoints)}), got {len(keys)}"
        )
    return {"client_key": args.client_key, "server_key": dict(zip(endpoints, keys, strict=True))}


def _client_options(
    args: argparse.Namespace, command: str
) -> tuple[list[str], dict[str, object]] | None:
    """The endpoints and key options of a client command (`ask`, `status`); None once
    it said what is wrong with them."""
    endpoints = args.endpoint or DEFAULT_ENDPOINTS
    try:
        return endpoints, _key_kwargs(args, endpoints)
    except ValueError as exc:
        _say(f"zmesh {command}: {exc}")
        return None


def cmd_ask(args: argparse.Namespace) -> int:
    from zmesh.client import Client, ZmeshError
    from zmesh.protocol import Chunk, Done

    options = _client_options(args, "ask")
    if options is None:
        return 2
    endpoints, keys = options
    try:
        with Client(endpoints, timeout=args.timeout, **keys) as c:
            kw = dict(
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                tenant=args.tenant,
                stop=args.stop or (),
            )
            if args.stream and not args.json:
                attempt = 0
                for ev in c.stream(args.prompt, **kw):
                    if isinstance(ev, Chunk):
                        if ev.attempt != attempt:
                            attempt = ev.attempt
                            print("\n[restarted on another node]", file=sys.stderr)
                        print(ev.text, end="", flush=True)
                    elif isinstance(ev, Done):
                        print()
                        _print_done(Done(**{**msgspec.structs.asdict(ev), "text": ""}), False)
                return 0
            _print_done(c.generate(args.prompt, **kw), args.json)
    except ZmeshError as exc:
        _say(f"zmesh ask: {exc}")
        return 1
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from zmesh.client import Client, ZmeshError

    options = _client_options(args, "status")
    if options is None:
        return 2
    endpoints, keys = options
    rc = 0
    with Client(endpoints, **keys) as c:
        for ep in endpoints:
            try:
                st = c.status(ep, timeout=args.timeout)
            except ZmeshError as exc:
                _say(f"{ep}: {exc}")
                rc = 1
                continue
            if args.json:
                print(msgspec.json.encode(st).decode())
                continue
            print(
                f"{st.node_id} @ {ep}: epoch {st.epoch} seq {st.seq} blocks {st.n_blocks} "
                f"queue {st.queue_depth} slots {st.busy_slots}/{st.n_slots}"
            )
            for p in st.peers:
                print(
                    f"  peer {p.node_id:<10} {p.state:<8} seq {p.seq:<6} blocks {p.n_blocks:<7} "
                    f"age {p.estimate_age_s:6.2f}s queue {p.queue_depth:<3} "
                    f"link {p.link_delay_s * 1000:.2f} ms"
                )
            if st.counters:
                print(
                    "  counters: " + ", ".join(f"{k}={v}" for k, v in sorted(st.counters.items()))
                )
    return rc


def cmd_lab(args: argparse.Namespace) -> int:
    import secrets
    import signal

    from zmesh.client import Client, ZmeshError
    from zmesh.lab import KEYLESS_NOTE, Lab

    engine = {"n_slots": args.slots}
    lab = Lab(
        n_nodes=args.nodes,
        base_port=args.base_port,
        policy=args.policy,
        engine=engine,
        keys=args.keys is not None,
        keys_dir=args.keys or None,
        # With CURVE, HTTP callers need an API key too: one for this lab's run.
        http_keys=[{"key": f"sk-lab-{secrets.token_hex(16)}", "name": "lab"}]
        if args.keys is not None
        else [],
    )
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    _say(f"zmesh lab: starting {args.nodes} nodes (configs and JSON logs in {lab.workdir})")
    lab.start()
    rc = 0
    try:
        t0 = time.monotonic()
        secs = asyncio.run(
            lab.wait_converged(
                timeout=args.timeout,
                progress=lambda m: _say(f"  [{time.monotonic() - t0:5.1f}s] {m}"),
            )
        )
        _say(f"zmesh lab: {args.nodes} nodes converged in {secs:.1f}s")
        for node in lab.nodes:
            http = f"  http {node.http}" if node.http else ""
            print(
                f"{node.name}  serve {node.serve}  gossip {node.gossip}{http}  log {node.log_path}"
            )
        if lab.http_urls:
            key = lab.http_keys[0]["key"] if lab.http_keys else "none"
            print(f"OpenAI API: base_url {lab.http_urls[0]}/v1, api_key {key}")
        if lab.keys:
            kw = lab.client_kwargs()
            flags = " ".join(
                f"--endpoint {ep} --server-key {key}" for ep, key in kw["server_key"].items()
            )
            print(f"keys in {lab.keys_dir}; ask with:")
            print(f'  zmesh ask --client-key {kw["client_key"]} {flags} "PROMPT"')
        else:
            _say(f"zmesh lab: {KEYLESS_NOTE}")
        if args.ask:
            with Client(lab.endpoints, **lab.client_kwargs()) as c:
                _print_done(c.generate(args.ask, max_tokens=args.max_tokens), False)
        if args.once:
            return 0
        _say('zmesh lab: running; try `zmesh ask "..."` or `zmesh status`; Ctrl-C stops it')
        while not stop:
            if any(not n.alive for n in lab.nodes):
                dead = [n.name for n in lab.nodes if not n.alive]
                _say(f"zmesh lab: node(s) exited: {dead}; see their logs")
                rc = 1
                break
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    except (TimeoutError, RuntimeError, ZmeshError) as exc:
        _say(f"zmesh lab: {exc}")
        rc = 1
    finally:
        _say("zmesh lab: stopping nodes")
        lab.stop()
    return rc


BENCHMARKS = {
    "engine": "zmesh.bench.engine",  # cold vs warm TTFT on one engine
    "mesh": "zmesh.bench.mesh",  # convergence time and forwarding overhead per hop
    "hopfloor": "zmesh.bench.hopfloor",  # one hop of bare pyzmq: the floor under mesh's
    "routing": "zmesh.bench.routing",  # routing decision time, 8 peers x 100k blocks
    "cluster": "zmesh.bench.cluster",  # every policy on a real lab, same requests
    "gateway": "zmesh.bench.gateway",  # zmesh routing vs the SGLang gateway, over HTTP
    "http": "zmesh.bench.http",  # TTFT over HTTP vs the ZeroMQ client, one node
}


def cmd_keys(args: argparse.Namespace) -> int:
    from zmesh.security import SecurityError, generate

    rc = 0
    for name in args.names:
        try:
            role = args.role or ("client" if args.tenant else "node")
            pub, sec = generate(
                args.dir, name, role=role, tenants=args.tenant or (), overwrite=args.force
            )
        except SecurityError as exc:
            _say(f"zmesh keys gen: {exc}")
            rc = 1
            continue
        key = next(
            line.split("=", 1)[1].strip().strip('"')
            for line in pub.read_text().splitlines()
            if "public-key" in line
        )
        print(f"{name}: public {pub}  secret {sec}  key {key}")
    return rc


def cmd_bench(args: argparse.Namespace, rest: Sequence[str]) -> int:
    import importlib

    module = importlib.import_module(BENCHMARKS[args.what])
    return int(module.main(list(rest)))


def _add_key_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--client-key", metavar="FILE", help="CurveZMQ: this client's NAME.key_secret")
    p.add_argument(
        "--server-key",
        action="append",
        metavar="KEY",
        help="CurveZMQ: the node's public key (Z85 or its NAME.key file); one for all "
        "endpoints, or one per --endpoint in the same order",
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="zmesh", description="Decentralized, prefix-cache-aware LLM serving mesh."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("node", help="run one node from a TOML config")
    p.add_argument("--config", required=True, help="path to the node's TOML config")
    p.add_argument(
        "--log-format",
        choices=["auto", "json", "console"],
        default="auto",
        help="JSON lines, or a readable console format (auto: console on a TTY)",
    )

    p = sub.add_parser("lab", help="run N local nodes on loopback")
    p.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    p.add_argument(
        "--base-port",
        type=int,
        default=5555,
        help="node i serves on base+10*i, gossips on base+10*i+1, HTTP on base+10*i+8 "
        "(default 5555)",
    )
    p.add_argument(
        "--policy",
        default="zmesh",
        help="routing policy: zmesh, random, round_robin, consistent_hash, least_loaded",
    )
    p.add_argument("--slots", type=int, default=8, help="KV slots per node (default 8)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for convergence")
    p.add_argument("--ask", help="send this prompt once the lab is up and print the answer")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--once", action="store_true", help="stop the lab after --ask")
    p.add_argument(
        "--keys",
        nargs="?",
        const="",
        metavar="DIR",
        help="run with CurveZMQ: a key pair per node and one for the client, written to "
        "DIR (default: the lab's work dir) or reused from it",
    )

    p = sub.add_parser("ask", help="send one prompt and print the answer with its provenance")
    p.add_argument("prompt")
    p.add_argument(
        "--endpoint",
        action="append",
        help="node serve address (repeatable; default: the local lab's three)",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--tenant", default="default")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    _add_key_args(p)

    p = sub.add_parser("status", help="peer table, cache size and counters of each node")
    p.add_argument("--endpoint", action="append", help="node serve address (repeatable)")
    p.add_argument("--timeout", type=float, default=3.0)
    p.add_argument("--json", action="store_true")
    _add_key_args(p)

    p = sub.add_parser("keys", help="CurveZMQ keys: `zmesh keys gen NAME...`")
    keys_sub = p.add_subparsers(dest="keys_cmd", required=True)
    g = keys_sub.add_parser(
        "gen", help="write NAME.key (public) and NAME.key_secret (secret) certificates"
    )
    g.add_argument("names", nargs="+", metavar="NAME", help="key name(s): node ids, app names")
    g.add_argument("--dir", default="keys", help="directory to write to (default ./keys)")
    g.add_argument(
        "--role",
        choices=["node", "client"],
        help="node (default; client with --tenant): a mesh member; "
        "client: requests and status only, no gossip or snapshots",
    )
    g.add_argument(
        "--tenant",
        action="append",
        help="(client keys) a tenant this key may use; repeatable; default any",
    )
    g.add_argument("--force", action="store_true", help="overwrite existing key files")

    p = sub.add_parser("bench", help="benchmarks: engine, mesh, routing (`zmesh bench X --help`)")
    p.add_argument("what", choices=sorted(BENCHMARKS), help="which benchmark (each has --help)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options")

    p = sub.add_parser("sim", help="simulator: run, sweep, scale (`zmesh sim X --help`)")
    p.add_argument(
        "args", nargs=argparse.REMAINDER, help="run | sweep | ship | scale | plot, and options"
    )
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.cmd == "bench":
        return cmd_bench(args, args.args)
    if args.cmd == "sim":
        from zmesh.sim.cli import main as sim_main

        return sim_main(args.args)
    handlers = {
        "node": cmd_node,
        "lab": cmd_lab,
        "ask": cmd_ask,
        "status": cmd_status,
        "keys": cmd_keys,
    }
    return handlers[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
