"""The asyncio client on a real Redis, against EchoBackend."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dio.client import (
    AsyncClient,
    ClientSettings,
    DuplicateJobId,
    JobCancelled,
    JobFailed,
    JobRejected,
    JobStatus,
    ResultTimeout,
)
from dio.client.testing import EchoBackend
from dio.protocol.models import JobResult
from dio.protocol.scripts import Scripts

pytestmark = pytest.mark.integration


async def test_submit_returns_the_completed_result(backend, client_settings):
    async with AsyncClient(client_settings) as client:
        handle = await client.submit("hello", max_tokens=4)
        result = await handle.result(timeout=5)
        assert (result.status, result.output) == (JobStatus.completed, "echo: hello")
        assert await handle.status() is JobStatus.completed and await handle.done()
        assert (await client.get(handle.id)).output == "echo: hello"


async def test_submit_carries_the_slo_and_the_shedding_opt_in(client_settings):
    async with AsyncClient(client_settings) as client:
        handle = await client.submit("x", ttft_slo_ms=500.0, tpot_slo_ms=30.0, sheddable=True)
        assert (handle.request.ttft_slo_ms, handle.request.tpot_slo_ms, handle.request.sheddable) == (500.0, 30.0, True)
        assert (await client.submit("y")).request.sheddable is False


async def test_submit_many_resolves_all_through_one_reader(backend, client_settings):
    async with AsyncClient(client_settings) as client:
        handles = await client.submit_many([{"prompt": f"p{i}"} for i in range(1000)])
        results = await client.wait_all(handles, timeout=30)
        assert [r.output for r in results] == [f"echo: p{i}" for i in range(1000)]
        readers = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "AsyncClient._read_replies"]
        assert len(readers) == 1
        names = [c for c in await client.redis.client_list() if c["name"] == f"dio-client:{client.client_id}"]
        assert 1 <= len(names) <= 2


async def test_errors_timeouts_and_cancel(backend, client_settings):
    async with AsyncClient(client_settings) as client:
        rejected, failed, hung = await client.submit_many([{"prompt": "reject"}, {"prompt": "fail"},
                                                            {"prompt": "hang"}])
        with pytest.raises(JobRejected, match="overloaded"):
            await rejected.result(timeout=5)
        with pytest.raises(JobFailed, match="CUDA"):
            await failed.result(timeout=5)
        with pytest.raises(ResultTimeout):
            await hung.result(timeout=0.2)
        assert await hung.cancel() is True
        with pytest.raises(JobCancelled):
            await hung.result(timeout=1)
        assert await hung.cancel() is False


async def test_lost_notices_are_found_by_polling(client_settings):
    with EchoBackend(client_settings, notify=False):
        async with AsyncClient(client_settings) as client:
            start = time.monotonic()
            handles = await client.submit_many([{"prompt": f"l{i}"} for i in range(10)])
            seen = [h.id async for h in client.as_completed(handles, timeout=5)]
            assert sorted(seen) == sorted(h.id for h in handles)
            assert time.monotonic() - start < 2


async def test_close_deletes_the_reply_stream(backend, client_settings):
    client = AsyncClient(client_settings)
    await (await client.submit("bye")).result(timeout=5)
    start = time.monotonic()
    await client.close()
    assert time.monotonic() - start < 1.5
    async with AsyncClient(client_settings) as other:
        assert await other.redis.exists(client.reply_stream) == 0


async def test_invalid_request_raises_before_touching_redis():
    async with AsyncClient(redis_url="redis://127.0.0.1:1/0") as client:
        with pytest.raises(ValueError, match="exactly one"):
            await client.submit("x", prompt_token_ids=[1])


async def test_reusing_a_job_id_is_refused(backend, client_settings):
    async with AsyncClient(client_settings) as client:
        first = await (await client.submit("hello", id="a-job")).result(timeout=5)
        with pytest.raises(DuplicateJobId, match="'a-job' is already taken"):
            await client.submit("other", id="a-job")
        assert (await client.get("a-job")).output == first.output == "echo: hello"


async def test_result_rides_out_a_redis_restart(restartable_redis):
    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", poll_interval_s=0.2)
    async with AsyncClient(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
        one, two = await client.submit_many([{"prompt": "a"}, {"prompt": "b"}])

        def complete() -> None:
            conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
            for job in (one, two):
                Scripts(conn, settings.keys).finish(conn, JobResult(id=job.id, status=JobStatus.completed,
                                                                    output="after"), client.client_id)
            conn.close()

        restart = restartable_redis.outage(2.0, then=complete)
        assert (await one.result(timeout=15)).output == "after"
        assert [r.output for r in await client.wait_all([two], timeout=15)] == ["after"]
        restart.join(10)


async def test_submit_get_status_and_cancel_ride_out_a_redis_restart(restartable_redis):
    import threading

    def back_in(seconds: float) -> threading.Thread:
        restartable_redis.stop(save=True)
        thread = threading.Thread(target=lambda: (time.sleep(seconds), restartable_redis.start()), daemon=True)
        thread.start()
        return thread

    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", poll_interval_s=0.2)
    async with AsyncClient(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
        restart = back_in(1.0)
        handle = await client.submit("during", id="during")
        restart.join(10)
        restart = back_in(1.0)
        assert (await client.get("during")).status is JobStatus.queued
        restart.join(10)
        restart = back_in(1.0)
        assert await client.status("during") is JobStatus.queued
        restart.join(10)
        restart = back_in(1.0)
        assert await client.cancel("during") is True
        restart.join(10)
        assert (await handle.result(timeout=5, raise_on_error=False)).status is JobStatus.cancelled
        conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        assert conn.xlen(settings.keys.intake) == 1  # submitted once
        conn.close()


async def test_an_async_call_that_outlasts_its_retry_bound_raises_redis_unavailable(restartable_redis):
    from dio.client import RedisUnavailable

    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", client_retry_s=0.5)
    async with AsyncClient(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))
        restartable_redis.stop(save=True)
        for call in (lambda: client.submit("x"), lambda: client.get("x"), lambda: client.status("x"),
                     lambda: client.cancel("x")):
            start = time.monotonic()
            with pytest.raises(RedisUnavailable):
                await call()
            assert 0.5 <= time.monotonic() - start < 3.0
