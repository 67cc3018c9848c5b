"""The dispatcher process on a real Redis, in a thread: what it does with bad bytes, outages and stale state."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from waiting import wait_for

from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.service import Dispatcher
from dio.protocol.connection import ensure_group
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import DISPATCHER_GROUP, REQUEST_FIELD, STATUS_FIELD, Keys
from dio.protocol.models import JobStatus, WorkerInfo, WorkerTelemetry, to_hash

pytestmark = pytest.mark.integration


class Running:
    """A dispatcher serving in a background thread; ``error`` is what killed it, if anything did."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.dispatcher.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.dispatcher.stop()
        self.thread.join(10)


def dispatcher_settings(redis_url: str, prefix: str) -> DispatcherSettings:
    return DispatcherSettings(redis_url=redis_url, key_prefix=prefix, block_ms=20, dispatcher_name="d1")


@pytest.fixture
def running(redis_url: str, redis_prefix: str) -> Iterator[Running]:
    serving = Running(Dispatcher(dispatcher_settings(redis_url, redis_prefix)))
    yield serving
    serving.stop()


def status(conn: redis.Redis, keys: Keys, job_id: str) -> str | None:
    raw = conn.hget(keys.job(job_id), STATUS_FIELD)
    return None if raw is None else raw.decode()


def test_bytes_that_are_not_utf8_are_rejected_or_dead_lettered(running, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url)  # bytes in, bytes out
    raw.xadd(keys.intake, {REQUEST_FIELD.encode(): b'{"id": "bad-utf8", "prompt": "caf\xe9 \xff"}'})
    raw.xadd(keys.intake, {REQUEST_FIELD.encode(): b"\xff\xfe not even json"})
    raw.xadd(keys.intake, {b"\xc3(": b"a field name that is not UTF-8"})
    raw.xadd(keys.intake, {REQUEST_FIELD: json.dumps({"id": "after", "prompt": "x", "max_tokens": -1})})
    wait_for(lambda: status(raw, keys, "after") == JobStatus.rejected.value, what="the request after them")
    assert status(raw, keys, "bad-utf8") == JobStatus.rejected.value
    assert "UTF-8" in raw.hget(keys.job("bad-utf8"), "reason").decode()
    dead = raw.xrange(keys.deadletter)
    assert len(dead) == 2
    assert dead[0][1][b"raw"] == b"\xff\xfe not even json"  # kept byte for byte, for an operator
    assert raw.xpending(keys.intake, "dispatchers")["pending"] == 0
    assert running.thread.is_alive() and running.error is None


def test_the_dispatcher_rides_out_a_redis_restart(restartable_redis, caplog):
    caplog.set_level(logging.INFO, logger="dio.dispatcher")
    keys = Keys("{d}:")
    dispatcher = Dispatcher(dispatcher_settings(restartable_redis.url, keys.prefix))
    dispatcher.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
    serving = Running(dispatcher)
    conn = redis.Redis.from_url(restartable_redis.url, decode_responses=True)
    try:
        wait_for(lambda: conn.get(keys.lease) == "d1", what="the lease")
        restartable_redis.stop(save=False)  # it comes back empty: no consumer groups, no lease
        time.sleep(2.0)
        restartable_redis.start()
        conn.xadd(keys.intake, {REQUEST_FIELD: json.dumps({"id": "after", "prompt": "x", "max_tokens": -1})})
        wait_for(lambda: conn.hget(keys.job("after"), STATUS_FIELD) == JobStatus.rejected.value, timeout_s=8,
                 what="the request sent after the restart")
        assert serving.thread.is_alive() and serving.error is None
        lost = [r for r in caplog.records if "lost Redis" in r.getMessage()]
        back = [r for r in caplog.records if "Redis is back" in r.getMessage()]
        assert len(lost) == 1 and len(back) == 1
    finally:
        serving.stop()
        conn.close()
    assert serving.error is None


def register_worker(conn: redis.Redis, keys: Keys, worker_id: str = "W") -> None:
    """Register a worker as its daemon would (alive for a minute)."""
    info = WorkerInfo(id=worker_id, engine="instant", model=DEFAULT_MODEL, gpu="instant", kv_capacity_tokens=100_000,
                      kv_bytes_per_token=0, max_num_seqs=8, max_model_len=100_000)
    conn.hset(keys.worker(worker_id), mapping={**to_hash(info), **to_hash(WorkerTelemetry())})
    conn.set(keys.alive(worker_id), "1", ex=60)
    conn.sadd(keys.workers, worker_id)


