"""The worker daemon on a real Redis, in-process with the instant engine: restarts, stalls, outages, owners."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterable

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dio.gpu_worker import daemon as daemon_module
from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.daemon import WorkerDaemon, WorkerIdInUse
from dio.gpu_worker.engine import EngineOutput, EngineRequest
from dio.gpu_worker.instant import InstantEngine
from dio.protocol.keys import JOB_FIELD, REQUEST_FIELD, STATUS_FIELD, WORKER_GROUP, Keys
from dio.protocol.models import JobStatus, Request
from dio.protocol.scripts import AsyncScripts

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
        await wait_for(lambda: _empty(conn, keys), what="the entry to be acknowledged")
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
        assert await conn.hget(keys.job("twice"), "worker") == "stalled"
    finally:
        daemon.stop()
        await task


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


# --- superseded copies: a job requeued after a stall runs once --------------------------------------


class SlowEngine(InstantEngine):
    """Run each request for ``seconds`` unless aborted first; record what started, finished and was aborted.

    An abort takes ``abort_s`` to end the request's stream (vLLM's takes a step or so).
    """

    name = "slow"

    def __init__(self, seconds: float, abort_s: float = 0.0) -> None:
        super().__init__()
        self.seconds = seconds
        self.abort_s = abort_s
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self._aborts: dict[str, asyncio.Event] = {}

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.started.append(request.id)
        abort = self._aborts[request.id] = asyncio.Event()
        try:
            await asyncio.wait_for(abort.wait(), self.seconds)
        except TimeoutError:
            self.finished.append(request.id)
            yield EngineOutput(output_tokens=request.max_tokens, text="done", finished=True, finish_reason="length",
                               prompt_tokens=request.prompt_tokens)
            return
        finally:
            self._aborts.pop(request.id, None)
        await asyncio.sleep(self.abort_s)
        yield EngineOutput(finished=True, finish_reason="abort", prompt_tokens=request.prompt_tokens)

    async def abort(self, request_id: str) -> None:
        if (event := self._aborts.get(request_id)) is not None and not event.is_set():
            self.aborted.append(request_id)
            event.set()


@pytest.fixture
def quick_checks(monkeypatch):
    """Check the jobs in flight every 50 ms, not every 0.5 s."""
    monkeypatch.setattr(daemon_module, "CANCEL_CHECK_INTERVAL_S", 0.05)


async def _take_back(conn: aioredis.Redis, keys: Keys, worker: str) -> None:
    """What the dispatcher does once a stalled worker's heartbeat expired: requeue.lua on each queue entry."""
    scripts = AsyncScripts(conn, keys)
    for entry_id, fields in await conn.xrange(keys.queue(worker)):
        assert await scripts.requeue(conn, worker, entry_id, fields[JOB_FIELD], fields[REQUEST_FIELD]) == 1


async def test_a_copy_handed_elsewhere_after_a_stall_is_aborted_and_the_job_runs_once(conn, redis_url, redis_prefix,
                                                                                       quick_checks):
    keys = Keys(redis_prefix)
    stalled_engine, other_engine = SlowEngine(seconds=3.0), SlowEngine(seconds=0.3)
    stalled = WorkerDaemon(worker_settings(redis_url, redis_prefix), stalled_engine, WORKER)
    other = WorkerDaemon(worker_settings(redis_url, redis_prefix), other_engine, "W2")
    tasks = [asyncio.create_task(stalled.run()), asyncio.create_task(other.run())]
    try:
        await hand_off(conn, keys, "moved", kv_tokens=100)
        await wait_for(lambda: _is(stalled_engine.started, ["moved"]), what="the first copy to start")
        await _take_back(conn, keys, WORKER)  # its heartbeat lapsed: requeued, then routed to W2
        await hand_off(conn, keys, "moved", worker="W2", kv_tokens=100)
        await wait_status(conn, keys, ["moved"], JobStatus.completed)
        assert await conn.hget(keys.job("moved"), "worker") == "W2"
        await wait_for(lambda: _is(stalled_engine.aborted, ["moved"]), timeout_s=2, what="the superseded copy's abort")
        assert stalled_engine.finished == [] and other_engine.finished == ["moved"]  # ran to the end once
        await wait_for(lambda: _empty(conn, keys), what="the superseded entry to be acknowledged")
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
        assert await conn.hget(keys.job("moved"), STATUS_FIELD) == JobStatus.completed.value  # not "cancelled"
        assert stalled.counters.completed == 0 and other.counters.completed == 1
    finally:
        stalled.stop()
        other.stop()
        await asyncio.gather(*tasks)


