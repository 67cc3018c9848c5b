"""Offline batches: an OpenAI Batch API input file in, its output file out, at tier ``batch``.

``run_batch`` streams the input lines into the intake with a bounded number in flight (and an
optional rate limit), appends each output line as soon as its result arrives, and records its
progress in the batch hash (``Keys.batch``). It is resumable: run it again with the same output
file and the lines already answered are skipped. It is cancellable: ``request_cancel`` sets a
flag the runner checks between submissions; it then cancels its in-flight jobs (left out of the
output, so running the batch again resumes them). It rides out a Redis outage: polls, cancel
checks and progress saves that fail are retried on the next quiet moment, submissions and cancels
are retried with the shared backoff for up to the client's ``client_retry_s``; progress lives in
the output file, so nothing answered is lost, and past that bound the batch stops ``interrupted``
and a rerun resumes it.

``enqueue_batch`` runs the same thing as an RQ job (JSON serializer, queue ``dio-batch``), which
an RQ worker started as ``rq worker dio-batch --worker-class dio.client.batch.BatchWorker
--serializer rq.serializers.JSONSerializer`` runs; progress is then also in the RQ job's
``meta["progress"]``. An RQ job names the function it runs, and anyone who can write to the queue
writes that name: ``BatchWorker`` (and ``SimpleBatchWorker``) runs only DIO's batch runner, refuses
(fails, without importing anything) any other function and any job with callbacks, and refuses to
start without the JSON serializer (RQ's default, pickle, runs whatever the bytes say).

Batch hash fields: batch_id, status (running | completed | stopped | cancelled | interrupted),
total, done (lines with a response), failed (lines with an error), in_flight, input, output,
started_at, updated_at (the runner's heartbeat), finished_at, cancel_requested.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError
from rq import Queue, SimpleWorker, Worker, get_current_job
from rq.job import Job
from rq.serializers import JSONSerializer, resolve_serializer

from dio.client.batch_output import OutputFile
from dio.client.client import TRANSIENT_ERRORS, Client, put_when_done, resolve_settings
from dio.client.exceptions import DIOError, JobNotFound
from dio.client.handle import JobHandle
from dio.client.jobs import build_request
from dio.client.openai_batch import (
    BatchLine,
    BatchLineError,
    error_record,
    iter_raw_lines,
    job_record_id,
    line_record_id,
    parse_line,
    result_record,
)
from dio.client.settings import BATCH_CONCURRENCY, BATCH_HASH_TTL_S, BATCH_JOB_TIMEOUT_S, MAX_BATCH_LINE_BYTES
from dio.protocol.models import JobResult, JobStatus, Request, Tier, describe_validation_error

log = logging.getLogger(__name__)

BATCH_QUEUE = "dio-batch"  # the RQ queue of batch runner jobs
SUBMIT_GROUP = 64  # lines submitted per round trip
RATE_GROUP_S = 0.1  # under a rate limit, a round trip submits this many seconds' worth of lines
PROGRESS_SAVE_INTERVAL_S = 0.25  # the batch hash is rewritten at most this often
META_SAVE_INTERVAL_S = 1.0  # the RQ job's meta is rewritten at most this often
BATCH_STALE_S = 30.0  # a "running" batch whose heartbeat is older than this has no live runner

ProgressCallback = Callable[["BatchProgress"], None]


class BatchBusy(DIOError):
    """Another runner is working on this batch (its heartbeat is recent)."""


@dataclass
class BatchProgress:
    """Where a batch stands; ``done + failed == total`` once it completed."""

    batch_id: str
    total: int = 0
    done: int = 0
    failed: int = 0
    in_flight: int = 0
    status: str = "running"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_batch_id(output_path: str | Path) -> str:
    """Derive a batch id from the output file, so that a rerun finds the same batch hash."""
    digest = hashlib.sha256(str(Path(output_path).resolve()).encode()).hexdigest()
    return f"batch_{digest[:16]}"


def count_lines(input_path: str | Path, max_line_bytes: int = MAX_BATCH_LINE_BYTES) -> int:
    """Count the non-blank lines of an input file (each becomes one output line)."""
    return sum(1 for _ in iter_raw_lines(input_path, max_line_bytes))


# --- the batch hash -----------------------------------------------------------------------------


def get_progress(client: Client, batch_id: str) -> dict[str, str] | None:
    """Read a batch's hash (None when there is no such batch)."""
    return client.redis.hgetall(client.keys.batch(batch_id)) or None