def test_a_hand_off_that_is_not_forwarded_reserves_nothing(redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    register_worker(conn, keys)
    conn.hset(keys.job("cancelled"), STATUS_FIELD, JobStatus.cancelled.value)  # by its client, while queued
    conn.xadd(keys.intake, {REQUEST_FIELD: json.dumps({"id": "cancelled", "prompt": "x", "max_tokens": 8})})
    dispatcher = Dispatcher(dispatcher_settings(redis_url, redis_prefix))
    ensure_group(conn, keys.intake, DISPATCHER_GROUP)
    ensure_group(conn, keys.completions, DISPATCHER_GROUP)
    dispatcher.refresh_workers()
    for _ in range(3):
        dispatcher.step()
    assert dispatcher.stats["dispatched"] == 1  # routed, then dropped by handoff.lua
    assert conn.xlen(keys.queue("W")) == 0 and conn.hgetall(keys.reserved("W")) == {}
    assert int(dispatcher.cluster.reserved_kv[dispatcher.cluster.index["W"]]) == 0
    conn.close()


def test_the_reservation_sync_frees_the_reservations_of_ended_jobs(redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    register_worker(conn, keys)
    # A reservation left behind by a job that ended (finished by another worker after a requeue),
    # one whose job hash expired, and one of a job still running there.
    conn.hset(keys.reserved("W"), mapping={"ended": 100, "expired": 200, "running": 300})
    conn.hset(keys.job("ended"), mapping={STATUS_FIELD: JobStatus.completed.value, "worker": "other"})
    conn.hset(keys.job("running"), mapping={STATUS_FIELD: JobStatus.running.value, "worker": "W"})
    dispatcher = Dispatcher(dispatcher_settings(redis_url, redis_prefix))
    dispatcher.refresh_workers()
    dispatcher.sync_reservations()
    assert conn.hgetall(keys.reserved("W")) == {"running": "300"}
    row = dispatcher.cluster.index["W"]
    assert int(dispatcher.cluster.reserved_kv[row]) == 300
    conn.close()


def test_a_job_that_killed_max_attempts_workers_is_failed_and_dead_lettered_with_its_history(redis_url,
                                                                                              redis_prefix):
    from dio.protocol.defaults import MAX_ATTEMPTS

    keys = Keys(redis_prefix)
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    request = {"id": "poison", "prompt": "x" * 5000, "max_tokens": 8, "reply_to": "someone"}
    conn.hset(keys.job("poison"), mapping={STATUS_FIELD: JobStatus.queued.value, "reply_to": "someone"})
    conn.xadd(keys.intake, {REQUEST_FIELD: json.dumps(request)})
    dispatcher = Dispatcher(dispatcher_settings(redis_url, redis_prefix))
    ensure_group(conn, keys.intake, DISPATCHER_GROUP)
    ensure_group(conn, keys.completions, DISPATCHER_GROUP)
    workers = [f"W{i}" for i in range(MAX_ATTEMPTS)]
    for worker_id in workers:
        register_worker(conn, keys, worker_id)
        dispatcher.refresh_workers()
        wait_for(lambda w=worker_id: (dispatcher.step() or True) and conn.xlen(keys.queue(w)) == 1,
                 what=f"the hand-off to {worker_id}")
        assert conn.hget(keys.job("poison"), "worker") == worker_id
        conn.delete(keys.alive(worker_id))  # it died running the job
        dispatcher.refresh_workers()  # its heartbeat is gone: the registry takes the job back
    assert conn.hget(keys.job("poison"), STATUS_FIELD) == JobStatus.failed.value
    assert conn.xlen(keys.reply("someone")) == 1  # its client is told
    dead = conn.xrange(keys.deadletter)
    assert len(dead) == 1
    entry = dead[0][1]
    assert entry["job"] == "poison"
    assert int(entry["attempts"]) == MAX_ATTEMPTS
    assert json.loads(entry["workers"]) == workers
    assert entry["raw"] == json.dumps(request)[:2000]
    assert "died 3 times" in entry["error"]
    conn.close()