@pytest.mark.parametrize(("status", "owner"), [(JobStatus.dispatched, "W2"),  # requeued, then handed to W2
                                               (JobStatus.queued, WORKER)])  # requeued, waiting on the intake
async def test_a_worker_does_not_start_a_job_that_was_taken_back(conn, redis_url, redis_prefix, status, owner):
    keys = Keys(redis_prefix)
    # The worker read the entry before its stall; meanwhile the dispatcher took the job back.
    await hand_off(conn, keys, "taken", kv_tokens=100)
    await conn.hset(keys.job("taken"), mapping={STATUS_FIELD: status.value, "worker": owner})
    engine = SlowEngine(seconds=0.1)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), engine, WORKER)
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: _empty(conn, keys), what="the entry to be acknowledged")
        assert engine.started == []
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
        assert await conn.hmget(keys.job("taken"), [STATUS_FIELD, "worker"]) == [status.value, owner]
    finally:
        daemon.stop()
        await task


async def test_a_job_handed_back_to_the_worker_still_running_it_runs_once(conn, redis_url, redis_prefix,
                                                                          quick_checks):
    keys = Keys(redis_prefix)
    engine = SlowEngine(seconds=1.0)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), engine, WORKER)
    task = asyncio.create_task(daemon.run())
    try:
        await hand_off(conn, keys, "again", kv_tokens=100)
        await wait_for(lambda: _is(engine.started, ["again"]), what="the first copy to start")
        await _take_back(conn, keys, WORKER)  # a stall: requeued, then routed to the same worker
        await hand_off(conn, keys, "again", kv_tokens=100)
        await wait_status(conn, keys, ["again"], JobStatus.completed)
        await wait_for(lambda: _empty(conn, keys), what="the new entry to be acknowledged")
        assert engine.started == ["again"] and engine.finished == ["again"] and engine.aborted == []
        assert (await conn.xpending(keys.queue(WORKER), WORKER_GROUP))["pending"] == 0
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
    finally:
        daemon.stop()
        await task


async def test_a_job_handed_back_while_its_copy_here_is_being_aborted_runs_again(conn, redis_url, redis_prefix,
                                                                                quick_checks):
    keys = Keys(redis_prefix)
    engine = SlowEngine(seconds=0.5, abort_s=0.5)
    daemon = WorkerDaemon(worker_settings(redis_url, redis_prefix), engine, WORKER)
    task = asyncio.create_task(daemon.run())
    try:
        await hand_off(conn, keys, "back", kv_tokens=100)
        await wait_for(lambda: _is(engine.started, ["back"]), what="the first copy to start")
        await _take_back(conn, keys, WORKER)
        await hand_off(conn, keys, "back", worker="W2", kv_tokens=100)  # W2 gets it, and dies at once
        await wait_for(lambda: _is(engine.aborted, ["back"]), timeout_s=2, what="the superseded copy's abort")
        await _take_back(conn, keys, "W2")
        await hand_off(conn, keys, "back", kv_tokens=100)  # back here, while the abort is under way
        await wait_status(conn, keys, ["back"], JobStatus.completed)
        assert await conn.hget(keys.job("back"), "worker") == WORKER
        assert engine.started == ["back", "back"] and engine.finished == ["back"]
        await wait_for(lambda: _empty(conn, keys), what="the entry to be acknowledged")
        assert (await conn.xpending(keys.queue(WORKER), WORKER_GROUP))["pending"] == 0
        assert await conn.hgetall(keys.reserved(WORKER)) == {}
    finally:
        daemon.stop()
        await task


async def _is(value: list[str], expected: list[str]) -> bool:
    return value == expected
