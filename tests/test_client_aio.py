"""The asyncio client on a real Redis, against EchoBackend."""

from __future__ import annotations

import asyncio
import time

import pytest

from dio.client import AsyncClient, JobCancelled, JobFailed, JobRejected, JobStatus, ResultTimeout
from dio.client.testing import EchoBackend

pytestmark = pytest.mark.integration


async def test_submit_returns_the_completed_result(backend, client_settings):
    async with AsyncClient(client_settings) as client:
        handle = await client.submit("hello", max_tokens=4)
        result = await handle.result(timeout=5)
        assert (result.status, result.output) == (JobStatus.completed, "echo: hello")
        assert await handle.status() is JobStatus.completed and await handle.done()
        assert (await client.get(handle.id)).output == "echo: hello"


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
