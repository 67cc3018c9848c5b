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
import math
import os
import queue
import socket
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

from dio.client.batch_lease import RENEW_INTERVAL_S, BatchBusy, BatchLease, Holder, LeaseLost
from dio.client.batch_output import AnswerIndex, OutputFile
from dio.client.batch_pacing import MIN_IN_FLIGHT, PACE_INTERVAL_S, OtherArrivals, Pacer
from dio.client.client import TRANSIENT_ERRORS, Client, put_when_done, resolve_settings
from dio.client.exceptions import DIOError, JobNotFound, RedisUnavailable
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
from dio.client.pools import ClientPools
from dio.client.settings import BATCH_CONCURRENCY, BATCH_HASH_TTL_S, BATCH_JOB_TIMEOUT_S, MAX_BATCH_LINE_BYTES
from dio.protocol.batches import RUNNER_FIELD
from dio.protocol.keys import pool_keys
from dio.protocol.models import JobResult, JobStatus, Request, Tier, describe_validation_error
from dio.protocol.served_models import ServedModel, read_served_in

log = logging.getLogger(__name__)

BATCH_QUEUE = "dio-batch"  # the RQ queue of batch runner jobs
SUBMIT_GROUP = 64  # lines submitted per round trip
RATE_GROUP_S = 0.1  # under a rate limit, a round trip submits this many seconds' worth of lines
PROGRESS_SAVE_INTERVAL_S = 0.25  # the batch hash is rewritten at most this often
META_SAVE_INTERVAL_S = 1.0  # the RQ job's meta is rewritten at most this often
TEMPLATES_TTL_S = 30.0  # the served models' chat templates are re-read this often

ProgressCallback = Callable[["BatchProgress"], None]


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
    return client.redis.hgetall(client.base_keys.batch(batch_id)) or None


def request_cancel(client: Client, batch_id: str) -> None:
    """Ask the runner of a batch to stop; a batch not started yet stops as soon as it starts."""
    client.redis.hset(client.base_keys.batch(batch_id), "cancel_requested", "1")


def runner_lease(client: Client, runner: str | None = None) -> BatchLease:
    """A lease holder for this process (by default named after its host and pid)."""
    return BatchLease(client.redis, Holder.me(runner or f"run_batch-{socket.gethostname()}-{os.getpid()}"))


def claim_batch(client: Client, batch_id: str, fields: dict[str, Any], *, lease: BatchLease | None = None,
                force: bool = False) -> BatchLease:
    """Take the batch's lease and mark it running; return the lease (renewed by the runner).

    Raises BatchBusy, naming the holder, when a live runner holds it; a holder known to be gone
    (its process on this host has exited) is taken over at once, and ``force`` takes it over from
    anyone. Retried through a Redis outage.
    """
    lease = lease or runner_lease(client)
    key = client.base_keys.batch(batch_id)
    try:
        taken_from = client._retrying("claim batch", lambda _: lease.acquire(client.base_keys.batch_lease(batch_id),
                                                                              force=force))
    except BatchBusy as exc:
        raise BatchBusy(f"batch {batch_id} is {exc}") from None
    if taken_from is not None:
        log.warning("batch %s: took its lease over from %s", batch_id, taken_from.describe())

    def write(_: int) -> None:
        pipe = client.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={**fields, RUNNER_FIELD: lease.holder.runner})
        pipe.hdel(key, "finished_at")
        pipe.persist(key)
        pipe.execute()

    client._retrying("claim batch", write)
    return lease


# --- the runner ---------------------------------------------------------------------------------


