"""Client: the synchronous SDK to submit jobs to DIO and wait for their results.

A submission is one pipeline: ``submit.lua`` creates the job hash (status ``queued``) and the
intake entry, unless a job with that id exists (DuplicateJobId: a job is never overwritten).
Each Client has one id and one private reply stream; a single reader thread turns the notices on
it into results, and waiters poll the job hash about once a second so that a lost notice (an
expired reply stream, a reader that was down) never loses a result. Waiters ride out a Redis
outage (``dio.protocol.retry``) until their timeout, and raise only DIO's exceptions; ``submit``,
``get``, ``status`` and ``cancel`` ride it out for up to ``client_retry_s``, then raise
RedisUnavailable (a retried submission that finds the job it created counts it as submitted).
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from dio.client.exceptions import DuplicateJobId, JobNotFound, RedisUnavailable, ResultTimeout
from dio.client.handle import JobHandle
from dio.client.jobs import (
    SUBMISSION_FIELDS,
    build_request,
    cancelled_result,
    check_pool,
    check_unique,
    is_terminal,
    made_by,
    new_job_fields,
    parse_job,
    refused_ids,
)
from dio.client.mailbox import Mailbox
from dio.client.reader import ReplyReader
from dio.client.settings import POLLED_HASHES_PER_S, ClientSettings
from dio.client.stream import Subscription, Subscriptions
from dio.protocol.connection import connect
from dio.protocol.defaults import REPLY_STREAM_TTL_S
from dio.protocol.keys import STATUS_FIELD, WAKE_FIELD
from dio.protocol.models import JobResult, JobStatus, Request, Tier
from dio.protocol.retry import Outage
from dio.protocol.scripts import Scripts

log = logging.getLogger("dio.client")

CLIENT_NAME_PREFIX = "dio-client:"  # CLIENT LIST shows every connection of a client under this name
# Errors of a Redis that is away (restarting, loading, failing over): retried, not raised.
TRANSIENT_ERRORS: tuple[type[redis.RedisError], ...] = (redis.ConnectionError, redis.TimeoutError,
                                                        redis.exceptions.ReadOnlyError)

if TYPE_CHECKING:
    from dio.client.batches import BatchHandle

T = TypeVar("T")


def resolve_settings(settings: ClientSettings | None, redis_url: str | None,
                     key_prefix: str | None) -> ClientSettings:
    """Apply the keyword overrides of a client constructor to its settings."""
    overrides: dict[str, Any] = {name: value for name, value in (("redis_url", redis_url), ("key_prefix", key_prefix))
                                 if value is not None}
    if settings is None:
        return ClientSettings(**overrides)
    return settings.model_copy(update=overrides)


def submit_fields(prompt: str | None, **fields: Any) -> dict[str, Any]:
    """Collect the keyword arguments of ``submit`` that were given (None means the default)."""
    data = {name: value for name, value in fields.items() if value is not None}
    if prompt is not None:
        data["prompt"] = prompt
    return data


def put_when_done(handle: JobHandle, finished: queue.SimpleQueue[JobHandle]) -> None:
    """Put ``handle`` on ``finished`` once its job ends (at once if it already has)."""
    handle.future.add_done_callback(lambda _future: finished.put(handle))


class Client:
    """Submit requests to DIO and collect their results (thread-safe)."""

    def __init__(self, settings: ClientSettings | None = None, *, redis_url: str | None = None,
                 key_prefix: str | None = None) -> None:
        self.settings = resolve_settings(settings, redis_url, key_prefix)
        # Sharded by model, a client serves the pool of its settings' model: its jobs, its reply
        # stream and the scripts that write both stay in that pool's slot. The Batch API's keys stay
        # the deployment's (``base_keys``).
        self.pool = self.settings.model if self.settings.shard_by_model else None
        self.keys = self.settings.keys_for(self.settings.model)
        self.base_keys = self.settings.keys
        self.client_id = uuid.uuid4().hex
        self.reply_stream = self.keys.reply(self.client_id)
        self.redis = connect(self.settings, client_name=CLIENT_NAME_PREFIX + self.client_id)
        self._scripts = Scripts(self.redis, self.keys)
        self.outage = Outage(log, f"client {self.client_id}")  # shared by the waiters and the reply reader
        self._mailbox: Mailbox[Future] = Mailbox(Future)
        self._streams = Subscriptions()  # token streams followed by handle.stream(), read by the reply reader
        self._reader: ReplyReader | None = None
        self._reader_lock = threading.Lock()
        self._closed = False

    # --- context manager -------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the reply reader, delete the reply stream and close the connections."""
        if self._closed:
            return
        self._closed = True
        with self._reader_lock:
            if self._reader is not None:
                self._reader.stop()
        try:
            self.redis.delete(self.reply_stream)
        except redis.RedisError:
            pass  # the stream expires on its own (REPLY_STREAM_TTL_S)
        self.redis.close()

    # --- submission -------------------------------------------------------------------------------

    def submit(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        ignore_eos: bool | None = None,
        tier: Tier | str | None = None,
        deadline_ms: float | None = None,
        ttft_slo_ms: float | None = None,
        tpot_slo_ms: float | None = None,
        sheddable: bool | None = None,
        num_prompt_tokens: int | None = None,
        prefix_hashes: list[int] | None = None,
        metadata: Mapping[str, str] | None = None,
        id: str | None = None,
        stream: bool | None = None,
    ) -> JobHandle:
        """Submit one request (a text ``prompt`` or ``prompt_token_ids``) and return its handle.

        Omitted arguments take the client's settings (model, max_tokens, temperature, tier).
        ``deadline_ms``, ``ttft_slo_ms`` and ``tpot_slo_ms`` are the request's SLO; with
        ``sheddable=True`` DIO may reject it at once (with a retry-after) when it predicts a miss on
        every worker, instead of running it late. With ``stream=True`` the worker publishes the
        answer as it is generated: iterate ``handle.stream()``. Raises ValueError (pydantic's
        ValidationError) for an invalid request, before any I/O.
        """
        data = submit_fields(
            prompt, prompt_token_ids=prompt_token_ids, model=model, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos, tier=tier,
            deadline_ms=deadline_ms, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, sheddable=sheddable,
            num_prompt_tokens=num_prompt_tokens, prefix_hashes=prefix_hashes,
            metadata=dict(metadata) if metadata is not None else None, id=id, stream=stream,
        )
        return self.submit_many([data])[0]

    def submit_many(self, requests: Iterable[Request | Mapping[str, Any]]) -> list[JobHandle]:
        """Submit many requests, ``submit_chunk`` per round trip; return their handles in order.

        Every request is validated first, so an invalid one raises before anything is sent. If
        Redis fails midway, the chunks already sent stay submitted and the error propagates. An id
        that an existing job holds is refused, never overwritten: DuplicateJobId is raised after
        the chunk it is in, whose other requests are submitted (their handles ride on the error).
        """
        reqs = [build_request(self.settings, self.client_id, item) for item in requests]
        check_unique(reqs)
        check_pool(self.pool, reqs)
        self._ensure_reader()
        handles: list[JobHandle] = []
        step = self.settings.submit_chunk
        for start in range(0, len(reqs), step):
            submitted, refused = self._retrying("submit", partial(self._submit_chunk, reqs[start:start + step]))
            handles += submitted
            if refused:
                raise DuplicateJobId(refused, handles)
        return handles

    def _retrying(self, what: str, call: Callable[[int], T]) -> T:
        """Return ``call(attempt)`` (attempt 1, 2, ...), retried with the shared backoff through a Redis outage.

        Raises RedisUnavailable once Redis has been away ``client_retry_s`` seconds.
        """
        deadline = time.monotonic() + self.settings.client_retry_s
        attempt = 0
        while True:
            attempt += 1
            try:
                value = call(attempt)
            except TRANSIENT_ERRORS as exc:
                pause, left = self.outage.failed(exc), deadline - time.monotonic()
                if left <= 0:
                    raise RedisUnavailable(what, self.settings.client_retry_s, exc) from exc
                time.sleep(min(pause, left))
                continue
            self.outage.ok()
            return value

    def _submit_chunk(self, reqs: list[Request], attempt: int = 1) -> tuple[list[JobHandle], list[str]]:
        """Submit one chunk in one pipeline; return the handles of those submitted and the ids refused.

        On a retry (``attempt`` > 1) the earlier try may have created some jobs before its reply was
        lost: a refused id whose job this very request created counts as submitted.
        """
        pipe = self.redis.pipeline(transaction=False)
        for req in reqs:
            self._scripts.submit(pipe, req.id, req.to_json(), new_job_fields(req))
        refused = refused_ids(reqs, pipe.execute())
        if refused and attempt > 1:
            by_id = {req.id: req for req in reqs}
            pipe = self.redis.pipeline(transaction=False)
            for job_id in refused:
                pipe.hmget(self.keys.job(job_id), list(SUBMISSION_FIELDS))
            found = pipe.execute()
            refused = [job_id for job_id, fields in zip(refused, found, strict=True)
                       if not made_by(by_id[job_id], fields)]
        # A notice that comes before its handle waits in the mailbox until expect() asks for it.
        handles = [JobHandle(self, req, self._mailbox.expect(req.id)) for req in reqs if req.id not in refused]
        return handles, refused

    def _ensure_reader(self) -> None:
        if self._closed:
            raise RuntimeError("this Client is closed")
        with self._reader_lock:
            if self._reader is None:
                self._reader = ReplyReader(self.redis, self.reply_stream, self._mailbox, outage=self.outage,
                                           streams=self._streams)
                self._reader.start()

    # --- reading and cancelling jobs -------------------------------------------------------------

    def get(self, job_id: str) -> JobResult | None:
        """Read a job's current state from its hash (None when the id is unknown or expired)."""
        return self._retrying("get", lambda _: parse_job(job_id, self.redis.hgetall(self.keys.job(job_id))))

    def status(self, job_id: str) -> JobStatus | None:
        """Return a job's current status, or None when its hash is gone."""
        raw = self._retrying("status", lambda _: self.redis.hget(self.keys.job(job_id), STATUS_FIELD))
        return None if raw is None else JobStatus(raw)

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not ended; return True when this call cancelled it.

        The terminal state ``cancelled`` is written through the finish script, so a worker that
        finishes the job later cannot overwrite it, and a worker that has not started it drops it.
        Retried through a Redis outage: a job found cancelled after a try whose reply was lost counts
        as cancelled by this call.
        """
        tried: list[JobResult] = []

        def attempt(_: int) -> bool:
            status, reply_to, worker = self.redis.hmget(self.keys.job(job_id), [STATUS_FIELD, "reply_to", "worker"])
            if tried and status == JobStatus.cancelled.value:
                self._mailbox.settle(job_id, tried[0])
                return True
            if status is None or is_terminal(status):
                return False
            result = cancelled_result(job_id, worker)
            tried[:] = [result]
            # Our own jobs are resolved here; a notice to ourselves would only be read and dropped.
            notify = None if reply_to == self.client_id else reply_to
            written = self._scripts.finish(self.redis, result, notify)
            if written == 1:
                self._mailbox.settle(job_id, result)
            return written == 1

        return self._retrying("cancel", attempt)

    def follow_stream(self, key: str, wake: Callable[[], None]) -> Subscription:
        """Have the reply reader read a token stream too (``wake`` is called as entries come)."""
        self._ensure_reader()
        sub = self._streams.add(key)
        sub.wake = wake
        if self._streams.wake_needed():  # one wake-up for all the streams followed since the reader's last XREAD
            self._wake_reader()
        return sub

    def unfollow_stream(self, sub: Subscription, delete: bool = False) -> None:
        """Stop reading a token stream; with ``delete`` (read to its end) the reader deletes its key soon."""
        self._streams.remove(sub, delete)
        if delete and self._streams.wake_needed():
            self._wake_reader()

    def _wake_reader(self) -> None:
        """End the reply reader's blocking XREAD, so that its next one names the streams followed now."""
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(self.reply_stream, {WAKE_FIELD: "1"})
            pipe.expire(self.reply_stream, int(REPLY_STREAM_TTL_S))
            pipe.execute()
        except redis.RedisError:
            pass  # the reader's next XREAD, within READER_BLOCK_MS, names it anyway

    # --- waiting ----------------------------------------------------------------------------------

    def _wait(self, handle: JobHandle, timeout: float | None) -> JobResult:
        """Wait for one handle: its notice, or the job hash polled every ``poll_interval_s``.

        Through a Redis outage the polls back off and retry until ``timeout``; then ResultTimeout
        carries the last status read (None if none was).
        """
        timeout = self.settings.result_timeout_s if timeout is None else timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout  # inf: no timeout, never due
        status: str | None = None
        pause = self.settings.poll_interval_s
        while True:
            try:
                return handle.future.result(self._next_wait(deadline, pause))
            except FutureTimeout:
                pass
            statuses, pause = self._poll_through_outage([handle], self.settings.poll_interval_s)
            status = statuses[0] if statuses is not None else status
            if handle.future.done():
                continue
            if timeout is not None and time.monotonic() >= deadline:
                raise ResultTimeout(handle.id, timeout, status)

    def _next_wait(self, deadline: float, pause: float) -> float:
        return max(0.0, min(pause, deadline - time.monotonic()))

    def _poll_through_outage(self, handles: list[JobHandle], pause: float) -> tuple[list[str | None] | None, float]:
        """Poll the handles; return their statuses and the pause before the next poll.

        While Redis is unreachable, return None and a backoff pause instead of raising: the jobs
        live on in Redis (a notice sent meanwhile waits in the reply stream), so the wait goes on.
        """
        try:
            statuses = self.poll(handles)
        except redis.RedisError as exc:
            return None, self.outage.failed(exc)
        self.outage.ok()
        return statuses, pause

    def poll(self, handles: list[JobHandle]) -> list[str | None]:
        """Re-read the handles' job hashes and resolve those that ended (or vanished).

        The reply reader resolves handles as notices arrive; this is the fallback for notices
        that were lost. Returns each handle's raw status (None: hash gone).
        """
        pipe = self.redis.pipeline(transaction=False)
        for handle in handles:
            pipe.hget(self.keys.job(handle.id), STATUS_FIELD)
        statuses = pipe.execute()
        ended = [h for h, s in zip(handles, statuses, strict=True) if s is None or is_terminal(s)]
        if ended:
            pipe = self.redis.pipeline(transaction=False)
            for handle in ended:
                pipe.hgetall(self.keys.job(handle.id))
            for handle, fields in zip(ended, pipe.execute(), strict=True):
                result = parse_job(handle.id, fields)
                self._mailbox.settle(handle.id, result or JobNotFound(handle.id), handle.future)
        return statuses

    def as_completed(self, handles: Iterable[JobHandle], timeout: float | None = None) -> Iterator[JobHandle]:
        """Yield handles as their jobs end (in any order), all within ``timeout`` seconds.

        Raises ResultTimeout, naming one unfinished job, when time runs out (None: the client's
        ``result_timeout_s``), a Redis outage included. Pending jobs are polled in bulk, at about
        POLLED_HASHES_PER_S hashes a second, in case some notices were lost.
        """
        pending = {h.id: h for h in handles}
        timeout = self.settings.result_timeout_s if timeout is None else timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout  # inf: no timeout, never due
        finished: queue.SimpleQueue[JobHandle] = queue.SimpleQueue()
        for handle in pending.values():
            put_when_done(handle, finished)
        next_poll = time.monotonic() + self._bulk_poll_interval(len(pending))
        while pending:
            wait = min(next_poll, deadline) - time.monotonic()
            try:
                handle = finished.get(timeout=max(0.0, wait))
                if pending.pop(handle.id, None) is not None:
                    yield handle
                continue
            except queue.Empty:
                pass
            if timeout is not None and time.monotonic() >= deadline:
                first = next(iter(pending.values()))
                statuses, _ = self._poll_through_outage([first], 0.0)
                raise ResultTimeout(first.id, timeout, statuses[0] if statuses is not None else None)
            _, pause = self._poll_through_outage(list(pending.values()), self._bulk_poll_interval(len(pending)))
            next_poll = time.monotonic() + pause

    def _bulk_poll_interval(self, count: int) -> float:
        return self.settings.poll_interval_s * max(1.0, count / POLLED_HASHES_PER_S)

    def wait_all(self, handles: Iterable[JobHandle], timeout: float | None = None) -> list[JobResult]:
        """Wait for every job and return their terminal results in the handles' order.

        Rejected, failed and cancelled jobs are returned, not raised; check ``result.status``.
        Raises ResultTimeout when some job is still running after ``timeout``.
        """
        handles = list(handles)
        for _ in self.as_completed(handles, timeout):
            pass
        return [h.result(raise_on_error=False) for h in handles]

    # --- batches ----------------------------------------------------------------------------------

    def submit_batch(self, path: str | os.PathLike[str], endpoint: str | None = None,
                     metadata: Mapping[str, str] | None = None) -> BatchHandle:
        """Submit an OpenAI Batch API input file as a batch (a ``dio batch-runner`` runs it).

        Returns a handle: ``progress()`` (the request counts), ``wait()``, ``results()`` (every
        output and error record), ``cancel()``. The endpoint defaults to the first line's ``url``.
        Raises BatchInputError (FileTooLarge) for a file DIO refuses, before anything is stored.
        """
        from dio.client.batches import submit_batch

        return submit_batch(self, path, endpoint, dict(metadata) if metadata is not None else None)
