"""The bridge to the engine: admitted jobs go to the batched engine, answers come back.

The `Worker` takes queued jobs in order whenever the engine has a place for one
(`Load.next`: up to its ``max_running`` run at once, each in its own task), finishes
a job's KV pull, submits it to the engine and sends its chunks and its final `Done`
(after publishing what the request cached). The engine's thread hands each decode
step's pieces and ends to the loop in one hop (`Engine.deliver`). A caller's Cancel
cancels the job's engine handle; the deadline travels with the request. `Progress`
keep-alives go to forwarders that asked. `on_engine` runs other work (KV exports and
imports) on the engine thread between two steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

from zmesh import protocol as P
from zmesh.engine import Engine, EngineError, GenerationResult, Request, run_calls
from zmesh.kvpeer import Imported, KvPeer
from zmesh.node.context import NodeContext
from zmesh.node.load import Job, Load, expired
from zmesh.node.transport import Transport

STOP_WAIT_S = 10.0  # on stop: how long cancelled requests get to leave the engine


def on_engine(engine: Engine) -> Callable[[Callable[[], Any]], Any]:
    """``await run(fn)``: ``fn`` on the engine thread, before its next step (at once
    when it is idle); every llama.cpp call stays on that one thread."""

    async def run(fn: Callable[[], Any]) -> Any:
        return await asyncio.wrap_future(engine.call_soon(fn))

    return run


class Worker:
    def __init__(
        self,
        ctx: NodeContext,
        transport: Transport,
        load: Load,
        kv: KvPeer,
        flush_deltas: Callable[[], None],
        release: Callable[[tuple[bytes, str], bytes | None], None],
    ) -> None:
        self._c = ctx
        self._t = transport
        self._load = load
        self._kv = kv
        self._flush_deltas = flush_deltas
        self._release = release  # the job's request is answered: out of the in-flight count
        # Request ids are scoped to their caller: keyed (scope, request id).
        self.jobs: dict[tuple[bytes, str], Job] = {}
        # (caller, request id) -> where to send Progress keep-alives
        self._progress: dict[tuple[bytes, str], list[bytes]] = {}
        self._unacknowledged: set[tuple[bytes, str]] = set()  # no Progress sent yet
        self._tasks: set[asyncio.Task[None]] = set()
        self._deliver: Callable[[list[Callable[[], None]]], None] | None = None
        self._stopping = False

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
        load = self._load
        if job.kv_pull is not None or len(load.running) + len(load.queue) > load.places():
            self.acknowledge(job.key)  # it waits (for a place or its pull): said now
        return True

    def cancel(self, key: tuple[bytes, str]) -> None:
        """The caller cancelled a request queued or running here."""
        job = self.jobs.get(key)
        if job is not None:
            job.cancelled = True
            if job.handle is not None:
                job.handle.cancel()  # ends at the engine's next step

    async def run(self) -> None:
        """Hand each queued job to the engine as soon as it has a place for it."""
        self._loop = loop = asyncio.get_running_loop()

        def deliver(calls: list[Callable[[], None]]) -> None:
            # One hop per engine step: that step's chunks and ends, run on the loop.
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits
                loop.call_soon_threadsafe(run_calls, calls)

        self._deliver = deliver
        self._c.engine.deliver = deliver
        while True:
            job = await self._load.next()
            task = asyncio.create_task(self._run_job(job), name=f"job-{job.msg.request_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Node stop: end every job unanswered (a client fails over, as when a node
        dies), wait for the engine to drop them (at its next step), and give the
        engine its own delivery back (a test's engine outlives the node)."""
        self._stopping = True
        handles = [j.handle for j in self.jobs.values() if j.handle is not None]
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()  # each cancels its handle on the way out
        await asyncio.gather(*tasks, return_exceptions=True)
        left = [asyncio.wrap_future(h.future) for h in handles if not h.done()]
        if left:
            await asyncio.wait(left, timeout=STOP_WAIT_S)
        engine = self._c.engine
        if self._deliver is not None and engine.deliver is self._deliver:
            engine.deliver = run_calls

    async def _run_job(self, job: Job) -> None:
        try:
            await self._serve_job(job)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._c.log.exception("request.failed", request_id=job.msg.request_id, error=repr(exc))
            self._t.reply_error(job.reply_to, job.msg.request_id, P.INTERNAL, repr(exc))
        finally:
            if job.handle is not None and not job.handle.done():
                job.handle.cancel()  # a failure here must not leave it decoding
            self._flush_deltas()  # also after failures: a prefill may have cached
            self._load.finished(job)
            key = job.key
            self.jobs.pop(key, None)
            self.unwatch(key)
            self._release(key, job.client)

    async def _serve_job(self, job: Job) -> None:
        c = self._c
        msg, rid = job.msg, job.msg.request_id
        if self._stopping:  # the node stops: never answered here, like a node that dies
            if job.kv_pull is not None:
                job.kv_pull.cancel()
            return
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
            result = await self._generate(job)
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
            queue_s=round(started - job.received_at + result.queue_s, 6),
            shipped_tokens=job.shipped_tokens,
            pulled_from=job.pulled_from if job.shipped_tokens else None,
        )
        # Counted and logged before it is sent, so whoever holds the Done can read both
        # (the log line costs ~50 us, measured; a token costs milliseconds).
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
        self._t.reply(job.reply_to, done)

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

    async def _generate(self, job: Job) -> GenerationResult:
        """Submit the job to the engine (after importing its pulled KV state, on the
        engine thread) and wait for its end; chunks are sent as the steps deliver them."""
        msg = job.msg
        engine = self._c.engine
        ended: asyncio.Future[GenerationResult] = self._loop.create_future()

        def on_piece(text: str) -> None:
            # Stopping: a straggler may be delivered on the engine thread after the
            # node handed the engine its own delivery back; never touch the sockets then.
            if msg.stream and not self._stopping:
                self._send_chunk(job, text)

        def on_done(result: GenerationResult | None, error: BaseException | None) -> None:
            if ended.done() or self._loop.is_closed():
                return
            if error is not None:
                ended.set_exception(error)
            else:
                assert result is not None
                ended.set_result(result)

        request = Request(
            tokens=job.tokens,
            params=msg.params,
            namespace=job.req.namespace,
            deadline=msg.deadline,
        )
        if job.kv_state is None:
            handle = engine.submit(request, on_piece, on_done)
        else:
            state, job.kv_state = job.kv_state, None

            def start() -> tuple[Any, Imported]:
                # Import and queue in one turn of the engine thread; the engine keeps the
                # slot from other imports until this request claims it.
                loaded = self._kv.load(state, msg.tenant)
                submitted = engine.submit(request, on_piece, on_done)
                # Set here, then check: a stop or Cancel that lands while this runs
                # (the awaiting task already cancelled) still ends the request.
                job.handle = submitted
                if job.cancelled or self._stopping:
                    submitted.cancel()
                return submitted, loaded

            handle, loaded = await asyncio.wrap_future(engine.call_soon(start))
            # Counters and costs belong to the loop: recorded here, not on the engine.
            job.shipped_tokens = self._kv.record_import(loaded, msg.request_id)
            if not job.shipped_tokens:
                job.route_reason = "fallback"
        job.handle = handle
        if job.cancelled:
            handle.cancel()
        self.acknowledge(job.key)  # the engine has it (before this, said by enqueue)
        return await ended

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
        """Send ``envelope`` Progress for this request until it is answered. The first
        one (a forwarder's first reply) goes once the request is in hand
        (`acknowledge`): handed to the engine, queued behind others, waiting for its
        KV pull or forwarded on. Not on arrival: there it would be one more send
        and wake-up on the request's way to the engine, on every hop."""
        self._progress[key] = envelope
        self._unacknowledged.add(key)

    def acknowledge(self, key: tuple[bytes, str]) -> None:
        """The first Progress of a watched request, if not sent yet."""
        if key in self._unacknowledged:
            self._send_progress(key, self._progress[key])

    def unwatch(self, key: tuple[bytes, str]) -> None:
        self._progress.pop(key, None)
        self._unacknowledged.discard(key)

    def _send_progress(self, key: tuple[bytes, str], envelope: list[bytes]) -> None:
        self._unacknowledged.discard(key)
        rid = key[1]
        state = "accepted"  # being tokenized and routed
        if key in self._load.running:
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
