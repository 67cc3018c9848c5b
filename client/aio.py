"""AsyncClient: the asyncio SDK, with the same API as Client (``await`` where Client blocks).

One reply stream and one reader task per client, exactly as in the sync client::

    async with AsyncClient() as client:
        handle = await client.submit("Hello")
        print((await handle.result(timeout=30)).output)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from functools import partial
from typing import Any, TypeVar

import redis

from dio.client.client import CLIENT_NAME_PREFIX, TRANSIENT_ERRORS, resolve_settings, submit_fields
from dio.client.exceptions import DuplicateJobId, JobNotFound, RedisUnavailable, ResultTimeout
from dio.client.jobs import (
    SUBMISSION_FIELDS,
    build_request,
    cancelled_result,
    check_pool,
    check_unique,
    is_terminal,
    made_by,
    new_job_fields,
    outcome,
    parse_job,
    refused_ids,
)
from dio.client.mailbox import Mailbox
from dio.client.reader import parse_notice
from dio.client.settings import POLLED_HASHES_PER_S, READER_BATCH, READER_BLOCK_MS, ClientSettings
from dio.client.stream import AsyncTokenStream, Subscription, Subscriptions
from dio.protocol.connection import connect_async
from dio.protocol.defaults import REPLY_STREAM_TTL_S
from dio.protocol.keys import STATUS_FIELD, WAKE_FIELD
from dio.protocol.models import JobResult, JobStatus, Request, Tier
from dio.protocol.retry import Outage
from dio.protocol.scripts import AsyncScripts

log = logging.getLogger(__name__)

T = TypeVar("T")


def _new_future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


def _wake_when_done(handle: AsyncJobHandle, ready: deque[AsyncJobHandle], wakeup: asyncio.Event) -> None:
    """Append ``handle`` to ``ready`` and set ``wakeup`` once its job ends."""

    def on_done(_future: asyncio.Future) -> None:
        ready.append(handle)
        wakeup.set()

    handle.future.add_done_callback(on_done)


class AsyncJobHandle:
    """One submitted job of an AsyncClient."""

    def __init__(self, client: AsyncClient, request: Request, future: asyncio.Future) -> None:
        self.request = request
        self.future = future
        self._client = client

    @property
    def id(self) -> str:
        return self.request.id

    def __repr__(self) -> str:
        return f"<AsyncJobHandle {self.id} {'done' if self.future.done() else 'pending'}>"

    async def result(self, timeout: float | None = None, *, raise_on_error: bool = True) -> JobResult:
        """Wait for the job's terminal state; same contract as ``JobHandle.result``."""
        return outcome(await self._client._wait(self, timeout), raise_on_error)

    def stream(self, timeout: float | None = None) -> AsyncTokenStream:
        """Return the job's answer as it is generated, for ``async for``; same contract as ``JobHandle.stream``."""
        return AsyncTokenStream(self, timeout)

    async def status(self) -> JobStatus | None:
        """Return the job's current status (None when its hash is gone)."""
        if self.future.done() and self.future.exception() is None:
            return self.future.result().status
        return await self._client.status(self.id)

    async def done(self) -> bool:
        """Tell whether the job has reached a terminal state (does not wait)."""
        if self.future.done():
            return True
        status = await self._client.status(self.id)
        return status is not None and status.terminal

    async def cancel(self) -> bool:
        """Cancel the job unless it already ended; return True when this call cancelled it (a stream ends at once)."""
        return await self._client.cancel(self.id)


