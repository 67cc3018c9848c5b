"""The GPU worker daemon: serve one worker queue with one engine, many jobs at once.

Life of a job here: read from the worker's queue stream (as many as the engine has free slots)
→ ``start.lua`` marks it running (or says it was cancelled) → the engine runs it concurrently with
the others → ``finish.lua`` writes its terminal state once, acknowledges the queue entry, feeds
the completions stream and notifies the client. Writes are batched into one pipeline per tick.

If this process dies, its unacknowledged entries stay in the queue stream; the dispatcher sees
the heartbeat expire and puts them back on the intake, so they run elsewhere. A process restarted
under the same id first runs what is left in its pending list, then reads new entries.

A job runs here only while it is this worker's: ``start.lua`` refuses one that ended or was taken
back meanwhile, and every ``CANCEL_CHECK_INTERVAL_S`` the daemon reads the job hashes of what it
runs and aborts a copy whose job ended (cancelled by its client, or finished by another copy) or
was handed to another worker (requeued after this worker stalled past its heartbeat). A superseded
copy ends without a terminal state (``finish.lua`` with ``owner``: the other worker's copy ends
the job); its entry is acknowledged and its reservation here freed. A job handed back to this
worker while its copy still runs here keeps that copy, which then answers the new entry.

A worker id is owned by one process at a time: the one whose random token its alive key holds
(``heartbeat.lua``). A second process started with a live worker's id is refused
(``WorkerIdInUse``); one whose heartbeat lapsed (a stall) registers again as soon as a heartbeat
gets through. A Redis error never stops the daemon (``dio.protocol.retry``): every loop logs
it once, backs off and retries; finished jobs wait in memory until they can be written, and the
background loops (heartbeat, result writes, cancel checks) are restarted if they crash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import IntEnum

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.engine import Engine, EngineError, EngineOutput, EngineRequest, EngineStats, RequestRejected
from dio.gpu_worker.metrics import WorkerMetrics
from dio.gpu_worker.token_stream import TokenPublisher
from dio.protocol import logs
from dio.protocol.connection import connect_async
from dio.protocol.keys import JOB_FIELD, REQUEST_FIELD, SIM_EOS_METADATA, STATUS_FIELD, WORKER_GROUP
from dio.protocol.models import (
    TERMINAL_STATUSES,
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
from dio.protocol.retry import Outage
from dio.protocol.scripts import AsyncScripts

log = logging.getLogger("dio.worker")

FLUSH_INTERVAL_S = 0.002  # finished jobs are written in one pipeline at most this often
CANCEL_CHECK_INTERVAL_S = 0.5
PENDING_PAGE = 1000  # own pending entries read back per XREADGROUP at start and after an outage
RESTART_LOOP_S = 0.5  # a crashed background loop is started again after this long
TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)  # as job hashes spell them


class WorkerIdInUse(RuntimeError):
    """Another live process owns this worker id: serving its queue too would run its jobs twice."""


class Beat(IntEnum):
    """What a heartbeat found (``heartbeat.lua``'s reply)."""

    not_ours = 0  # another process owns the worker id
    renewed = 1
    registered = 2  # the alive key or the worker-set membership was gone: registered anew


NEEDS_CAPABILITIES = 3  # heartbeat.lua: registering needs the capabilities the renewal did not send


@dataclass
class Finished:
    """A job's end, waiting to be written by the next flush."""

    entry_id: str
    result: JobResult
    reply_to: str | None
    completion: Completion | None
    owner: str | None = None  # set for a superseded copy: end the job only while it is still this worker's
    end_run: str | None = None  # a streaming job's run here: its token stream gets an end marker


@dataclass
class Counters:
    completed: int = 0
    failed: int = 0
    in_flight: dict[str, asyncio.Task] = field(default_factory=dict)


def sim_eos_tokens(request: Request) -> int | None:
    """Where a simulated model stops, from ``metadata[SIM_EOS_METADATA]``; None when not given.

    Raises ``RequestRejected`` (the job ends rejected, not retried) unless it is a positive integer.
    """
    value = (request.metadata or {}).get(SIM_EOS_METADATA)
    if value is None:
        return None
    try:
        tokens = int(value)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise RequestRejected(f"metadata {SIM_EOS_METADATA!r} must be a positive integer, not {value!r}")
    return tokens


def to_engine_request(request: Request) -> EngineRequest:
    """Translate a wire request into what engines take (``RequestRejected`` for invalid engine metadata)."""
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
        eos_tokens=sim_eos_tokens(request),
        stream=request.stream,
        stop=request.stop,
    )


