"""The worker daemon on a real Redis, in-process with the instant engine: restarts, stalls, outages, owners."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.daemon import WorkerDaemon, WorkerIdInUse
from dio.gpu_worker.instant import InstantEngine
from dio.protocol.keys import JOB_FIELD, REQUEST_FIELD, STATUS_FIELD, WORKER_GROUP, Keys
from dio.protocol.models import JobStatus, Request

pytestmark = pytest.mark.integration

WORKER = "W1"


def worker_settings(redis_url: str, prefix: str, **more: object) -> WorkerSettings:
    """Fast heartbeats, so that lapses and take-overs happen within a test's second."""
    fields: dict = {"redis_url": redis_url, "key_prefix": prefix, "engine": "instant", "heartbeat_interval_s": 0.1,
                    "heartbeat_ttl_s": 0.6, "read_block_ms": 50, **more}
    return WorkerSettings(**fields)


async def hand_off(conn: aioredis.Redis, keys: Keys, job_id: str, worker: str = WORKER, kv_tokens: int = 0) -> None:
    """Put one job on a worker's queue, as handoff.lua does (job hash ``dispatched``, KV reserved)."""
    request = Request(id=job_id, prompt="x", max_tokens=2)
    await conn.hset(keys.job(job_id), mapping={STATUS_FIELD: JobStatus.dispatched.value, "worker": worker})
    if kv_tokens:
        await conn.hset(keys.reserved(worker), job_id, kv_tokens)
    await conn.xadd(keys.queue(worker), {JOB_FIELD: job_id, REQUEST_FIELD: request.to_json()})