class AsyncClient:
    """Submit requests to DIO and collect their results from asyncio code."""

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
        self.redis = connect_async(self.settings, client_name=CLIENT_NAME_PREFIX + self.client_id)
        self._scripts = AsyncScripts(self.redis, self.keys)
        self.outage = Outage(log, f"client {self.client_id}")  # shared by the waiters and the reply reader
        self._mailbox: Mailbox[asyncio.Future] = Mailbox(_new_future)
        self._streams = Subscriptions()  # token streams followed by handle.stream(), read by the reply reader
        self._reader: asyncio.Task | None = None
        self._stopping = False
        self._closed = False

    # --- context manager -------------------------------------------------------------------------

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the reader task, delete the reply stream and close the connections."""
        if self._closed:
            return
        self._closed = True
        await self._stop_reader()
        with contextlib.suppress(redis.RedisError):
            await self.redis.delete(self.reply_stream)  # else it expires on its own
        await self.redis.aclose()

    async def _stop_reader(self, timeout_s: float = 2.0) -> None:
        if self._reader is None:
            return
        self._stopping = True
        with contextlib.suppress(redis.RedisError):
            await self.redis.xadd(self.reply_stream, {WAKE_FIELD: "1"})
        try:
            await asyncio.wait_for(self._reader, timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            pass  # cancelled by wait_for: nothing is left to read for
        except Exception as exc:  # the reader died earlier; waiters were polling job hashes since
            log.warning("reply reader on %s had stopped: %r", self.reply_stream, exc)

    # --- submission -------------------------------------------------------------------------------

    async def submit(
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
    ) -> AsyncJobHandle:
        """Submit one request; same arguments as ``Client.submit``."""
        data = submit_fields(
            prompt, prompt_token_ids=prompt_token_ids, model=model, max_tokens=max_tokens,
            temperature=temperature, top_p=top_p, seed=seed, ignore_eos=ignore_eos, tier=tier,
            deadline_ms=deadline_ms, ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, sheddable=sheddable,
            num_prompt_tokens=num_prompt_tokens, prefix_hashes=prefix_hashes,
            metadata=dict(metadata) if metadata is not None else None, id=id, stream=stream,
        )
        return (await self.submit_many([data]))[0]

    async def submit_many(self, requests: Iterable[Request | Mapping[str, Any]]) -> list[AsyncJobHandle]:
        """Submit many requests, ``submit_chunk`` per round trip; same contract as the sync one."""
        reqs = [build_request(self.settings, self.client_id, item) for item in requests]
        check_unique(reqs)
        check_pool(self.pool, reqs)
        self._ensure_reader()
        handles: list[AsyncJobHandle] = []
        step = self.settings.submit_chunk
        for start in range(0, len(reqs), step):
            submitted, refused = await self._retrying("submit", partial(self._submit_chunk, reqs[start:start + step]))
            handles += submitted
            if refused:
                raise DuplicateJobId(refused, handles)
        return handles

    async def _retrying(self, what: str, call: Callable[[int], Awaitable[T]]) -> T:
        """Return ``await call(attempt)``, retried through a Redis outage; same contract as ``Client._retrying``."""
        deadline = time.monotonic() + self.settings.client_retry_s
        attempt = 0
        while True:
            attempt += 1
            try:
                value = await call(attempt)
            except TRANSIENT_ERRORS as exc:
                pause, left = self.outage.failed(exc), deadline - time.monotonic()
                if left <= 0:
                    raise RedisUnavailable(what, self.settings.client_retry_s, exc) from exc
                await asyncio.sleep(min(pause, left))
                continue
            self.outage.ok()
            return value

    async def _submit_chunk(self, reqs: list[Request], attempt: int = 1) -> tuple[list[AsyncJobHandle], list[str]]:
        """Submit one chunk in one pipeline; same contract as ``Client._submit_chunk``."""
        pipe = self.redis.pipeline(transaction=False)
        for req in reqs:
            await self._scripts.submit(pipe, req.id, req.to_json(), new_job_fields(req))  # queued when awaited
        refused = refused_ids(reqs, await pipe.execute())
        if refused and attempt > 1:  # the earlier try may have created some of them
            by_id = {req.id: req for req in reqs}
            pipe = self.redis.pipeline(transaction=False)
            for job_id in refused:
                pipe.hmget(self.keys.job(job_id), list(SUBMISSION_FIELDS))
            found = await pipe.execute()
            refused = [job_id for job_id, fields in zip(refused, found, strict=True)
                       if not made_by(by_id[job_id], fields)]
        # A notice that comes before its handle waits in the mailbox until expect() asks for it.
        handles = [AsyncJobHandle(self, req, self._mailbox.expect(req.id)) for req in reqs if req.id not in refused]
        return handles, refused

    def _ensure_reader(self) -> None:
        if self._closed:
            raise RuntimeError("this AsyncClient is closed")
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())

    async def _read_replies(self) -> None:
        """Deliver the notices of the reply stream to the mailbox until the client closes."""
        last_id = "0-0"  # the stream is private: everything on it is ours
        while not self._stopping:
            try:
                doomed = self._streams.take_doomed()
                if doomed:  # token streams read to their end: one DEL for all (else their TTL ends them)
                    await self.redis.delete(*doomed)
                keys = {self.reply_stream: last_id, **self._streams.offsets()}  # and the token streams followed
                replies = await self.redis.xread(keys, count=READER_BATCH, block=READER_BLOCK_MS)
                last_id = await self._consume(replies, last_id)
            except redis.RedisError as exc:
                # Notices wait in the stream; waiters poll job hashes meanwhile, so nothing is lost.
                await asyncio.sleep(self.outage.failed(exc))
                continue
            self.outage.ok()

    async def _consume(self, replies: list | None, last_id: str) -> str:
        # Token entries first: a job's deltas are handed over before its notice ends the stream.
        replies = [(key, entries) for key, entries in replies or [] if not self._streams.deliver(key, entries)]
        for _stream, entries in replies:
            for entry_id, fields in entries:
                last_id = entry_id
                result = parse_notice(entry_id, fields)
                if result is not None:
                    self._mailbox.deliver(result)
            if entries:
                await self.redis.xtrim(self.reply_stream, minid=last_id, approximate=False)
        return last_id

    # --- reading and cancelling jobs -------------------------------------------------------------

    async def get(self, job_id: str) -> JobResult | None:
        """Read a job's current state from its hash (None when the id is unknown or expired)."""
        fields = await self._retrying("get", lambda _: self.redis.hgetall(self.keys.job(job_id)))
        return parse_job(job_id, fields)

    async def status(self, job_id: str) -> JobStatus | None:
        """Return a job's current status, or None when its hash is gone."""
        raw = await self._retrying("status", lambda _: self.redis.hget(self.keys.job(job_id), STATUS_FIELD))
        return None if raw is None else JobStatus(raw)

    async def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not ended; same contract as ``Client.cancel``."""
        key = self.keys.job(job_id)
        tried: list[JobResult] = []

        async def attempt(_: int) -> bool:
            status, reply_to, worker = await self.redis.hmget(key, [STATUS_FIELD, "reply_to", "worker"])
            if tried and status == JobStatus.cancelled.value:
                self._mailbox.settle(job_id, tried[0])  # the earlier try wrote it; its reply was lost
                return True
            if status is None or is_terminal(status):
                return False
            result = cancelled_result(job_id, worker)
            tried[:] = [result]
            notify = None if reply_to == self.client_id else reply_to
            written = await self._scripts.finish(self.redis, result, notify)
            if written == 1:
                self._mailbox.settle(job_id, result)
            return written == 1

        return await self._retrying("cancel", attempt)

    async def follow_stream(self, key: str, wake: Callable[[], None]) -> Subscription:
        """Have the reply reader read a token stream too (``wake`` is called as entries come)."""
        self._ensure_reader()
        sub = self._streams.add(key)
        sub.wake = wake
        if self._streams.wake_needed():  # one wake-up for all the streams followed since the reader's last XREAD
            await self._wake_reader()
        return sub

    def unfollow_stream(self, sub: Subscription, delete: bool = False) -> None:
        """Stop reading a token stream; with ``delete`` (read to its end) the reader deletes its key later."""
        self._streams.remove(sub, delete)

    async def unfollow_stream_async(self, sub: Subscription) -> None:
        """Stop reading a token stream read to its end; the reader deletes its key at once."""
        self._streams.remove(sub, delete=True)
        if self._streams.wake_needed():
            await self._wake_reader()

    async def _wake_reader(self) -> None:
        """End the reply reader's blocking XREAD, so that its next one names the streams followed now."""
        with contextlib.suppress(redis.RedisError):  # else its next XREAD does, within READER_BLOCK_MS
            pipe = self.redis.pipeline(transaction=False)
            pipe.xadd(self.reply_stream, {WAKE_FIELD: "1"})
            pipe.expire(self.reply_stream, int(REPLY_STREAM_TTL_S))
            await pipe.execute()

    # --- waiting ----------------------------------------------------------------------------------

    async def _wait(self, handle: AsyncJobHandle, timeout: float | None) -> JobResult:
        """Wait for one handle; same contract as ``Client._wait`` (a Redis outage is ridden out)."""
        timeout = self.settings.result_timeout_s if timeout is None else timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout  # inf: no timeout, never due
        status: str | None = None
        pause = self.settings.poll_interval_s
        while not handle.future.done():
            try:
                await asyncio.wait_for(asyncio.shield(handle.future), self._next_wait(deadline, pause))
                break
            except TimeoutError:
                pass
            statuses, pause = await self._poll_through_outage([handle], self.settings.poll_interval_s)
            status = statuses[0] if statuses is not None else status
            if not handle.future.done() and timeout is not None and time.monotonic() >= deadline:
                raise ResultTimeout(handle.id, timeout, status)
        return handle.future.result()

    def _next_wait(self, deadline: float, pause: float) -> float:
        return max(0.0, min(pause, deadline - time.monotonic()))

    async def _poll_through_outage(self, handles: list[AsyncJobHandle],
                                   pause: float) -> tuple[list[str | None] | None, float]:
        """Poll the handles; same contract as ``Client._poll_through_outage`` (None while Redis is away)."""
        try:
            statuses = await self.poll(handles)
        except redis.RedisError as exc:
            return None, self.outage.failed(exc)
        self.outage.ok()
        return statuses, pause

    async def poll(self, handles: list[AsyncJobHandle]) -> list[str | None]:
        """Re-read the handles' job hashes and resolve those that ended (or vanished).

        The reply reader resolves handles as notices arrive; this is the fallback for notices
        that were lost. Returns each handle's raw status (None: hash gone).
        """
        pipe = self.redis.pipeline(transaction=False)
        for handle in handles:
            pipe.hget(self.keys.job(handle.id), STATUS_FIELD)
        statuses = await pipe.execute()
        ended = [h for h, s in zip(handles, statuses, strict=True) if s is None or is_terminal(s)]
        if ended:
            pipe = self.redis.pipeline(transaction=False)
            for handle in ended:
                pipe.hgetall(self.keys.job(handle.id))
            for handle, fields in zip(ended, await pipe.execute(), strict=True):
                result = parse_job(handle.id, fields)
                self._mailbox.settle(handle.id, result or JobNotFound(handle.id), handle.future)
        return statuses

    async def as_completed(self, handles: Iterable[AsyncJobHandle],
                           timeout: float | None = None) -> AsyncIterator[AsyncJobHandle]:
        """Yield handles as their jobs end; same contract as ``Client.as_completed``."""
        pending = {h.id: h for h in handles}
        timeout = self.settings.result_timeout_s if timeout is None else timeout
        deadline = math.inf if timeout is None else time.monotonic() + timeout  # inf: no timeout, never due
        ready: deque[AsyncJobHandle] = deque()
        wakeup = asyncio.Event()
        for handle in pending.values():
            _wake_when_done(handle, ready, wakeup)
        next_poll = time.monotonic() + self._bulk_poll_interval(len(pending))
        while pending:
            if ready:
                handle = ready.popleft()
                if pending.pop(handle.id, None) is not None:
                    yield handle
                continue
            wakeup.clear()
            wait = min(next_poll, deadline) - time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), max(0.0, wait))
                continue
            if timeout is not None and time.monotonic() >= deadline:
                first = next(iter(pending.values()))
                statuses, _ = await self._poll_through_outage([first], 0.0)
                raise ResultTimeout(first.id, timeout, statuses[0] if statuses is not None else None)
            _, pause = await self._poll_through_outage(list(pending.values()), self._bulk_poll_interval(len(pending)))
            next_poll = time.monotonic() + pause

    def _bulk_poll_interval(self, count: int) -> float:
        return self.settings.poll_interval_s * max(1.0, count / POLLED_HASHES_PER_S)

    async def wait_all(self, handles: Iterable[AsyncJobHandle], timeout: float | None = None) -> list[JobResult]:
        """Wait for every job; return their terminal results in order (errors returned, not raised)."""
        handles = list(handles)
        async for _ in self.as_completed(handles, timeout):
            pass
        return [await h.result(raise_on_error=False) for h in handles]