class ServedTemplates:
    """Each model's chat template as its live workers registered it (re-read every TEMPLATES_TTL_S).

    A model no live worker serves, or whose workers registered none, renders with the fallback;
    through a Redis outage the last answer read is kept.
    """

    def __init__(self, client: Client, pools: ClientPools, ttl_s: float = TEMPLATES_TTL_S) -> None:
        self.client = client
        self.pools = pools
        self.ttl_s = ttl_s
        self._models: dict[str, ServedModel] = {}
        self._read_at = -math.inf

    def __call__(self, model: str | None) -> tuple[str | None, str | None]:
        if time.monotonic() - self._read_at >= self.ttl_s:
            try:
                self._models = read_served_in(self.client.redis, self.client.base_keys, self.pools.registered())
            except TRANSIENT_ERRORS as exc:
                self.client.outage.failed(exc)
            self._read_at = time.monotonic()
        served = self._models.get(model or self.client.settings.model)
        return (served.chat_template, served.eos_token) if served is not None else (None, None)


def group_for_rate(rate_limit: float | None) -> int:
    """Lines per submission under a rate limit: about RATE_GROUP_S worth, so pacing stays smooth."""
    return SUBMIT_GROUP if not rate_limit else max(1, int(rate_limit * RATE_GROUP_S))


