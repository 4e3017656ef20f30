"""A minimal async client for the benchmarks: one DEALER per node, replies matched by id.

It sets ``hops`` itself (the oracle sends each request straight to its choice with
``hops`` at the limit) and records client-side TTFT and end-to-end time per request
(`Record`).
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import zmq
import zmq.asyncio

from zmesh import protocol as P


@dataclass
class Record:
    index: int
    policy: str
    entry: str
    sent_at: float = 0.0  # seconds since the run started
    ttft_s: float = math.nan  # client-side: first streamed chunk (or the answer)
    e2e_s: float = math.nan
    served_by: str = ""
    route_reason: str = ""
    hops: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    server_ttft_s: float = math.nan
    queue_s: float = math.nan
    error: str = ""
    predicted_cached: int = -1  # oracle: what its mirror of the slots said would be reused
    shipped_tokens: int = 0  # of cached_tokens, pulled from a peer (zmesh_ship)


class Sender:
    """One DEALER per node; replies are matched to requests by id."""

    def __init__(self, endpoints: Sequence[str]) -> None:
        self.ctx = zmq.asyncio.Context()
        self.socks: dict[str, zmq.asyncio.Socket] = {}
        self.waiters: dict[str, asyncio.Queue[P.Message]] = {}
        self.readers: list[asyncio.Task[None]] = []
        for ep in endpoints:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(ep)
            self.socks[ep] = s
            self.readers.append(asyncio.create_task(self._read(s)))

    async def _read(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            frame = await sock.recv()
            try:
                msg = P.decode(frame)
            except P.ProtocolError:
                continue
            q = self.waiters.get(getattr(msg, "request_id", None) or "")
            if q is not None:
                q.put_nowait(msg)

    async def generate(
        self, endpoint: str, tokens: list[int], max_tokens: int, hops: int, rec: Record, t0: float
    ) -> P.Done | None:
        rid = uuid.uuid4().hex
        q: asyncio.Queue[P.Message] = asyncio.Queue()
        self.waiters[rid] = q
        msg = P.Generate(
            request_id=rid,
            tokens=tokens,
            params=P.SamplingParams(max_tokens=max_tokens),
            hops=hops,
            deadline=time.time() + 600,
            stream=True,
        )
        sent = time.perf_counter()
        rec.sent_at = sent - t0
        try:
            await self.socks[endpoint].send(P.encode(msg))
            while True:
                reply = await asyncio.wait_for(q.get(), 600)
                now = time.perf_counter()
                if isinstance(reply, P.Chunk):
                    if math.isnan(rec.ttft_s):
                        rec.ttft_s = now - sent
                elif isinstance(reply, P.Done):
                    rec.e2e_s = now - sent
                    if math.isnan(rec.ttft_s):
                        rec.ttft_s = rec.e2e_s
                    return reply
                elif isinstance(reply, P.Error):
                    rec.error = f"{reply.code}: {reply.message}"
                    return None
        except TimeoutError:
            rec.error = "timeout"
            return None
        finally:
            self.waiters.pop(rid, None)

    async def close(self) -> None:
        for t in self.readers:
            t.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.ctx.destroy(linger=0)
