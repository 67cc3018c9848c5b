"""Run one Batch API batch (``dio.client.batches``) to its end: what a ``dio batch-runner`` does with it.

``run_stored_batch`` holds the batch's lease (``dio.client.batch_lease``) from start to end:

1. ``validating``: the input file is read (gone: ``failed``); the output and error files are
   allocated; ``in_progress``.
2. What earlier runners left is taken over: the lines already answered (read from the output and
   error files) are skipped, and each job an earlier runner left in flight (``Keys.batch_inflight``)
   is settled: written if it ended with a result, cancelled otherwise (so a killed runner's jobs
   stop using the GPUs), its line then submitted again.
3. The lines are submitted at tier ``batch`` (``BatchRunner``), at most ``concurrency`` in flight,
   each job recorded in flight before it is submitted; each result is appended to the output file
   (a response) or the error file (an error) by ``batch_write.lua``, which checks the lease and
   takes the job out of the in-flight hash in the same step. So each ``custom_id`` is answered once,
   whatever runner dies when.
4. ``finalizing`` → ``completed``, with ``output_file_id`` and ``error_file_id``. A cancel request
   (``cancelling``) cancels the jobs in flight and ends ``cancelled`` (the lines answered so far are
   in the files); the completion window passing ends it ``expired``, each unanswered line given a
   ``batch_expired`` error.

A runner that is stopped (SIGTERM) cancels its jobs in flight and gives the lease up, leaving the
batch ``in_progress`` for the next runner, which resumes it at once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

import redis

from dio.client.batch import BatchProgress, BatchRunner, cancel_in_pool
from dio.client.batch_lease import BatchLease, LeaseLost
from dio.client.batch_output import AnswerIndex
from dio.client.batch_pacing import MIN_IN_FLIGHT
from dio.client.batches import iter_text_lines
from dio.client.client import TRANSIENT_ERRORS, Client
from dio.client.exceptions import JobNotFound
from dio.client.jobs import build_request
from dio.client.openai_batch import BatchLine, BatchLineError, error_record, parse_line, result_record
from dio.client.pools import ClientPools
from dio.client.settings import BATCH_CONCURRENCY, BATCH_FILE_TTL_S, MAX_BATCH_LINE_BYTES
from dio.protocol.batches import (
    CANCEL_FIELD,
    ERROR_DATA_FIELD,
    OUTPUT_DATA_FIELD,
    OUTPUT_PURPOSE,
    RUNNER_FIELD,
    STATUS_TIME_FIELDS,
    BatchError,
    BatchErrors,
    BatchStatus,
    FileObject,
    file_to_hash,
)
from dio.protocol.keys import STATUS_FIELD
from dio.protocol.models import JobStatus, Request, Tier
from dio.protocol.scripts import script_source

log = logging.getLogger("dio.batch")

JOB_RECORD_PREFIX = "batch_req_"
RUNNABLE = (BatchStatus.validating, BatchStatus.in_progress, BatchStatus.finalizing, BatchStatus.cancelling)


class StoredOutput(AnswerIndex):
    """A batch's output and error files in Redis, written only while this runner holds the lease."""

    def __init__(self, client: Client, batch_id: str, lease: BatchLease, output_id: str, error_id: str) -> None:
        super().__init__()
        self.client = client
        self.keys = client.base_keys
        self.batch_id = batch_id
        self.lease = lease
        self.output_id, self.error_id = output_id, error_id
        self._write = client.redis.register_script(script_source("batch_write"))
        for file_id in (output_id, error_id):
            self.index_text(client.redis.get(self.keys.file_data(file_id)) or "", file_id)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` to the output file (a response) or the error file; LeaseLost when not ours."""
        ok = record["response"] is not None
        file_id = self.output_id if ok else self.error_id
        record_id = str(record["id"])
        job_id = record_id[len(JOB_RECORD_PREFIX):] if record_id.startswith(JOB_RECORD_PREFIX) else ""
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"
        keys = [self.keys.batch_lease(self.batch_id), self.keys.file_data(file_id),
                self.keys.batch_inflight(self.batch_id), self.keys.batch(self.batch_id), self.keys.file(file_id)]
        args = [self.lease.value, line, job_id, "completed" if ok else "failed"]
        written = self.client._retrying("write batch output", lambda _: self._write(keys=keys, args=args))
        if not written:
            raise LeaseLost(f"batch {self.batch_id}: this runner's lease ran out or was taken over")
        self.index(record)


class StoredRunner(BatchRunner):
    """BatchRunner for a stored batch: jobs recorded in flight first, the lease renewed, expiry and stop honoured."""

    def __init__(self, client: Client, batch_id: str, output: StoredOutput, progress: BatchProgress, *,
                 lease: BatchLease, expires_at: float | None, stopping: threading.Event, concurrency: int,
                 rate_limit: float | None, adaptive: bool, min_in_flight: int, pools: ClientPools) -> None:
        super().__init__(client, batch_id, output, progress, concurrency=concurrency, rate_limit=rate_limit,
                         progress_cb=None, max_line_bytes=MAX_BATCH_LINE_BYTES, lease=lease, adaptive=adaptive,
                         min_in_flight=min_in_flight, pools=pools)
        self.expires_at = expires_at
        self.stopping = stopping
        self.expired = False

    def _request(self, line: BatchLine) -> Request:
        return batch_request(self._client_for(line), self.batch_id, line)

    def after_preempt(self, job_id: str) -> None:
        key = self.client.base_keys.batch_inflight(self.batch_id)
        self.client._retrying("record jobs in flight", lambda _: self.client.redis.hdel(key, job_id))

    def save(self, *, retry: bool = False, **extra: Any) -> None:
        """Heartbeat: renew the lease, record the jobs in flight, and notice expiry or a stop."""
        if self.expires_at is not None and time.time() >= self.expires_at:
            self.expired = self.cancelled = True
        if self.stopping.is_set():
            self.cancelled = True
        self.renew_lease()
        try:
            self.client.redis.hset(self.client.base_keys.batch(self.batch_id), "in_flight", str(len(self._in_flight)))
        except TRANSIENT_ERRORS as exc:
            self.client.outage.failed(exc)
            return
        self._last_save = time.monotonic()


def batch_request(client: Client, batch_id: str, line: BatchLine, job_id: str | None = None) -> Request:
    """The Request of one batch line (tier ``batch``; its custom_id and batch in the metadata)."""
    data: dict[str, Any] = {**line.fields, "tier": Tier.batch,
                            "metadata": {"custom_id": line.custom_id, "batch_id": batch_id}}
    if job_id is not None:
        data["id"] = job_id
    return build_request(client.settings, client.client_id, data)


class StoredBatch:
    """One batch, run by this runner under its lease."""

    def __init__(self, client: Client, batch_id: str, lease: BatchLease, *, stopping: threading.Event,
                 concurrency: int = BATCH_CONCURRENCY, rate_limit: float | None = None, adaptive: bool = True,
                 min_in_flight: int = MIN_IN_FLIGHT, pools: ClientPools | None = None) -> None:
        self.client = client  # the batch's and its files' keys (base_keys)
        # Sharded by model: each line's job goes through its pool's client (the runner's pools, shared).
        self.pools = pools if pools is not None else ClientPools(client=client)
        self.adaptive = adaptive
        self.min_in_flight = min_in_flight
        self.keys = client.base_keys
        self.batch_id = batch_id
        self.lease = lease
        self.stopping = stopping
        self.concurrency = concurrency
        self.rate_limit = rate_limit
        self.key = self.keys.batch(batch_id)

    # --- state changes, each only while the lease is ours ----------------------------------------

    def _update(self, fields: dict[str, str], *, status: BatchStatus | None = None, end: bool = False) -> None:
        """Write batch fields (and a status with its ``*_at``) if this runner still holds the lease."""
        if status is not None:
            fields = {**fields, STATUS_FIELD: status.value}
            if status in STATUS_TIME_FIELDS:
                fields[STATUS_TIME_FIELDS[status]] = str(int(time.time()))
        lease_key = self.keys.batch_lease(self.batch_id)

        def write(_: int) -> None:
            with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.watch(lease_key)
                if pipe.get(lease_key) != self.lease.value:
                    raise LeaseLost(f"batch {self.batch_id}: this runner's lease ran out or was taken over")
                pipe.multi()
                pipe.hset(self.key, mapping=fields)
                if end:
                    pipe.srem(self.keys.active_batches, self.batch_id)
                    pipe.hdel(self.key, CANCEL_FIELD)
                    pipe.delete(self.keys.batch_inflight(self.batch_id))
                    for name in (self.key,):
                        pipe.expire(name, int(BATCH_FILE_TTL_S))
                pipe.execute()

        try:
            self.client._retrying("update batch", write)
        except redis.WatchError:
            raise LeaseLost(f"batch {self.batch_id}: the lease changed hands while updating it") from None

    # --- the run ----------------------------------------------------------------------------------

    def run(self) -> BatchStatus | None:
        """Run the batch to its end; return its final status (None: left for another runner)."""
        fields = self.client.redis.hgetall(self.key)
        if not fields.get("endpoint"):
            return None
        status = BatchStatus(fields[STATUS_FIELD])
        if status.terminal:
            self.client.redis.srem(self.keys.active_batches, self.batch_id)
            return status
        text = self.client.redis.get(self.keys.file_data(fields["input_file_id"]))
        if text is None:
            return self._fail("input_file_gone", f"the input file {fields['input_file_id']} no longer exists")
        output_id, error_id = self._files(fields)
        output = StoredOutput(self.client, self.batch_id, self.lease, output_id, error_id)
        if status is BatchStatus.validating:
            self._update({"in_flight": "0"}, status=BatchStatus.in_progress)
        lines: dict[str, BatchLine] = {}  # custom_id -> parsed line, for settling the jobs a dead runner left
        self._settle_orphans(output, text, lines)
        expires_at = float(fields["expires_at"]) if fields.get("expires_at") else None
        progress = BatchProgress(self.batch_id, total=int(fields.get("total") or 0), done=output.done,
                                 failed=output.failed)
        runner = StoredRunner(self.client, self.batch_id, output, progress, lease=self.lease, expires_at=expires_at,
                              stopping=self.stopping, concurrency=self.concurrency, rate_limit=self.rate_limit,
                              adaptive=self.adaptive, min_in_flight=self.min_in_flight, pools=self.pools)
        try:
            runner.run(iter_text_lines(text))
        except BaseException:
            self._abandon(runner)
            raise
        return self._end(runner, output, text)

    def _files(self, fields: dict[str, str]) -> tuple[str, str]:
        """The output and error files' ids: allocated (and created empty) when the batch starts."""
        from dio.client.batches import new_file_id

        output_id, error_id = fields.get(OUTPUT_DATA_FIELD), fields.get(ERROR_DATA_FIELD)
        if output_id and error_id:
            return output_id, error_id
        output_id, error_id = new_file_id(), new_file_id()
        now = int(time.time())
        for file_id, kind in ((output_id, "output"), (error_id, "error")):
            file = FileObject(id=file_id, bytes=0, created_at=now, expires_at=now + int(BATCH_FILE_TTL_S),
                              filename=f"{self.batch_id}_{kind}.jsonl", purpose=OUTPUT_PURPOSE)
            pipe = self.client.redis.pipeline(transaction=True)
            pipe.hset(self.keys.file(file_id), mapping=file_to_hash(file))
            pipe.set(self.keys.file_data(file_id), "", nx=True)
            pipe.expire(self.keys.file(file_id), int(BATCH_FILE_TTL_S))
            pipe.expire(self.keys.file_data(file_id), int(BATCH_FILE_TTL_S))
            pipe.execute()
        self._update({OUTPUT_DATA_FIELD: output_id, ERROR_DATA_FIELD: error_id, RUNNER_FIELD: self.lease.holder.runner})
        return output_id, error_id

    def _settle_orphans(self, output: StoredOutput, text: str, lines: dict[str, BatchLine]) -> None:
        """Settle the jobs earlier runners left in flight: write those that ended, cancel the rest."""
        inflight = self.client.redis.hgetall(self.keys.batch_inflight(self.batch_id))
        if not inflight:
            return
        lines.update(_parsed_lines(text, set(inflight.values())))
        cancelled = 0
        for job_id, custom_id in inflight.items():
            if not output.has_custom_id(custom_id):
                if cancel_in_pool(self.client, self.pools, job_id):  # in the pool that holds the job
                    cancelled += 1
                else:  # it had ended: its result is the answer
                    self._write_orphan(output, job_id, lines.get(custom_id))
            self.client.redis.hdel(self.keys.batch_inflight(self.batch_id), job_id)
        log.info("batch %s: %d jobs left in flight by an earlier runner: %d cancelled, %d settled",
                 self.batch_id, len(inflight), cancelled, len(inflight) - cancelled)

    def _write_orphan(self, output: StoredOutput, job_id: str, line: BatchLine | None) -> None:
        owner = self.client._retrying("find a job's pool", lambda _: self.pools.find(job_id))
        result = owner.get(job_id) if owner is not None else None
        if line is None or result is None or result.status is JobStatus.cancelled or not result.status.terminal:
            return  # gone, cancelled, or not a line of this batch: the line is submitted again
        assert owner is not None
        request = batch_request(owner, self.batch_id, line, job_id)
        output.write(result_record(line, request, result))

    def _abandon(self, runner: StoredRunner) -> None:
        """Cancel the jobs in flight of a run that raised (unless another runner holds the batch now)."""
        try:
            if self.lease.held_by(self.keys.batch_lease(self.batch_id)) == self.lease.holder:
                runner.progress_cb = None
                runner.lease_check = False
                runner.cancel_in_flight()
        except (redis.RedisError, LeaseLost, JobNotFound) as exc:
            log.warning("batch %s: could not cancel its jobs in flight: %s", self.batch_id, exc)

    def _end(self, runner: StoredRunner, output: StoredOutput, text: str) -> BatchStatus | None:
        runner.lease_check = False
        if runner.cancelled and not runner.expired and self.stopping.is_set() and not self._cancel_requested():
            self.client.redis.delete(self.keys.batch_inflight(self.batch_id))  # its jobs were cancelled
            return None  # stopped: the next runner resumes it
        ends: dict[str, str] = {OUTPUT_DATA_FIELD: output.output_id, "in_flight": "0",
                                "output_file_id": output.output_id}
        if output.failed or runner.expired:
            ends["error_file_id"] = output.error_id
        if runner.expired:
            self._answer_expired(output, text)
            ends["error_file_id"] = output.error_id
            self._update(ends, status=BatchStatus.expired, end=True)
            return BatchStatus.expired
        if runner.cancelled:
            self._update(ends, status=BatchStatus.cancelled, end=True)
            return BatchStatus.cancelled
        self._update({}, status=BatchStatus.finalizing)
        self._update(ends, status=BatchStatus.completed, end=True)
        return BatchStatus.completed

    def _cancel_requested(self) -> bool:
        return self.client.redis.hget(self.key, CANCEL_FIELD) == "1"

    def _answer_expired(self, output: StoredOutput, text: str) -> None:
        """Give each line the window left unanswered a ``batch_expired`` error (as OpenAI does)."""
        for line_no, raw in iter_text_lines(text):
            try:
                custom_id: str | None = parse_line(line_no, raw, MAX_BATCH_LINE_BYTES).custom_id
            except BatchLineError as exc:
                custom_id = exc.custom_id
            if custom_id is None or output.has_custom_id(custom_id) or output.has_line(line_no):
                continue
            output.write(error_record(f"batch_req_expired_{line_no}", custom_id, "batch_expired",
                                      "this request could not be executed before the completion window expired"))

    def _fail(self, code: str, message: str) -> BatchStatus:
        errors = BatchErrors(data=[BatchError(code=code, message=message)])
        self._update({"errors": errors.model_dump_json()}, status=BatchStatus.failed, end=True)
        return BatchStatus.failed


def _parsed_lines(text: str, custom_ids: set[str]) -> dict[str, BatchLine]:
    found: dict[str, BatchLine] = {}
    for line_no, raw in iter_text_lines(text):
        try:
            line = parse_line(line_no, raw, MAX_BATCH_LINE_BYTES)
        except BatchLineError:
            continue
        if line.custom_id in custom_ids:
            found[line.custom_id] = line
    return found


def runnable(status: str | None) -> bool:
    """Tell whether a batch in this status is waiting for a runner."""
    try:
        return status is not None and BatchStatus(status) in RUNNABLE
    except ValueError:
        return False
