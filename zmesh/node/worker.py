"""The bridge to the engine: the job queue's consumer on the one llama.cpp thread.

`EngineThread` is that thread (an executor of one): the worker runs each job there,
and other parts (KV shipping) hand it work between two decode steps. The `Worker`
takes jobs in order, finishes a job's KV pull, generates, sends chunks (handed back
to the loop thread with `call_soon_threadsafe`) and the final `Done` (after publishing
what the request cached), and sends `Progress` keep-alives to forwarders that asked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from zmesh import protocol as P
from zmesh.engine import Engine, EngineError, GenerationResult
from zmesh.kvpeer import KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.load import Job, Load, expired
from zmesh.node.transport import Transport


class EngineThread:
    """The one thread llama.cpp runs on."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def between_steps(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread: between two steps of the running request,
        or in the engine's executor when it runs none."""
        fut = self.engine.call_between_steps(fn)
        if fut is None:
            return await asyncio.get_running_loop().run_in_executor(self.executor, fn)
        return await asyncio.wrap_future(fut)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class Worker:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        engine_thread: EngineThread,
        kv: KvPeer,
        flush_deltas: Callable[[], None],
        release: Callable[[tuple[bytes, str], bytes | None], None],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._thread = engine_thread
        self._kv = kv
        self._flush_deltas = flush_deltas
        self._release = release  # the job's request is answered: out of the in-flight count
        # Request ids are scoped to their caller: keyed (scope, request id).
        self.jobs: dict[tuple[bytes, str], Job] = {}
        # (caller, request id) -> where to send Progress keep-alives
        self._progress: dict[tuple[bytes, str], list[bytes]] = {}

    def enqueue(self, job: Job) -> bool:
        """Queue a job for the worker; False (and `overloaded` sent) when the queue is full."""
        rid = job.msg.request_id
        try:
            self._load.put(job)
        except asyncio.QueueFull:
            self._c.count("requests_overloaded")
            self._c.log.warning("request.failed", request_id=rid, code=P.OVERLOADED)
            self._t.reply_error(
                job.reply_to,
                rid,
                P.OVERLOADED,
                f"node {self._c.node_id} queue is full ({self._c.config.max_queue})",
            )
            return False
        self.jobs[job.scope, rid] = job
        return True

    def cancel(self, key: tuple[bytes, str]) -> None:
        """The caller cancelled a request queued or running here."""
        job = self.jobs.get(key)
        if job is not None:
            job.cancelled = True

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        while True:
            job = await self._load.next()
            try:
                await self._serve_job(job)
            except Exception as exc:
                self._c.log.exception(
                    "request.failed", request_id=job.msg.request_id, error=repr(exc)
                )
                self._t.reply_error(job.reply_to, job.msg.request_id, P.INTERNAL, repr(exc))
            finally:
                self._flush_deltas()  # also after failures: a prefill may have cached
                self._load.finished()
                key = job.key
                self.jobs.pop(key, None)
                self._progress.pop(key, None)
                self._release(key, job.client)

    async def _serve_job(self, job: Job) -> None:
        c = self._c
        msg, rid = job.msg, job.msg.request_id
        if expired(msg) or job.cancelled:
            if job.kv_pull is not None:
                job.kv_pull.cancel()
            if not job.cancelled:
                self._t.deadline_error(
                    job.reply_to,
                    rid,
                    f"deadline passed while the request was queued on {c.node_id}",
                )
            return
        if job.kv_pull is not None:
            await self._finish_pull(job)
        started = time.time()
        try:
            result = await self._loop.run_in_executor(
                self._thread.executor, self._generate_blocking, job
            )
        except EngineError as exc:
            c.count("requests_failed")
            c.log.warning("request.failed", request_id=rid, code=exc.code, error=exc.message)
            self._t.reply_error(job.reply_to, rid, exc.code, exc.message)
            return
        # Publish what this request cached before answering, so peers can know of it
        # by the time the client sends its next request.
        self._flush_deltas()
        if result.finish_reason == "cancelled" and not job.cancelled and expired(msg):
            # Stopped by the deadline, not by a Cancel: an error, like a queued expiry.
            self._t.deadline_error(
                job.reply_to,
                rid,
                f"deadline passed on {c.node_id} after {result.completion_tokens} tokens",
            )
            return
        if result.evicted_tokens:
            c.log.info("cache.evicted", request_id=rid, tokens=result.evicted_tokens)
        done = P.Done(
            request_id=rid,
            text=result.text,
            finish_reason=result.finish_reason,
            served_by=c.node_id,
            hops=msg.hops,
            route_reason=job.route_reason,
            route_path=job.route_path,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_s=round(started - job.received_at + result.ttft_s, 6),
            prefill_s=round(result.prefill_s, 6),
            decode_tps=round(result.decode_tps, 2),
            queue_s=round(started - job.received_at, 6),
            shipped_tokens=job.shipped_tokens,
            pulled_from=job.pulled_from if job.shipped_tokens else None,
        )
        self._t.reply(job.reply_to, done)
        c.count("requests_served")
        c.metrics.answered(done, local=True, evicted_tokens=result.evicted_tokens)
        c.count("prompt_tokens", result.prompt_tokens)
        c.count("cached_tokens", result.cached_tokens)
        c.log.info(
            "request.completed",
            request_id=rid,
            served_by=c.node_id,
            route_reason=job.route_reason,
            hops=msg.hops,
            prompt_tokens=result.prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            ttft_s=done.ttft_s,
            queue_s=done.queue_s,
            finish=result.finish_reason,
        )

    async def _finish_pull(self, job: Job) -> None:
        """Wait for the job's pull (it has its own deadline); on failure the request is
        prefilled here like any other, reason "fallback"."""
        assert job.kv_pull is not None
        try:
            job.kv_state = await job.kv_pull
        except Exception as exc:  # KvFetchFailed, or a bug: either way, prefill here
            self._c.count("kv_fetch_failed")
            self._c.log.warning(
                "request.fallback",
                request_id=job.msg.request_id,
                target=job.pulled_from,
                why=f"KV pull failed: {exc}",
            )
            job.route_reason = "fallback"

    def _generate_blocking(self, job: Job) -> GenerationResult:
        """Runs in the engine thread; chunks hop back to the loop thread to be sent."""
        msg = job.msg
        deadline = msg.deadline
        engine = self._c.engine
        loop = self._loop

        def on_text(text: str) -> None:
            if msg.stream:
                loop.call_soon_threadsafe(self._send_chunk, job, text)

        def should_stop() -> bool:
            return job.cancelled or (deadline is not None and time.time() > deadline)

        # Serving from the import on: a peer's KV fetch waits for a step, not for this.
        with engine.serving():
            if job.kv_state is not None:
                job.shipped_tokens = self._kv.import_state(job.kv_state, msg.tenant, msg.request_id)
                job.kv_state = None
                if not job.shipped_tokens:
                    job.route_reason = "fallback"
            return engine.generate(
                tokens=job.tokens,
                params=msg.params,
                namespace=self._c.namespace(msg.tenant),
                on_text=on_text,
                should_stop=should_stop,
            )

    def _send_chunk(self, job: Job, text: str) -> None:
        self._t.reply(
            job.reply_to,
            P.Chunk(
                request_id=job.msg.request_id, index=job.chunks, text=text, attempt=job.attempt
            ),
        )
        job.chunks += 1

    # ---- Progress keep-alives ----------------------------------------------------

    def watch(self, key: tuple[bytes, str], envelope: list[bytes]) -> None:
        """Send ``envelope`` Progress for this request until it is answered, the first
        one at once (a forwarder's first reply)."""
        self._progress[key] = envelope
        self._send_progress(key, envelope)

    def unwatch(self, key: tuple[bytes, str]) -> None:
        self._progress.pop(key, None)

    def _send_progress(self, key: tuple[bytes, str], envelope: list[bytes]) -> None:
        rid = key[1]
        state = "accepted"  # being tokenized and routed
        if (r := self._load.running) is not None and r.key == key:
            state = "running"
        elif key in self.jobs:
            state = "queued"
        self._t.reply(
            envelope,
            P.Progress(
                request_id=rid,
                node_id=self._c.node_id,
                state=state,
                queue_depth=self._load.depth(),
                interval_s=self._c.config.routing.progress_interval_s,
            ),
        )

    async def progress_loop(self) -> None:
        """Keep-alives for the requests whose sender asked for them (forwarders): a
        request queued or running here for long is alive, not lost."""
        while True:
            await asyncio.sleep(self._c.config.routing.progress_interval_s)
            for key, envelope in list(self._progress.items()):
                self._send_progress(key, envelope)