async def wait_for(predicate, timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if await predicate():
                return
        except redis.ConnectionError:
            pass  # the test's own connection, across a Redis restart
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def wait_status(conn: aioredis.Redis, keys: Keys, job_ids: Iterable[str], status: JobStatus,
                      timeout_s: float = 5.0) -> None:
    ids = list(job_ids)

    async def ended() -> bool:
        return all([await conn.hget(keys.job(j), STATUS_FIELD) == status.value for j in ids])

    await wait_for(ended, timeout_s, f"{ids} to be {status.value}")


@pytest.fixture
async def conn(redis_url: str):
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


class CountingReads:
    """Count a daemon's XREADGROUP calls (a spinning read loop makes thousands a second)."""

    def __init__(self, daemon: WorkerDaemon) -> None:
        self.calls = 0
        original = daemon.redis.xreadgroup

        async def counted(*args, **kwargs):
            self.calls += 1
            return await original(*args, **kwargs)

        daemon.redis.xreadgroup = counted  # type: ignore[method-assign]


async def test_a_restarted_worker_runs_its_pending_entries_then_reads_new_work(conn, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    queue = keys.queue(WORKER)
    # What the previous process with this id left: two entries it had read and not finished.
    await conn.xgroup_create(queue, WORKER_GROUP, id="0", mkstream=True)
    await hand_off(conn, keys, "old-1")
    await hand_off(conn, keys, "old-2")
    await conn.xreadgroup(WORKER_GROUP, WORKER, {queue: ">"}, count=10)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    reads = CountingReads(daemon)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_status(conn, keys, ["old-1", "old-2"], JobStatus.completed)
        await hand_off(conn, keys, "new-1")
        await wait_status(conn, keys, ["new-1"], JobStatus.completed, timeout_s=3)
        before = reads.calls
        await asyncio.sleep(0.5)
        assert reads.calls - before <= 20  # blocking reads of 50 ms, not a spin
    finally:
        daemon.stop()
        await task


async def test_a_worker_whose_heartbeat_lapsed_registers_again(conn, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: conn.sismember(keys.workers, WORKER), what="registration")
        # What the dispatcher does once a stalled worker's alive key expired: forget it.
        await conn.delete(keys.alive(WORKER), keys.worker(WORKER))
        await conn.srem(keys.workers, WORKER)
        await wait_for(lambda: conn.sismember(keys.workers, WORKER), timeout_s=2, what="re-registration")
        assert await conn.get(keys.alive(WORKER)) == daemon.token
        assert await conn.hget(keys.worker(WORKER), "gpu") == "instant"
        await hand_off(conn, keys, "after-stall")
        await wait_status(conn, keys, ["after-stall"], JobStatus.completed)
    finally:
        daemon.stop()
        await task


async def test_a_second_process_with_a_live_workers_id_is_refused(conn, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    first = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    task = asyncio.create_task(first.run())
    try:
        await wait_for(lambda: conn.sismember(keys.workers, WORKER), what="registration")
        second = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
        with pytest.raises(WorkerIdInUse, match=f"worker id {WORKER} is in use"):
            await second.start()
        await second.leave()  # leaving never removes the owner's registration
        assert await conn.get(keys.alive(WORKER)) == first.token
        await hand_off(conn, keys, "still-served")
        await wait_status(conn, keys, ["still-served"], JobStatus.completed)
    finally:
        first.stop()
        await task
    assert not await conn.exists(keys.alive(WORKER))  # the owner, leaving, removed its own


def test_the_worker_command_refuses_a_taken_id_in_one_line(redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    conn.set(keys.alive(WORKER), "another-process-token", px=30_000)  # a live owner keeps renewing it
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": redis_prefix, "DIO_HEARTBEAT_TTL_S": "0.5",
           "DIO_HEARTBEAT_INTERVAL_S": "0.1"}
    done = subprocess.run([sys.executable, "-m", "dio.ops.cli", "worker", "--engine", "instant", "--id", WORKER],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: worker id W1 is in use by another process"), done.stderr
    assert conn.get(keys.alive(WORKER)) == "another-process-token"
    assert not conn.sismember(keys.workers, WORKER)
    conn.close()


async def test_a_restart_waits_out_the_dead_predecessors_heartbeat(conn, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    await conn.set(keys.alive(WORKER), "dead-process-token", px=400)  # SIGKILLed: nobody renews it
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    await daemon.start()
    try:
        assert await conn.get(keys.alive(WORKER)) == daemon.token
    finally:
        await daemon.leave()


async def test_the_start_of_a_job_finished_elsewhere_releases_its_reservation(conn, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    # The job was requeued from a stalled worker and handed to W1; the stalled one then finished it.
    await hand_off(conn, keys, "twice", kv_tokens=500)
    await conn.hset(keys.job("twice"), mapping={STATUS_FIELD: JobStatus.completed.value, "worker": "stalled"})
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    task = asyncio.create_task(daemon.run())
    try:
        try:
            await wait_for(lambda: _empty(conn, keys), timeout_s=2, what="the entry to be acknowledged")
        except AssertionError:
            print("WAIT FAILED", await conn.xlen(keys.queue(WORKER)), await conn.xinfo_groups(keys.queue(WORKER)), await conn.xpending(keys.queue(WORKER), "workers"))
            for t in asyncio.all_tasks(): t.print_stack(limit=6)
            raise
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
        assert await conn.hget(keys.job("twice"), "worker") == "stalled"
    finally:
        daemon.stop()
        try:
            await asyncio.wait_for(asyncio.shield(task), 2)
        except TimeoutError:
            print("TASK HANG")
            for t in asyncio.all_tasks():
                c = t.get_coro(); print("TASK", t)
                while c is not None:
                    fr = getattr(c, "cr_frame", None) or getattr(c, "ag_frame", None) or getattr(c, "gi_frame", None)
                    print("   ", getattr(c, "__qualname__", c), fr.f_lineno if fr else None)
                    c = getattr(c, "cr_await", None) or getattr(c, "gi_yieldfrom", None) or getattr(c, "ag_await", None)
            raise


async def _empty(conn: aioredis.Redis, keys: Keys) -> bool:
    return await conn.xlen(keys.queue(WORKER)) == 0


async def test_a_crashed_flush_is_restarted_and_every_result_written(conn, redis_url, redis_prefix, caplog):
    keys = Keys(redis_prefix)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), InstantEngine(), WORKER)
    original, crashes = daemon.scripts.finish, []

    def crash_once(*args, **kwargs):
        if not crashes:
            crashes.append(1)
            raise RuntimeError("a bug in the flush")
        return original(*args, **kwargs)

    daemon.scripts.finish = crash_once  # type: ignore[method-assign]
    task = asyncio.create_task(daemon.run())
    try:
        await hand_off(conn, keys, "through-a-crash")
        await wait_status(conn, keys, ["through-a-crash"], JobStatus.completed)
        assert crashes and "flush" in caplog.text
    finally:
        daemon.stop()
        await task


async def test_a_worker_rides_out_a_redis_restart(restartable_redis, caplog):
    caplog.set_level(logging.INFO, logger="dio.worker")
    prefix = "{w}:"
    keys = Keys(prefix)
    conn = aioredis.Redis.from_url(restartable_redis.url, decode_responses=True)
    daemon = WorkerDaemon(worker_settings(restartable_redis.url, prefix), InstantEngine(), WORKER)
    daemon.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no hidden retries
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: conn.sismember(keys.workers, WORKER), what="registration")
        restartable_redis.stop(save=False)  # comes back empty: no group, no registration
        await asyncio.sleep(2.0)
        restartable_redis.start()
        await wait_for(lambda: conn.sismember(keys.workers, WORKER), what="re-registration")
        await hand_off(conn, keys, "after-restart")
        await wait_status(conn, keys, ["after-restart"], JobStatus.completed)
        assert not task.done()
        lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
        back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
        assert len(lost) == 1 and len(back) == 1
    finally:
        daemon.stop()
        await task
        await conn.aclose()
