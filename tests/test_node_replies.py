"""What a node has done by the time its reply leaves: a caller holding the `Done` can
read the node's `request.completed` log line and its counters (tests that read a lab's
logs right after the reply, and operators correlating them, depend on it).

Real model, real sockets, a node in this process; the order is checked where the Done
is sent (the node's Transport.reply), so it is a fact, not a race to win.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from meshkit import RawClient, RunningNode, node_config

from zmesh import protocol as P
from zmesh.config import EngineConfig
from zmesh.engine import Engine
from zmesh.lab import free_ports

WAIT_S = 120.0


class LogSpy:
    """Stands in for the node's logger: records each event and request id, then logs."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self.events: list[tuple[str, object]] = []

    def __getattr__(self, level: str) -> Any:
        real = getattr(self._log, level)

        def emit(event: str, **kw: Any) -> Any:
            self.events.append((event, kw.get("request_id")))
            return real(event, **kw)

        return emit


def test_the_completed_line_and_counters_precede_the_done() -> None:
    cfg = node_config("order", free_ports(2))
    with (
        Engine(EngineConfig(n_slots=1, slot_ctx=256, n_threads=1)) as engine,
        RunningNode(cfg, engine) as running,
    ):
        node = running.node
        spy = LogSpy(node.context.log)
        node.context.log = spy
        at_done: list[tuple[bool, int]] = []
        real_reply = node.transport.reply

        def reply(envelope: list[bytes], msg: P.Message) -> bool:
            if isinstance(msg, P.Done):
                logged = ("request.completed", msg.request_id) in spy.events
                at_done.append((logged, node.counters.get("requests_served", 0)))
            return real_reply(envelope, msg)

        node.transport.reply = reply  # type: ignore[method-assign]

        async def main() -> None:
            async with RawClient([cfg.serve_addr]) as rc:
                for i in range(2):
                    msg = P.Generate(
                        request_id=f"o{i}",
                        prompt="Count: 1, 2, 3,",
                        params=P.SamplingParams(max_tokens=4, temperature=0.0),
                        deadline=time.time() + 600,
                    )
                    done = await rc.ask(cfg.serve_addr, msg, WAIT_S)
                    assert isinstance(done, P.Done), done

        asyncio.run(main())
    assert at_done == [(True, 1), (True, 2)]