class BatchRunner:
    """Submit one batch's lines, keep at most ``concurrency`` in flight, write each result."""

    def __init__(self, client: Client, batch_id: str, output: AnswerIndex, progress: BatchProgress, *,
                 concurrency: int, rate_limit: float | None, progress_cb: ProgressCallback | None,
                 max_line_bytes: int, lease: BatchLease | None = None, adaptive: bool = True,
                 min_in_flight: int = MIN_IN_FLIGHT, pools: ClientPools | None = None) -> None:
        self.client = client  # the batch's own keys (base_keys); its jobs go through their pools' clients
        # Not sharded by model, the one client for every line (nothing is made, nothing to close).
        self.pools = pools if pools is not None else ClientPools(client=client)
        self.lease = lease
        self.lease_check = True  # off once the batch ended (its final save must not raise)
        self.chat_templates = ServedTemplates(client, self.pools)
        self.pacer = Pacer(concurrency, min_in_flight, adaptive)
        self.arrivals = OtherArrivals()
        self._last_pace = -math.inf
        self._preempted: set[str] = set()  # jobs the pacing cancelled: their lines go again, later
        self._requeued: list[tuple[BatchLine, Request]] = []
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
        self._last_tick = time.monotonic()
        self._last_renew = time.monotonic()

    def run(self, lines: Iterable[tuple[int, bytes | None]], limit: int | None = None) -> None:
        """Process ``lines``, at most ``limit`` new ones; return when all are answered or cancelled."""
        self.cancelled = self._cancel_requested()
        handled = 0
        for line_no, raw in lines:
            if self.cancelled or (limit is not None and handled >= limit):
                break
            self._take_requeued()
            handled += self._take(line_no, raw)
            if len(self._group) >= self.group_size:
                self._submit_group()
        if not self.cancelled:
            self._submit_group()
        while (self._in_flight or self._requeued) and not self.cancelled:
            if self._take_requeued():
                self._submit_group()
            else:
                self._collect(self.client.settings.poll_interval_s)
        if self.cancelled:
            self.cancel_in_flight()

    def _take_requeued(self) -> bool:
        """Queue the lines whose jobs the pacing cancelled for submission again; False when there are none."""
        if not self._requeued:
            return False
        self._group.extend(self._requeued)
        self._requeued.clear()
        return True

    def _take(self, line_no: int, raw: bytes | None) -> bool:
        """Queue one line for submission, or answer it with an error; False if already answered."""
        if self.output.has_line(line_no):
            return False
        try:
            line = parse_line(line_no, raw, self.max_line_bytes, self.chat_templates)
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
        model = self._model(line)
        if not self.client._retrying("read the pool registry", lambda _: self.pools.serves(model)):
            self._write(error_record(line_record_id(line_no), line.custom_id, "model_not_found",
                                     f"line {line_no}: no DIO worker pool serves the model {model!r}"))
            return True
        try:
            request = self._request(line)
        except ValidationError as exc:
            self._write(error_record(line_record_id(line_no), line.custom_id, "invalid_request",
                                     f"line {line_no}: {describe_validation_error(exc)}"))
            return True
        self._group.append((line, request))
        return True

    def _model(self, line: BatchLine) -> str:
        return str(line.fields.get("model") or self.client.settings.model)

    def _client_for(self, line: BatchLine) -> Client:
        """The client of the line's pool (not sharded: the one client): its job's reply comes to it."""
        return self.pools.for_model(self._model(line))

    def _request(self, line: BatchLine) -> Request:
        metadata = {"custom_id": line.custom_id, "batch_id": self.batch_id}
        data = {**line.fields, "tier": Tier.batch, "metadata": metadata}
        client = self._client_for(line)
        return build_request(client.settings, client.client_id, data)

    def _submit_group(self) -> None:
        """Submit the queued lines once there is room (and the rate limit allows)."""
        while self._group and not self.cancelled:
            room = self.pacer.limit - len(self._in_flight)
            if room <= 0:
                self._collect(min(self.client.settings.poll_interval_s, PACE_INTERVAL_S))
                continue
            part, rest = self._group[:room], self._group[room:]
            self._pace(len(part))
            self.cancelled = self.cancelled or self._cancel_requested()
            if self.cancelled:
                return
            self.before_submit(part)
            handles = self.pools.submit_many([req for _line, req in part])  # each through its pool's client
            self._count_submitted(len(part))
            for (line, req), handle in zip(part, handles, strict=True):
                self._in_flight[handle.id] = (line, req, handle)
                put_when_done(handle, self._finished)
            self._group = rest
            self.progress.in_flight = len(self._in_flight)

    def _count_submitted(self, count: int) -> None:
        """Add submissions to every runner's counter, so that pacing tells them from interactive arrivals."""
        try:
            self.client.redis.incrby(self.client.base_keys.batch_submitted, count)
        except TRANSIENT_ERRORS as exc:  # other runners then count these as interactive for one read
            self.client.outage.failed(exc)

    def before_submit(self, group: list[tuple[BatchLine, Request]]) -> None:
        """Record the jobs about to be submitted in the batch's in-flight hash (a successor cancels them)."""
        mapping = {req.id: line.custom_id for line, req in group}
        key = self.client.base_keys.batch_inflight(self.batch_id)
        self.client._retrying("record jobs in flight", lambda _: self.client.redis.hset(key, mapping=mapping))

    def _pace(self, count: int) -> None:
        """Hold ``count`` submissions back to ``rate_limit`` per second, writing results meanwhile."""
        if not self.rate_limit:
            return
        while (wait := self._next_slot - time.monotonic()) > 0:
            self._collect(wait)
        self._next_slot = max(self._next_slot, time.monotonic()) + count / self.rate_limit

    def _collect(self, timeout: float) -> None:
        """Write every finished job; poll and heartbeat when none finishes within ``timeout``, and
        at least every ``poll_interval_s`` while jobs keep finishing (so a cancel is seen in time)."""
        try:
            handle = self._finished.get(timeout=max(0.0, timeout))
        except queue.Empty:
            self._tick()
            self._adapt()
            return
        while True:
            self._write_result(handle)
            try:
                handle = self._finished.get_nowait()
            except queue.Empty:
                break
        if time.monotonic() - self._last_tick >= self.client.settings.poll_interval_s:
            self._tick()
        self._adapt()

    def _adapt(self) -> None:
        """Every PACE_INTERVAL_S, set the in-flight limit from the other work arriving (``dio.client.batch_pacing``).

        Through a Redis outage the limit stays as it is.
        """
        if not self.pacer.adaptive or time.monotonic() - self._last_pace < PACE_INTERVAL_S:
            return
        self._last_pace = time.monotonic()
        try:
            pools = self.pools.registered()
            intakes = None if pools is None else [pool_keys(self.client.base_keys, m).intake for m in pools]
            others = self.arrivals.read(self.client.redis, self.client.base_keys, intakes)
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        limit = self.pacer.update(others)
        if len(self._in_flight) > limit:
            self._preempt(len(self._in_flight) - limit)

    def _preempt(self, count: int) -> None:
        """Cancel the ``count`` newest jobs in flight (least done): other work came; their lines go again later.

        A job that ended before its cancel landed keeps its result. Through a Redis outage the rest
        stay in flight.
        """
        newest = list(self._in_flight)[-count:]
        try:
            for job_id in reversed(newest):
                if self._in_flight[job_id][2].cancel():  # through the client of its pool
                    self._preempted.add(job_id)
        except (RedisUnavailable, redis.ConnectionError, redis.TimeoutError) as exc:
            log.warning("batch %s: could not hold jobs back (%s); they keep running", self.batch_id, exc)

    def after_preempt(self, job_id: str) -> None:
        """Called for each job the pacing cancelled, before its line is queued again (a hook for subclasses)."""

    def _tick(self) -> None:
        """A quiet moment: look for lost notices, check for a cancel request, save progress.

        Through a Redis outage each is skipped until a later tick (the jobs and their notices wait
        in Redis; the progress is in the output file).
        """
        self._last_tick = time.monotonic()
        try:
            if self._in_flight:
                self._poll([h for _line, _req, h in self._in_flight.values()])
            self.cancelled = self.cancelled or self.client.redis.hget(
                self.client.base_keys.batch(self.batch_id), "cancel_requested") == "1"
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        self.client.outage.ok()
        self.save()

    def _poll(self, handles: list[JobHandle]) -> None:
        """Poll each handle's job through the client that submitted it (its pool's)."""
        by_client: dict[int, list[JobHandle]] = {}
        for handle in handles:
            by_client.setdefault(id(handle.client), []).append(handle)
        for group in by_client.values():
            group[0].client.poll(group)

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
        if handle.id in self._preempted:
            self._preempted.discard(handle.id)
            self.after_preempt(handle.id)
            self._requeued.append((line, self._request(line)))  # a new job (ids are never reused)
            return
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
        key = self.client.base_keys.batch(self.batch_id)
        flag = self.client._retrying("batch cancel check", lambda _: self.client.redis.hget(key, "cancel_requested"))
        return flag == "1"

    def renew_lease(self) -> None:
        """Renew the batch's lease (about every RENEW_INTERVAL_S); raise LeaseLost when another runner took it.

        Through a Redis outage the renewal waits for a later save; a lease that ran out meanwhile
        is lost (another runner may have taken the batch over).
        """
        if self.lease is None or not self.lease_check or time.monotonic() - self._last_renew < RENEW_INTERVAL_S:
            return
        try:
            held = self.lease.renew(self.client.base_keys.batch_lease(self.batch_id))
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        if not held:
            raise LeaseLost(f"batch {self.batch_id}: this runner's lease ran out or was taken over")
        self._last_renew = time.monotonic()

    def save(self, *, retry: bool = False, **extra: Any) -> None:
        """Write the progress (and the runner's heartbeat) to the batch hash.

        Skipped through a Redis outage (the next save writes it all), unless ``retry``: then
        retried like a submission.
        """
        self.renew_lease()
        fields = {**self.progress.as_dict(), "updated_at": repr(time.time()), **extra}
        key = self.client.base_keys.batch(self.batch_id)
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
    force: bool = False,
    adaptive: bool = True,
    min_in_flight: int = MIN_IN_FLIGHT,
) -> BatchProgress:
    """Run (or resume) one batch to completion and return its final progress.

    Args:
        rate_limit: most requests submitted per second (None: no limit beyond ``concurrency``).
        concurrency: most requests in flight at once.
        progress_cb: called after every output line, and once more with the final status.
        batch_id: the batch hash's id; by default derived from ``output_path``.
        limit: handle at most this many new lines, then stop (status ``stopped``).
        force: take the batch over from the runner holding it, even if it looks alive.
        adaptive: keep only ``min_in_flight`` requests in flight while the workers run other work,
            up to ``concurrency`` while they are idle (``dio.client.batch_pacing``); False: always
            ``concurrency``.

    Raises BatchBusy, naming the holder, when another live runner holds the batch (a runner of
    this host that exited is taken over at once). On any other exception the
    in-flight jobs are cancelled (status ``interrupted``) and the exception propagates; running
    the batch again resumes it.
    """
    batch_id = batch_id or default_batch_id(output_path)
    output = OutputFile(output_path)
    progress = BatchProgress(batch_id, total=count_lines(input_path, max_line_bytes), done=output.done,
                             failed=output.failed)
    try:
        lease = claim_batch(client, batch_id, {**progress.as_dict(), "input": str(input_path),
                                               "output": str(output_path), "started_at": repr(time.time()),
                                               "updated_at": repr(time.time())}, force=force)
    except BaseException:
        output.close()
        raise
    pools = ClientPools(client=client)  # sharded by model: a client per pool the lines name, closed at the end
    runner = BatchRunner(client, batch_id, output, progress, concurrency=concurrency, rate_limit=rate_limit,
                         progress_cb=progress_cb, max_line_bytes=max_line_bytes, lease=lease, adaptive=adaptive,
                         min_in_flight=min_in_flight, pools=pools)
    try:
        cancel_orphans(client, batch_id, pools)
        runner.run(iter_raw_lines(input_path, max_line_bytes), limit)
        progress.status = final_status(runner, progress)
    except BaseException:
        progress.status = "interrupted"
        _abandon(runner)
        raise
    finally:
        output.close()
        _finish(client, runner, progress)
        pools.close()
    return progress