def request_cancel(client: Client, batch_id: str) -> None:
    """Ask the runner of a batch to stop; a batch not started yet stops as soon as it starts."""
    client.redis.hset(client.keys.batch(batch_id), "cancel_requested", "1")


def claim_batch(client: Client, batch_id: str, fields: dict[str, Any]) -> None:
    """Mark a batch running, unless a live runner holds it (raise BatchBusy); retried through a Redis outage.

    A retry that finds the batch claimed with this claim's ``started_at`` (the earlier try's reply
    was lost) has claimed it.
    """
    client._retrying("claim batch", lambda attempt: _claim(client, batch_id, fields, attempt))


def _claim(client: Client, batch_id: str, fields: dict[str, Any], attempt: int) -> None:
    key = client.keys.batch(batch_id)
    with client.redis.pipeline() as pipe:
        try:
            pipe.watch(key)
            status, heartbeat, started = pipe.hmget(key, ["status", "updated_at", "started_at"])
            if attempt > 1 and status == "running" and started is not None and started == fields.get("started_at"):
                return
            if status == "running" and heartbeat and time.time() - float(heartbeat) < BATCH_STALE_S:
                raise BatchBusy(f"batch {batch_id} is being run by another runner")
            pipe.multi()
            pipe.hset(key, mapping=fields)
            pipe.hdel(key, "finished_at")
            pipe.persist(key)
            pipe.execute()
        except redis.WatchError:
            raise BatchBusy(f"batch {batch_id} was claimed by another runner") from None


# --- the runner ---------------------------------------------------------------------------------


def group_for_rate(rate_limit: float | None) -> int:
    """Lines per submission under a rate limit: about RATE_GROUP_S worth, so pacing stays smooth."""
    return SUBMIT_GROUP if not rate_limit else max(1, int(rate_limit * RATE_GROUP_S))


