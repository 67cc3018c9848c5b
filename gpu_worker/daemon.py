"""The GPU worker daemon: serve one worker queue with one engine, many jobs at once.

Life of a job here: read from the worker's queue stream (as many as the engine has free slots)
→ ``start.lua`` marks it running (or says it was cancelled) → the engine runs it concurrently with
the others → ``finish.lua`` writes its terminal state once, acknowledges the queue entry, feeds
the completions stream and notifies the client. Writes are batched into one pipeline per tick.

If this process dies, its unacknowledged entries stay in the queue stream; the dispatcher sees
the heartbeat expire and puts them back on the intake, so they run elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from pydantic import ValidationError

from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.engine import Engine, EngineError, EngineOutput, EngineRequest, EngineStats, RequestRejected
from dio.protocol.connection import connect_async
from dio.protocol.keys import JOB_FIELD, REQUEST_FIELD, STATUS_FIELD, WORKER_GROUP
from dio.protocol.models import (
    Completion,
    JobResult,
    JobStatus,
    Request,
    Tier,
    WorkerInfo,
    WorkerTelemetry,
    describe_validation_error,
    to_hash,
)
from dio.protocol.scripts import AsyncScripts

log = logging.getLogger("dio.worker")

FLUSH_INTERVAL_S = 0.002  # finished jobs are written in one pipeline at most this often
CANCEL_CHECK_INTERVAL_S = 0.5


@dataclass
class Finished:
    """A job's end, waiting to be written by the next flush."""

    entry_id: str
    result: JobResult
    reply_to: str | None
    completion: Completion | None


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)


def to_engine_request(request: Request) -> EngineRequest:
    """Translate a wire request into what engines take."""
    return EngineRequest(
        id=request.id,
        prompt_tokens=request.prompt_tokens,
        max_tokens=request.max_tokens,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        ignore_eos=request.ignore_eos,
        prefix_hashes=request.prefix_hashes,
        priority=1 if request.tier == Tier.batch else 0,
    )