def cancel_orphans(client: Client, batch_id: str, pools: ClientPools | None = None) -> int:
    """Cancel the jobs an earlier run of this batch left in flight (it was killed); return how many.

    Their lines have no output yet, so this run submits them again; a job that had ended is left
    as it is (its line goes again too: the output file is what counts). Sharded by model, each job
    is cancelled in the pool that holds it (``pools.find``).
    """
    pools = pools if pools is not None else ClientPools(client=client)
    key = client.base_keys.batch_inflight(batch_id)
    job_ids = client._retrying("read jobs in flight", lambda _: client.redis.hkeys(key))
    cancelled = sum(1 for job_id in job_ids if cancel_in_pool(client, pools, job_id))
    client._retrying("forget jobs in flight", lambda _: client.redis.delete(key))
    if job_ids:
        log.info("batch %s: cancelled %d of the %d jobs an earlier run left in flight", batch_id, cancelled,
                 len(job_ids))
    return cancelled


def cancel_in_pool(client: Client, pools: ClientPools, job_id: str) -> bool:
    """Cancel ``job_id`` through the client of the pool that holds it; False when none does (or it had ended)."""
    owner = client._retrying("find a job's pool", lambda _: pools.find(job_id))
    return owner is not None and owner.cancel(job_id)


def _release(client: Client, runner: BatchRunner) -> None:
    if runner.lease is None:
        return
    try:
        runner.lease.release(client.base_keys.batch_lease(runner.batch_id))
    except redis.RedisError as exc:  # it runs out on its own within LEASE_TTL_MS
        log.warning("batch %s: could not release its lease: %s", runner.batch_id, exc)


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
    key = client.base_keys.batch(runner.batch_id)

    def record(_: int) -> None:
        pipe = client.redis.pipeline(transaction=False)
        if runner.cancelled:
            pipe.hdel(key, "cancel_requested")
        pipe.expire(key, BATCH_HASH_TTL_S)
        pipe.delete(client.base_keys.batch_inflight(runner.batch_id))  # every job of this run ended or was cancelled
        pipe.execute()

    runner.lease_check = False
    try:
        runner.save(retry=True, finished_at=repr(time.time()))
        client._retrying("record batch end", record)
    except (redis.RedisError, DIOError) as exc:
        log.warning("batch %s: could not record its final state: %s", runner.batch_id, exc)
    _release(client, runner)
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