class BatchRunner:
    """Submit one batch's lines, keep at most ``concurrency`` in flight, write each result."""

    def __init__(self, client: Client, batch_id: str, output: OutputFile, progress: BatchProgress, *,
                 concurrency: int, rate_limit: float | None, progress_cb: ProgressCallback | None,
                 max_line_bytes: int) -> None:
        self.client = client
        self.batch_id = batch_id
        self.output = output
        self.progress = progress
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self.progress_cb = progress_cb
        self.max_line_bytes = max_line_bytes
        self.group_size = min(SUBMIT_GROUP, concurrency, group_for_rate(rate_limit))
        self.cancelled = False
        self._group: list[tuple[BatchLine, Request]] = []
        self._in_flight: dict[str, tuple[BatchLine, Request, JobHandle]] = {}
        self._finished: queue.SimpleQueue[JobHandle] = queue.SimpleQueue()
        self._seen: set[str] = set()
        self._next_slot = time.monotonic()
        self._last_save = 0.0

    def run(self, lines: Iterable[tuple[int, bytes | None]], limit: int | None = None) -> None:
        """Process ``lines``, at most ``limit`` new ones; return when all are answered or cancelled."""
        self.cancelled = self._cancel_requested()
        handled = 0
        for line_no, raw in lines:
            if self.cancelled or (limit is not None and handled >= limit):
                break
            handled += self._take(line_no, raw)
            if len(self._group) >= self.group_size:
                self._submit_group()
        if not self.cancelled:
            self._submit_group()
        while self._in_flight and not self.cancelled:
            self._collect(self.client.settings.poll_interval_s)
        if self.cancelled:
            self.cancel_in_flight()

    def _take(self, line_no: int, raw: bytes | None) -> bool:
        """Queue one line for submission, or answer it with an error; False if already answered."""
        if self.output.has_line(line_no):
            return False
        try:
            line = parse_line(line_no, raw, self.max_line_bytes)
        except BatchLineError as exc:
            self._write(error_record(line_record_id(line_no), exc.custom_id, exc.code, exc.message))
            return True
        if line.custom_id in self._seen:
            self._write(error_record(line_record_id(line_no), line.custom_id, "duplicate_custom_id",
                                     f"line {line_no}: custom_id {line.custom_id!r} appeared on an earlier line"))
            return True
        self._seen.add(line.custom_id)
        if self.output.has_custom_id(line.custom_id):
            return False
        try:
            request = self._request(line)
        except ValidationError as exc:
            self._write(error_record(line_record_id(line_no), line.custom_id, "invalid_request",
                                     f"line {line_no}: {describe_validation_error(exc)}"))
            return True
        self._group.append((line, request))
        return True

    def _request(self, line: BatchLine) -> Request:
        metadata = {"custom_id": line.custom_id, "batch_id": self.batch_id}
        data = {**line.fields, "tier": Tier.batch, "metadata": metadata}
        return build_request(self.client.settings, self.client.client_id, data)

    def _submit_group(self) -> None:
        """Submit the queued lines once there is room (and the rate limit allows)."""
        if not self._group:
            return
        while len(self._in_flight) + len(self._group) > self.concurrency and not self.cancelled:
            self._collect(self.client.settings.poll_interval_s)
        self._pace(len(self._group))
        self.cancelled = self.cancelled or self._cancel_requested()
        if self.cancelled:
            return
        handles = self.client.submit_many([req for _line, req in self._group])
        for (line, req), handle in zip(self._group, handles, strict=True):
            self._in_flight[handle.id] = (line, req, handle)
            put_when_done(handle, self._finished)
        self._group.clear()
        self.progress.in_flight = len(self._in_flight)

    def _pace(self, count: int) -> None:
        """Hold ``count`` submissions back to ``rate_limit`` per second, writing results meanwhile."""
        if not self.rate_limit:
            return
        while (wait := self._next_slot - time.monotonic()) > 0:
            self._collect(wait)
        self._next_slot = max(self._next_slot, time.monotonic()) + count / self.rate_limit

    def _collect(self, timeout: float) -> None:
        """Write every finished job; when none finishes within ``timeout``, poll and heartbeat."""
        try:
            handle = self._finished.get(timeout=max(0.0, timeout))
        except queue.Empty:
            self._tick()
            return
        while True:
            self._write_result(handle)
            try:
                handle = self._finished.get_nowait()
            except queue.Empty:
                return

    def _tick(self) -> None:
        """A quiet moment: look for lost notices, check for a cancel request, save progress.

        Through a Redis outage each is skipped until a later tick (the jobs and their notices wait
        in Redis; the progress is in the output file).
        """
        try:
            if self._in_flight:
                self.client.poll([h for _line, _req, h in self._in_flight.values()])
            self.cancelled = self.cancelled or self.client.redis.hget(
                self.client.keys.batch(self.batch_id), "cancel_requested") == "1"
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        self.client.outage.ok()
        self.save()

    def _write_result(self, handle: JobHandle) -> None:
        entry = self._in_flight.pop(handle.id, None)
        if entry is None:
            return
        line, request, _handle = entry
        self.progress.in_flight = len(self._in_flight)
        try:
            result: JobResult = handle.future.result()
        except JobNotFound as exc:
            self._write(error_record(job_record_id(handle.id), line.custom_id, "not_found", str(exc)))
            return
        if result.status is JobStatus.cancelled and self.cancelled:
            return  # cancelled by this batch: left out, so a rerun submits it again
        self._write(result_record(line, request, result))

    def _write(self, record: dict[str, Any]) -> None:
        self.output.write(record)
        if record["response"] is not None:
            self.progress.done += 1
        else:
            self.progress.failed += 1
        if self.progress_cb is not None:
            self.progress_cb(self.progress)
        if time.monotonic() - self._last_save >= PROGRESS_SAVE_INTERVAL_S:
            self.save()

    def cancel_in_flight(self) -> None:
        """Cancel every job still in flight; write those that ended before the cancel landed."""
        self.cancelled = True
        for _line, _req, handle in list(self._in_flight.values()):
            handle.cancel()
        while self._in_flight:
            self._collect(self.client.settings.poll_interval_s)

    def _cancel_requested(self) -> bool:
        key = self.client.keys.batch(self.batch_id)
        flag = self.client._retrying("batch cancel check", lambda _: self.client.redis.hget(key, "cancel_requested"))
        return flag == "1"

    def save(self, *, retry: bool = False, **extra: Any) -> None:
        """Write the progress (and the runner's heartbeat) to the batch hash.

        Skipped through a Redis outage (the next save writes it all), unless ``retry``: then
        retried like a submission.
        """
        fields = {**self.progress.as_dict(), "updated_at": repr(time.time()), **extra}
        key = self.client.keys.batch(self.batch_id)
        try:
            if retry:
                self.client._retrying("save batch progress", lambda _: self.client.redis.hset(key, mapping=fields))
            else:
                self.client.redis.hset(key, mapping=fields)
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        self._last_save = time.monotonic()