class WorkerDaemon:
    """One worker: registers, heartbeats, reads its queue, runs jobs, writes results."""

    def __init__(self, settings: WorkerSettings, engine: Engine, worker_id: str | None = None,
                 client: aioredis.Redis | None = None, metrics: WorkerMetrics | None = None) -> None:
        self.settings = settings
        self.engine = engine
        # Sharded by model, this worker's keys (its queue, the jobs it runs, its clients' reply streams)
        # are its model's pool's; the registry that names the pools is the deployment's.
        self.keys = settings.keys_for(settings.model)
        self.base_keys = settings.keys
        self._pool_registered = False  # sharded: this worker's model is in the pool registry
        self.redis = client or connect_async(settings)
        self.scripts = AsyncScripts(self.redis, self.keys)
        self.worker_id = worker_id or settings.worker_id or ""
        self.counters = Counters()
        self.metrics = metrics or WorkerMetrics()
        self.draining = False
        self._pending: list[Finished] = []
        self._has_pending = asyncio.Event()
        # Streaming jobs' deltas, written by the same flushes as the results (nothing for the others).
        self.tokens = TokenPublisher(self.keys, maxlen=settings.token_stream_maxlen,
                                     ttl_s=settings.token_stream_ttl_s, end_ttl_s=settings.token_stream_end_ttl_s)
        self._stats = EngineStats()  # the engine's telemetry as of the last heartbeat
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._held: set[str] = set()  # queue entries started or finished here and not yet written
        self._entry_of: dict[str, str] = {}  # job id → the queue entry its running copy answers
        self._superseded: set[str] = set()  # running jobs handed to another worker: aborted, not ended here
        self._rerun: dict[str, tuple[str, Request]] = {}  # superseded jobs handed back here: run again after
        self._closing = False  # the background loops end (a cancellation alone can be lost: see run)
        self.info: WorkerInfo | None = None
        self.token = uuid.uuid4().hex  # this process's claim on the worker id (the alive key's value)
        self.displaced = False  # another process took the worker id over while this one stalled
        self.outage = Outage(log, f"worker {self.worker_id}")

    # --- start and stop -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine, take ownership of the worker id, and register this worker's capabilities.

        Raises WorkerIdInUse when another live process owns the id (nothing of that one is touched).
        """
        await self.engine.start()
        cap = self.engine.capacity()
        if not self.worker_id:
            self.worker_id = f"{self.engine.name}-{cap.gpu}-{socket.gethostname()}-{os.getpid()}".replace(" ", "_")
        self.info = cap.worker_info(self.worker_id, self.engine.name, host=socket.gethostname(), pid=os.getpid())
        self.outage.who = f"worker {self.worker_id}"
        await self._claim()  # the queue's consumer group is created by the first read (_resume)
        self.metrics.add_worker(self.info, self.outage)
        logs.event(log, logging.INFO, logs.WORKER_JOINED, "worker %s registered: %s", self.worker_id,
                   self.info.model_dump_json(exclude={"chat_template"}), worker=self.worker_id, gpu=self.info.gpu)

    async def _claim(self) -> None:
        """Take the worker id: its alive key, with this process's token, and register (``heartbeat.lua``).

        A process with this id that died leaves its key to expire within ``heartbeat_ttl_s``; a live
        one keeps renewing it. So the claim is retried for that long, then refused. While Redis is
        unreachable, the claim waits for it.
        """
        deadline: float | None = None
        while True:
            try:
                beat = await self.heartbeat()
            except redis.RedisError as exc:
                await asyncio.sleep(self.outage.failed(exc))
                continue
            self.outage.ok()
            if beat is not Beat.not_ours:
                return
            now = time.monotonic()
            if deadline is None:
                deadline = now + self.settings.heartbeat_ttl_s + self.settings.heartbeat_interval_s
            elif now >= deadline:
                host, pid = await self.redis.hmget(self.keys.worker(self.worker_id), ["host", "pid"])
                where = f" (pid {pid} on {host})" if host and pid else ""
                raise WorkerIdInUse(f"worker id {self.worker_id} is in use by another process{where}, whose heartbeat "
                                    "is alive: stop it, or start this one with another --id")
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def _ensure_group(self) -> None:
        """Create the queue's consumer group if it is missing (first start, or a Redis that came back empty)."""
        try:
            await self.redis.xgroup_create(self.keys.queue(self.worker_id), WORKER_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run(self) -> None:
        """Serve until ``stop()``; then drain in-flight jobs and leave.

        Raises WorkerIdInUse at the end when another process took the worker id over meanwhile.
        """
        if self.info is None:
            await self.start()
        loops = {"heartbeat": self._heartbeat_loop, "flush": self._flush_loop, "cancel": self._cancel_loop}
        tasks = [asyncio.create_task(self._supervise(name, loop)) for name, loop in loops.items()]
        try:
            await self._read_loop()
            await self._drain()
        finally:
            # Python 3.11's asyncio.wait_for, inside redis-py, can swallow a cancellation that lands
            # as its command completes: the loops also stop at the flag, at their next turn.
            self._closing = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a flush cut short puts its batch back
            await self.leave()
        if self.displaced:
            raise WorkerIdInUse(f"worker id {self.worker_id} was taken over by another process while this one "
                                "stalled; it stopped")

    async def leave(self) -> None:
        """Write what finished, give the worker id up (only if still this process's), stop the engine."""
        try:
            await self._flush()
            if self.info is not None:
                await self.heartbeat()  # the last telemetry, with draining set
            # Removing the alive key lets the dispatcher take back anything still queued here at once.
            if await self.scripts.release(self.redis, self.keys.alive(self.worker_id), self.token) == 1:
                logs.event(log, logging.INFO, logs.WORKER_LEFT, "worker %s left: deregistered", self.worker_id,
                           worker=self.worker_id)
        except redis.RedisError as exc:
            # Unwritten results leave their entries pending: once the heartbeat expires, the
            # dispatcher requeues those jobs and they run again elsewhere.
            log.warning("worker %s left without deregistering (%s); %d results not written", self.worker_id, exc,
                        len(self._pending))
        finally:
            await self.engine.shutdown()

    async def _supervise(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Keep a background loop running for the daemon's life: start it again whenever it crashes.

        A dead heartbeat would let the dispatcher take this worker's jobs back while it runs them;
        a dead flush would leave every job it finishes unanswered. Neither may stay dead.
        """
        while not self._closing:
            try:
                await loop()
                return  # it ended: the daemon closes, or the heartbeat found the worker id taken over
            except Exception:
                log.exception("worker %s: the %s loop crashed; starting it again", self.worker_id, name)
                await asyncio.sleep(RESTART_LOOP_S)

    def stop(self) -> None:
        """Stop reading new jobs (SIGTERM): in-flight ones finish first."""
        self.draining = True
        self._stop.set()
        self._slot_freed.set()

    async def _drain(self) -> None:
        in_flight = list(self.counters.in_flight.values())
        if in_flight:
            log.info("worker %s draining %d in-flight jobs", self.worker_id, len(in_flight))
            await asyncio.wait(in_flight, timeout=self.settings.drain_timeout_s)
        left = sum(1 for task in in_flight if not task.done())
        if left:
            logs.event(log, logging.WARNING, logs.WORKER_DRAINED, "worker %s drained: %d jobs still ran after %.0f s "
                       "(their entries stay pending, so they run again elsewhere)", self.worker_id, left,
                       self.settings.drain_timeout_s, worker=self.worker_id, jobs=len(in_flight), unfinished=left)
        else:
            logs.event(log, logging.INFO, logs.WORKER_DRAINED, "worker %s drained: %d in-flight jobs finished",
                       self.worker_id, len(in_flight), worker=self.worker_id, jobs=len(in_flight), unfinished=0)

    # --- heartbeat ------------------------------------------------------------------------------

    def telemetry(self) -> WorkerTelemetry:
        # Read once per heartbeat: an engine's stats can be costly (vLLM collects its Prometheus
        # registry), and the event loop it would block also streams vLLM's tokens.
        stats = self._stats = self.engine.stats()
        telemetry = WorkerTelemetry(
            running=stats.running, waiting=stats.waiting, in_flight=len(self.counters.in_flight),
            kv_used_tokens=stats.kv_used_tokens, kv_usage=stats.kv_usage, free_vram_bytes=stats.free_vram_bytes,
            preemptions=stats.preemptions, completed=self.counters.completed, failed=self.counters.failed,
            draining=self.draining,
        )
        self.metrics.telemetry(self.worker_id, telemetry)
        return telemetry

    async def heartbeat(self) -> Beat:
        """Refresh telemetry and the alive key, if this process owns the worker id (``heartbeat.lua``)."""
        assert self.info is not None
        ttl_ms = int(self.settings.heartbeat_ttl_s * 1000)
        telemetry = to_hash(self.telemetry())
        # A renewal sends the telemetry only; the capabilities (a chat template of many KB) go when
        # the script asks for them, to register.
        reply = await self.scripts.heartbeat(self.redis, self.worker_id, self.token, ttl_ms, {}, telemetry)
        if reply == NEEDS_CAPABILITIES:
            reply = await self.scripts.heartbeat(self.redis, self.worker_id, self.token, ttl_ms,
                                                 to_hash(self.info), telemetry)
        assert isinstance(reply, int) and reply != NEEDS_CAPABILITIES, reply  # 0, 1 or 2 once they were sent
        if self.settings.shard_by_model and (reply == Beat.registered or not self._pool_registered):
            await self._register_pool()
        return Beat(reply)

    async def _register_pool(self) -> None:
        """Name this worker's model in the pool registry (a single-key SADD in the base slot).

        After ``heartbeat.lua`` registered the worker: its own pool's keys cannot be written in the
        same script (another slot). Done at every registration, so a registry deleted meanwhile (a
        ``dio reset``, a Redis that came back empty) is written again.
        """
        self._pool_registered = False  # a failed SADD is tried again at the next beat
        await self.redis.sadd(self.base_keys.pools, self.settings.model)
        self._pool_registered = True

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.settings.heartbeat_interval_s)
            try:
                beat = await self.heartbeat()
                if self.metrics.served:  # the queue's length, for /metrics only
                    self.metrics.queue_entries(self.worker_id, await self.redis.xlen(self.keys.queue(self.worker_id)))
            except redis.RedisError as exc:
                # The TTL covers a few missed beats; past it the dispatcher requeues this worker's
                # jobs, and the first beat that gets through registers it again.
                self.outage.failed(exc)
                continue
            self.outage.ok()
            if beat is Beat.registered:
                logs.event(log, logging.WARNING, logs.WORKER_REJOINED, "worker %s rejoined: its heartbeat had lapsed "
                           "(a stall, or a Redis that came back empty), so the dispatcher may have requeued its jobs",
                           self.worker_id, worker=self.worker_id)
            elif beat is Beat.not_ours:
                log.error("worker id %s was taken over by another process while this one stalled: stopping (the "
                          "jobs in flight finish first)", self.worker_id)
                self.displaced = True
                self.stop()
                return

    # --- reading --------------------------------------------------------------------------------

    def free_slots(self) -> int:
        assert self.info is not None
        return self.info.max_num_seqs - len(self.counters.in_flight)

    async def _read_loop(self) -> None:
        queue = self.keys.queue(self.worker_id)
        resume = True  # first the pending list: what a previous process with this id left unfinished
        while not self._stop.is_set():
            free = self.free_slots()
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                if resume:
                    await self._resume()
                    resume = False
                else:
                    reply = await self.redis.xreadgroup(WORKER_GROUP, self.worker_id, {queue: ">"}, count=free,
                                                        block=self.settings.read_block_ms)
                    await self._start_jobs(reply[0][1] if reply else [])
            except redis.RedisError as exc:
                # Entries delivered meanwhile stay in this worker's pending list: they are read
                # back once Redis answers (the group recreated, if Redis came back empty).
                resume = True
                await asyncio.sleep(self.outage.failed(exc))
                continue
            self.outage.ok()

    async def _resume(self) -> None:
        """Start the entries delivered to this worker id and not finished: its pending list, from id "0".

        After a restart they are the previous process's unfinished jobs; after a Redis outage,
        deliveries whose reply was lost. Read once, a page at a time; then only new entries (">").
        """
        await self._ensure_group()
        queue = self.keys.queue(self.worker_id)
        cursor = "0"
        while True:
            reply = await self.redis.xreadgroup(WORKER_GROUP, self.worker_id, {queue: cursor}, count=PENDING_PAGE)
            entries = reply[0][1] if reply else []
            if not entries:
                return
            await self._start_jobs(entries)
            cursor = entries[-1][0]

    async def _start_jobs(self, entries: list[tuple[str, dict[str, str] | None]]) -> None:
        parsed: list[tuple[str, Request]] = []
        gone: list[str] = []
        for entry_id, fields in entries:
            if entry_id in self._held:
                continue  # running here, or finished and waiting to be written (a pending list read again)
            if not fields:
                gone.append(entry_id)  # deleted: the dispatcher took the job back; nothing to run
                continue
            request = self._parse(entry_id, fields)
            if request is not None:
                parsed.append((entry_id, request))
        if gone:
            await self._ack_only(*gone)
        if not parsed:
            return
        pipe = self.redis.pipeline(transaction=False)
        now = time.time()
        for _, request in parsed:
            await self.scripts.start(pipe, request.id, self.worker_id, now)  # async scripts queue when awaited
        allowed = await pipe.execute()
        for (entry_id, request), ok in zip(parsed, allowed, strict=True):
            if ok == 1 and request.id in self.counters.in_flight:
                self._adopt(entry_id, request)
            elif ok == 1:
                self._start_copy(entry_id, request, now)
            else:  # cancelled while queued, finished elsewhere or taken back: start.lua freed its KV; drop it.
                await self._ack_only(entry_id)

    def _start_copy(self, entry_id: str, request: Request, now: float) -> None:
        self._held.add(entry_id)
        self._entry_of[request.id] = entry_id
        self.counters.in_flight[request.id] = asyncio.create_task(self._run_job(entry_id, request, now))

    def _adopt(self, entry_id: str, request: Request) -> None:
        """A job handed back here while its copy still runs (requeued in a stall): that copy answers the new entry.

        The old entry was deleted by the requeue; a second copy would run the job twice, here. A copy
        already being aborted (the job had gone to another worker) cannot: the job runs again once
        that copy ended.
        """
        self._held.add(entry_id)
        if request.id in self._superseded:
            self._rerun[request.id] = (entry_id, request)
            return
        old = self._entry_of.get(request.id)
        if old is not None:
            self._held.discard(old)
        self._entry_of[request.id] = entry_id
        log.info("job %s was handed back to worker %s while it still ran here; that copy goes on", request.id,
                 self.worker_id)

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

    async def _ack_only(self, *entry_ids: str) -> None:
        queue = self.keys.queue(self.worker_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(queue, WORKER_GROUP, *entry_ids)
        pipe.xdel(queue, *entry_ids)
        await pipe.execute()

    # --- running --------------------------------------------------------------------------------

    async def _run_job(self, entry_id: str, request: Request, started_at: float) -> None:
        out = EngineOutput()
        status, error, reason = JobStatus.completed, None, None
        if request.stream:
            self.tokens.begin(request.id)
        try:
            async for partial in self.engine.stream(to_engine_request(request)):
                out = partial
                if request.stream and self.tokens.add(request.id, partial):
                    self._has_pending.set()  # the next flush publishes it, with other jobs' deltas
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
            entry_id = self._entry_of.pop(request.id, entry_id)  # a newer entry, if the job was handed back
            self._slot_freed.set()
            end_run = self.tokens.close(request.id) if request.stream else None
        rerun = self._rerun.pop(request.id, None)
        if rerun is not None:  # aborted as superseded, and handed back meanwhile: nothing of this copy is written
            self._superseded.discard(request.id)
            self._held.discard(entry_id)
            self._start_copy(*rerun, time.time())
            return
        self._record(entry_id, request, started_at, out, status, error, reason, end_run)

    def _record(self, entry_id: str, request: Request, started_at: float, out: EngineOutput,
                status: JobStatus, error: str | None, reason: str | None, end_run: str | None = None) -> None:
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
        owner = None
        if request.id in self._superseded:
            self._superseded.discard(request.id)
            owner = self.worker_id  # it moved to another worker: that one's copy ends the job, not this one
            end_run = None  # and its token stream: the other copy's run restarts it there
        else:
            self.metrics.job_ended(self.worker_id, request, result, started_at)
        self._finish(entry_id, result, request.reply_to, completion, owner, end_run)

    # --- writing --------------------------------------------------------------------------------

    def _finish(self, entry_id: str, result: JobResult, reply_to: str | None, completion: Completion | None,
                owner: str | None = None, end_run: str | None = None) -> None:
        self._held.add(entry_id)
        self._pending.append(Finished(entry_id, result, reply_to, completion, owner, end_run))
        self._has_pending.set()

    async def _flush(self) -> None:
        """Write every finished job in one pipeline (terminal state, ack, completion, notice).

        Streaming jobs' deltas go first in the same pipeline (so a client that has the result has
        every delta before it), their end markers last. What is not written (Redis unreachable, a
        script refused) is kept for the next flush and the error raised; its queue entry stays
        pending meanwhile, so the job is answered late, never lost.
        """
        if not self._pending and not self.tokens.has_pending:
            return
        batch, self._pending = self._pending, []
        deltas = self.tokens.take()
        try:
            queue = self.keys.queue(self.worker_id)
            pipe = self.redis.pipeline(transaction=False)
            skip = self.tokens.queue_deltas(pipe, deltas)  # their replies are not checked: a lost delta
            for f in batch:  # leaves a gap, which the reader fills from the result
                await self.scripts.finish(pipe, f.result, f.reply_to, ack_stream=queue, ack_group=WORKER_GROUP,
                                          ack_entry=f.entry_id, completion=f.completion,
                                          job_ttl_s=self.settings.job_ttl_s, owner=f.owner)
            for f in batch:
                if f.end_run is not None:
                    self.tokens.queue_end(pipe, f.result.id, f.end_run, f.result.status.value)
            replies = (await pipe.execute(raise_on_error=False))[skip:skip + len(batch)]
        except BaseException:
            self._pending = batch + self._pending
            self.tokens.restore(deltas)
            self._has_pending.set()
            raise
        failed: list[tuple[Finished, Exception]] = []
        for f, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                failed.append((f, reply))
            else:
                self._held.discard(f.entry_id)  # written: its entry is acknowledged
        if failed:
            self._pending = [f for f, _ in failed] + self._pending
            self._has_pending.set()
            raise failed[0][1]
        self.outage.ok()

    async def _flush_loop(self) -> None:
        """Write finished jobs as they come, coalescing those that end within FLUSH_INTERVAL_S.

        A result that ends after a quiet spell is written at once (no added latency); under load,
        results that end within FLUSH_INTERVAL_S of the last write share the next pipeline.
        """
        last_flush = 0.0
        while not self._closing:
            await self._has_pending.wait()
            wait = FLUSH_INTERVAL_S - (time.monotonic() - last_flush)
            if wait > 0:
                await asyncio.sleep(wait)
            self._has_pending.clear()
            last_flush = time.monotonic()
            try:
                await self._flush()
            except redis.RedisError as exc:
                await asyncio.sleep(self.outage.failed(exc))  # they were put back: the next turn retries

    async def _cancel_loop(self) -> None:
        """Abort running copies that are not needed any more: their job ended, or is another worker's now.

        One pipeline per check reads each running job's status and worker. A job that ended
        (cancelled by its client, or finished by another copy) is aborted; so is one whose hash names
        another worker (requeued while this worker stalled, and handed there): that copy's end is
        not written as the job's. A job requeued from here and not handed out again keeps running:
        it may come back here, and if it ends here first its result stands.
        """
        while not self._closing:
            await asyncio.sleep(CANCEL_CHECK_INTERVAL_S)
            job_ids = list(self.counters.in_flight)
            if not job_ids:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for job_id in job_ids:
                    pipe.hmget(self.keys.job(job_id), [STATUS_FIELD, "worker"])
                states = await pipe.execute()
            except redis.RedisError as exc:
                await asyncio.sleep(self.outage.failed(exc))  # a cancel is noticed after the outage
                continue
            self.outage.ok()
            for job_id, (status, worker) in zip(job_ids, states, strict=True):
                if job_id not in self.counters.in_flight:
                    continue
                if status in TERMINAL:
                    await self.engine.abort(job_id)
                elif worker and worker != self.worker_id and job_id not in self._superseded:
                    log.warning("job %s was handed to worker %s while %s ran it (a stall past its heartbeat): "
                                "aborting this copy", job_id, worker, self.worker_id)
                    self._superseded.add(job_id)
                    await self.engine.abort(job_id)


async def serve(settings: WorkerSettings, engines: list[Engine], worker_ids: list[str | None],
                metrics: WorkerMetrics | None = None) -> None:
    """Run one or more workers in this process until SIGTERM/SIGINT, then drain them.

    Raises WorkerIdInUse when another live process owns one of the ids; the others leave first.
    """
    client = connect_async(settings)
    metrics = metrics or WorkerMetrics()  # one registry for the process: its series tell the workers apart
    daemons = [WorkerDaemon(settings, e, wid, client=client, metrics=metrics)
               for e, wid in zip(engines, worker_ids, strict=True)]

    def stop_all() -> None:
        for daemon in daemons:
            daemon.stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    try:
        started = await asyncio.gather(*(d.start() for d in daemons), return_exceptions=True)
        refused = [error for error in started if isinstance(error, BaseException)]
        if refused:
            await asyncio.gather(*(d.leave() for d in daemons))  # each releases only a claim of its own
            raise refused[0]
        await asyncio.gather(*(d.run() for d in daemons))
    finally:
        await client.aclose()