class WorkerDaemon:
    """One worker: registers, heartbeats, reads its queue, runs jobs, writes results."""

    def __init__(self, settings: WorkerSettings, engine: Engine, worker_id: str | None = None,
                 client: aioredis.Redis | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = settings.keys
        self.redis = client or connect_async(settings)
        self.scripts = AsyncScripts(self.redis, self.keys)
        self.worker_id = worker_id or settings.worker_id or ""
        self.counters = Counters()
        self.draining = False
        self._pending: list[Finished] = []
        self._has_pending = asyncio.Event()
        self._stats = EngineStats()  # the engine's telemetry as of the last heartbeat
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self.info: WorkerInfo | None = None

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and register this worker's capabilities."""
        await self.engine.start()
        cap = self.engine.capacity()
        if not self.worker_id:
            self.worker_id = f"{self.engine.name}-{cap.gpu}-{socket.gethostname()}-{os.getpid()}".replace(" ", "_")
        self.info = cap.worker_info(self.worker_id, self.engine.name, host=socket.gethostname(), pid=os.getpid())
        try:
            await self.redis.xgroup_create(self.keys.queue(self.worker_id), WORKER_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        await self.redis.delete(self.keys.worker(self.worker_id))
        await self.heartbeat()
        await self.redis.sadd(self.keys.workers, self.worker_id)
        log.info("worker %s registered: %s", self.worker_id, self.info.model_dump_json())

    async def run(self) -> None:
        """Serve until ``stop()``; then drain in-flight jobs and deregister."""
        if self.info is None:
            await self.start()
        tasks = [asyncio.create_task(self._heartbeat_loop()), asyncio.create_task(self._flush_loop()),
                 asyncio.create_task(self._cancel_loop())]
        try:
            await self._read_loop()
            await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await self._flush()
            await self.heartbeat()
            # Removing the alive key lets the dispatcher take back anything still queued here at once.
            await self.redis.delete(self.keys.alive(self.worker_id))
            await self.engine.shutdown()

    def stop(self) -> None:
        """Stop reading new jobs (SIGTERM): in-flight ones finish first."""
        self.draining = True
        self._stop.set()
        self._slot_freed.set()

    async def _drain(self) -> None:
        in_flight = list(self.counters.in_flight.values())
        if in_flight:
            log.info("draining %d in-flight jobs", len(in_flight))
            await asyncio.wait(in_flight, timeout=self.settings.drain_timeout_s)

    # --- heartbeat ------------------------------------------------------------------------------

    def telemetry(self) -> WorkerTelemetry:
        # Read once per heartbeat: an engine's stats can be costly (vLLM collects its Prometheus
        # registry), and the event loop it would block also streams vLLM's tokens.
        stats = self._stats = self.engine.stats()
        return WorkerTelemetry(
            running=stats.running, waiting=stats.waiting, in_flight=len(self.counters.in_flight),
            kv_used_tokens=stats.kv_used_tokens, kv_usage=stats.kv_usage, free_vram_bytes=stats.free_vram_bytes,
            preemptions=stats.preemptions, completed=self.counters.completed, failed=self.counters.failed,
            draining=self.draining,
        )

    async def heartbeat(self) -> None:
        """Refresh telemetry and the alive key."""
        assert self.info is not None
        fields = {**to_hash(self.info), **to_hash(self.telemetry())}
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(self.keys.worker(self.worker_id), mapping=fields)
        pipe.set(self.keys.alive(self.worker_id), "1", px=int(self.settings.heartbeat_ttl_s * 1000))
        await pipe.execute()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                await self.heartbeat()
            except Exception:  # Redis hiccup: the next beat retries; the TTL covers a few misses.
                log.warning("heartbeat failed", exc_info=True)

    # --- reading --------------------------------------------------------------------------------

    def free_slots(self) -> int:
        assert self.info is not None
        return self.info.max_num_seqs - len(self.counters.in_flight)

    async def _read_loop(self) -> None:
        queue = self.keys.queue(self.worker_id)
        # Entries this worker read before a restart come first (id "0" = own pending list).
        cursor = "0"
        while not self._stop.is_set():
            free = self.free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                reply = await self.redis.xreadgroup(WORKER_GROUP, self.worker_id, {queue: cursor}, count=free,
                                                    block=None if cursor == "0" else self.settings.read_block_ms)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                log.warning("queue read failed; retrying", exc_info=True)
                await asyncio.sleep(0.5)
                continue
            entries = reply[0][1] if reply else []
            if cursor == "0" and not entries:
                cursor = ">"
                continue
            if cursor == "0":
                entries = [(eid, f) for eid, f in entries if f]  # deleted entries come back empty
                cursor = entries[-1][0] if entries else ">"
            if entries:
                await self._start_jobs(entries)

    async def _start_jobs(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        parsed: list[tuple[str, Request]] = []
        for entry_id, fields in entries:
            request = self._parse(entry_id, fields)
            if request is not None:
                parsed.append((entry_id, request))
        if not parsed:
            return
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for _, request in parsed:
            await self.scripts.start(pipe, request.id, self.worker_id, now)  # async scripts queue when awaited
        allowed = await pipe.execute()
        for (entry_id, request), ok in zip(parsed, allowed, strict=True):
            if ok == 1:
                task = asyncio.create_task(self._run_job(entry_id, request, now))
                self.counters.in_flight[request.id] = task
            else:  # cancelled while queued: acknowledge without running.
                await self._ack_only(entry_id)

    def _parse(self, entry_id: str, fields: dict[str, str]) -> Request | None:
        """Validate a queue entry; a bad one is failed (if it has an id) and acknowledged."""
        try:
            return Request.model_validate_json(fields.get(REQUEST_FIELD, ""))
        except ValidationError as exc:
            job_id = fields.get(JOB_FIELD)
            log.error("invalid queue entry %s: %s", entry_id, exc)
            if job_id:
                result = JobResult(id=job_id, status=JobStatus.failed, worker=self.worker_id,
                                   error=describe_validation_error(exc), finished_at=time.time())
                self._finish(entry_id, result, None, None)
            else:
                asyncio.get_running_loop().create_task(self._ack_only(entry_id))
            return None

    async def _ack_only(self, entry_id: str) -> None:
        queue = self.keys.queue(self.worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(queue, WORKER_GROUP, entry_id)
        pipe.xdel(queue, entry_id)
        await pipe.execute()

    # --- running --------------------------------------------------------------------------------

    async def _run_job(self, entry_id: str, request: Request, started_at: float) -> None:
        out = EngineOutput()
        status, error, reason = JobStatus.completed, None, None
        try:
            async for partial in self.engine.stream(to_engine_request(request)):
                out = partial
            if out.finish_reason == "abort":
                status = JobStatus.cancelled
        except asyncio.CancelledError:
            status, error = JobStatus.cancelled, "cancelled by the client"
        except RequestRejected as exc:  # the engine refuses it: a client error, not retried
            status, reason = JobStatus.rejected, str(exc)
        except EngineError as exc:  # OOM or engine failure: the job fails with the engine's message
            status, error = JobStatus.failed, str(exc)
        except Exception as exc:  # a bug must not kill the daemon: fail this job, keep serving
            log.error("job %s crashed the engine call:\n%s", request.id, traceback.format_exc())
            status, error = JobStatus.failed, f"internal worker error: {type(exc).__name__}: {exc}"
        finally:
            self.counters.in_flight.pop(request.id, None)
            self._slot_freed.set()
        self._record(entry_id, request, started_at, out, status, error, reason)

    def _record(self, entry_id: str, request: Request, started_at: float, out: EngineOutput,
                status: JobStatus, error: str | None, reason: str | None) -> None:
        finished_at = time.time()
        if status == JobStatus.completed:
            self.counters.completed += 1
        elif status == JobStatus.failed:
            self.counters.failed += 1
        result = JobResult(
            id=request.id, status=status, worker=self.worker_id, output=out.text,
            output_token_ids=out.token_ids, prompt_tokens=out.prompt_tokens or request.prompt_tokens,
            output_tokens=out.output_tokens, error=error, reason=reason, first_token_at=out.first_token_at,
            finished_at=finished_at, preemptions=out.preemptions,
        )
        stats = self._stats
        assert self.info is not None
        completion = Completion(
            job=request.id, worker=self.worker_id, status=status, prompt_tokens=result.prompt_tokens or 0,
            output_tokens=out.output_tokens, cached_tokens=out.cached_tokens,
            service_ms=(finished_at - started_at) * 1000.0,
            ttft_ms=None if out.first_token_at is None else (out.first_token_at - started_at) * 1000.0,
            free_kv_tokens=max(self.info.kv_capacity_tokens - stats.kv_used_tokens, 0), finished_at=finished_at,
        )
        self._finish(entry_id, result, request.reply_to, completion)

    # --- writing --------------------------------------------------------------------------------

    def _finish(self, entry_id: str, result: JobResult, reply_to: str | None, completion: Completion | None) -> None:
        self._pending.append(Finished(entry_id, result, reply_to, completion))
        self._has_pending.set()

    async def _flush(self) -> None:
        """Write every finished job in one pipeline (terminal state, ack, completion, notice)."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        queue = self.keys.queue(self.worker_id)
        pipe = self.redis.pipeline(transaction=False)
        for f in batch:
            await self.scripts.finish(pipe, f.result, f.reply_to, ack_stream=queue, ack_group=WORKER_GROUP,
                                      ack_entry=f.entry_id, completion=f.completion, job_ttl_s=self.settings.job_ttl_s)
        try:
            await pipe.execute()
        except (aioredis.ConnectionError, aioredis.TimeoutError):
            # Not written: keep them for the next flush; the entries stay pending meanwhile.
            log.warning("result write failed; retrying", exc_info=True)
            self._pending = batch + self._pending
            await asyncio.sleep(0.2)

    async def _flush_loop(self) -> None:
        """Write finished jobs as they come, coalescing those that end within FLUSH_INTERVAL_S.

        A result that ends after a quiet spell is written at once (no added latency); under load,
        results that end within FLUSH_INTERVAL_S of the last write share the next pipeline.
        """
        last_flush = 0.0
        while True:
            await self._has_pending.wait()
            wait = FLUSH_INTERVAL_S - (time.monotonic() - last_flush)
            if wait > 0:
                await asyncio.sleep(wait)
            self._has_pending.clear()
            last_flush = time.monotonic()
            await self._flush()
            if self._pending:  # a failed write put them back
                self._has_pending.set()

    async def _cancel_loop(self) -> None:
        """Abort running jobs whose client cancelled them (their hash says ``cancelled``)."""
        while True:
            await asyncio.sleep(CANCEL_CHECK_INTERVAL_S)
            job_ids = list(self.counters.in_flight)
            if not job_ids:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in job_ids:
                    pipe.hget(self.keys.job(job_id), STATUS_FIELD)
                statuses = await pipe.execute()
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                continue
            for job_id, status in zip(job_ids, statuses, strict=True):
                if status == JobStatus.cancelled.value and job_id in self.counters.in_flight:
                    await self.engine.abort(job_id)


async def serve(settings: WorkerSettings, engines: list[Engine], worker_ids: list[str | None]) -> None:
    """Run one or more workers in this process until SIGTERM/SIGINT, then drain them."""
    client = connect_async(settings)
    daemons = [WorkerDaemon(settings, e, wid, client=client) for e, wid in zip(engines, worker_ids, strict=True)]

    def stop_all() -> None:
        for daemon in daemons:
            daemon.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    await asyncio.gather(*(d.start() for d in daemons))
    await asyncio.gather(*(d.run() for d in daemons))
    await client.aclose()