# --- entry points -------------------------------------------------------------------------------


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    client: Client,
    *,
    rate_limit: float | None = None,
    concurrency: int = BATCH_CONCURRENCY,
    progress_cb: ProgressCallback | None = None,
    batch_id: str | None = None,
    limit: int | None = None,
    max_line_bytes: int = MAX_BATCH_LINE_BYTES,
) -> BatchProgress:
    """Run (or resume) one batch to completion and return its final progress.

    Args:
        rate_limit: most requests submitted per second (None: no limit beyond ``concurrency``).
        concurrency: most requests in flight at once.
        progress_cb: called after every output line, and once more with the final status.
        batch_id: the batch hash's id; by default derived from ``output_path``.
        limit: handle at most this many new lines, then stop (status ``stopped``).

    Raises BatchBusy when another live runner holds the batch. On any other exception the
    in-flight jobs are cancelled (status ``interrupted``) and the exception propagates; running
    the batch again resumes it.
    """
    batch_id = batch_id or default_batch_id(output_path)
    output = OutputFile(output_path)
    progress = BatchProgress(batch_id, total=count_lines(input_path, max_line_bytes), done=output.done,
                             failed=output.failed)
    try:
        claim_batch(client, batch_id, {**progress.as_dict(), "input": str(input_path),
                                       "output": str(output_path), "started_at": repr(time.time()),
                                       "updated_at": repr(time.time())})
    except BaseException:
        output.close()
        raise
    runner = BatchRunner(client, batch_id, output, progress, concurrency=concurrency, rate_limit=rate_limit,
                         progress_cb=progress_cb, max_line_bytes=max_line_bytes)
    try:
        runner.run(iter_raw_lines(input_path, max_line_bytes), limit)
        progress.status = final_status(runner, progress)
    except BaseException:
        progress.status = "interrupted"
        _abandon(runner)
        raise
    finally:
        output.close()
        _finish(client, runner, progress)
    return progress


def final_status(runner: BatchRunner, progress: BatchProgress) -> str:
    if runner.cancelled:
        return "cancelled"
    return "completed" if progress.done + progress.failed >= progress.total else "stopped"


def _abandon(runner: BatchRunner) -> None:
    """Cancel an interrupted runner's in-flight jobs; a rerun submits them again."""
    runner.progress_cb = None  # it may be what raised
    try:
        runner.cancel_in_flight()
    except (redis.RedisError, OSError, DIOError) as exc:
        log.warning("batch %s: could not cancel in-flight jobs: %s", runner.batch_id, exc)


def _finish(client: Client, runner: BatchRunner, progress: BatchProgress) -> None:
    """Record the final state; a cancel request is consumed so that a rerun resumes the batch."""
    progress.in_flight = 0
    key = client.keys.batch(runner.batch_id)

    def record(_: int) -> None:
        pipe = client.redis.pipeline(transaction=False)
        if runner.cancelled:
            pipe.hdel(key, "cancel_requested")
        pipe.expire(key, BATCH_HASH_TTL_S)
        pipe.execute()

    try:
        runner.save(retry=True, finished_at=repr(time.time()))
        client._retrying("record batch end", record)
    except (redis.RedisError, DIOError) as exc:
        log.warning("batch %s: could not record its final state: %s", runner.batch_id, exc)
    if runner.progress_cb is not None and progress.status != "interrupted":
        runner.progress_cb(progress)


# --- RQ -----------------------------------------------------------------------------------------


class MetaReporter:
    """A progress callback that copies progress into the current RQ job's meta (throttled)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self._last_save = 0.0

    def __call__(self, progress: BatchProgress) -> None:
        now = time.monotonic()
        if progress.status == "running" and now - self._last_save < META_SAVE_INTERVAL_S:
            return
        self.job.meta["progress"] = progress.as_dict()
        try:
            self.job.save_meta()
        except TRANSIENT_ERRORS as exc:  # RQ's Redis is away: saved on a later call
            log.debug("batch progress not saved to the RQ job: %s", exc)
            return
        self._last_save = now


def rq_run_batch(input_path: str, output_path: str, batch_id: str, *, rate_limit: float | None = None,
                 concurrency: int = BATCH_CONCURRENCY, redis_url: str | None = None,
                 key_prefix: str | None = None) -> dict[str, Any]:
    """The RQ job: run one batch with a Client built from the worker's DIO_* environment."""
    job = get_current_job()
    settings = resolve_settings(None, redis_url, key_prefix)
    with Client(settings) as client:
        progress = run_batch(input_path, output_path, client, rate_limit=rate_limit, concurrency=concurrency,
                             batch_id=batch_id, progress_cb=MetaReporter(job) if job else None)
    return progress.as_dict()


def enqueue_batch(
    redis_conn: redis.Redis,
    input_path: str | Path,
    output_path: str | Path,
    *,
    batch_id: str | None = None,
    queue_name: str = BATCH_QUEUE,
    rate_limit: float | None = None,
    concurrency: int = BATCH_CONCURRENCY,
    redis_url: str | None = None,
    key_prefix: str | None = None,
    job_timeout: int = BATCH_JOB_TIMEOUT_S,
) -> Job:
    """Enqueue a batch as an RQ job (JSON serializer) and return the job.

    Args:
        redis_conn: RQ's connection (``decode_responses`` off, as RQ requires).
        input_path, output_path: paths as the RQ worker's machine sees them.
        redis_url, key_prefix: where the runner finds DIO; None uses the worker's DIO_*
            environment. A URL given here is stored in the RQ job, so keep passwords in the
            worker's environment instead.
    """
    batch_id = batch_id or default_batch_id(output_path)
    rq_queue = Queue(queue_name, connection=redis_conn, serializer=JSONSerializer)
    kwargs = {"input_path": str(input_path), "output_path": str(output_path), "batch_id": batch_id,
              "rate_limit": rate_limit, "concurrency": concurrency, "redis_url": redis_url,
              "key_prefix": key_prefix}
    return rq_queue.enqueue(rq_run_batch, kwargs=kwargs, job_timeout=job_timeout, result_ttl=BATCH_HASH_TTL_S,
                            description=f"DIO batch {batch_id}", meta={"batch_id": batch_id})


BATCH_FUNCTION = f"{rq_run_batch.__module__}.{rq_run_batch.__qualname__}"  # the one function a batch job runs


class RefusedJob(Exception):
    """An RQ job on the batch queue that is not DIO's batch runner: failed without running anything."""


class BatchJob(Job):
    """An RQ job that runs DIO's batch runner and nothing else.

    Any other function name, an instance method, or a callback (RQ imports callbacks by name too)
    fails the job with ``RefusedJob`` before anything is imported. Callbacks are never run, even
    on that failure.
    """

    def perform(self) -> Any:
        why = self.refusal()
        if why is not None:
            raise RefusedJob(f"refused: {why}; a DIO batch worker runs only {BATCH_FUNCTION}")
        return super().perform()

    def refusal(self) -> str | None:
        """Why this job may not run here (None: it is DIO's batch runner, plainly called)."""
        if self.func_name != BATCH_FUNCTION:
            return f"job {self.id} names the function {self.func_name!r}"
        if self.instance is not None:
            return f"job {self.id} calls its function on an instance"
        names = [getattr(self, f"_{kind}_callback_name", None) for kind in ("success", "failure", "stopped")]
        if any(names):
            return f"job {self.id} has callbacks ({', '.join(n for n in names if n)})"
        return None

    @property
    def success_callback(self) -> None:
        return None

    @property
    def failure_callback(self) -> None:
        return None

    @property
    def stopped_callback(self) -> None:
        return None


def batch_job_class(serializer: Any, job_class: Any = None) -> type[BatchJob]:
    """Check an RQ batch worker's arguments: the JSON serializer, and jobs run as ``BatchJob``s (else ValueError)."""
    resolved = resolve_serializer(serializer)
    is_json = isinstance(resolved, type) and issubclass(resolved, JSONSerializer)
    if not (is_json or isinstance(resolved, JSONSerializer)):
        raise ValueError("a DIO batch worker needs the JSON serializer (--serializer "
                         "rq.serializers.JSONSerializer): RQ's default, pickle, runs what a queue writer stored")
    if job_class in (None, Job, "rq.job.Job"):
        return BatchJob  # RQ's default job class (what its command line passes unless told otherwise)
    if not (isinstance(job_class, type) and issubclass(job_class, BatchJob)):
        raise ValueError(f"a DIO batch worker runs its jobs as {BatchJob.__qualname__}, not {job_class!r}")
    return job_class


class BatchWorker(Worker):
    """RQ's forking worker, restricted to DIO's batch runner (``--worker-class dio.client.batch.BatchWorker``)."""

    def __init__(self, queues: Any, *, serializer: Any = None, job_class: Any = None, **kwargs: Any) -> None:
        super().__init__(queues, serializer=serializer, job_class=batch_job_class(serializer, job_class), **kwargs)


class SimpleBatchWorker(SimpleWorker):
    """RQ's in-process worker, restricted to DIO's batch runner."""

    def __init__(self, queues: Any, *, serializer: Any = None, job_class: Any = None, **kwargs: Any) -> None:
        super().__init__(queues, serializer=serializer, job_class=batch_job_class(serializer, job_class), **kwargs)
