"""A hand-off never queues a job at a worker that is gone: the request stays pending and is routed again."""

from __future__ import annotations

import redis

from dio.client import Client
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.service import Dispatcher
from dio.gpu_worker.sim.engine import SimEngine
from dio.protocol.connection import ensure_group
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import DISPATCHER_GROUP, JOB_FIELD
from dio.protocol.models import WorkerTelemetry, to_hash


def _register(conn: redis.Redis, keys, profile: str, worker_id: str) -> None:
    engine = SimEngine(profile, DEFAULT_MODEL)
    info = engine.capacity().worker_info(worker_id, engine.name)
    conn.hset(keys.worker(worker_id), mapping={**to_hash(info), **to_hash(WorkerTelemetry())})
    conn.set(keys.alive(worker_id), "1", ex=60)
    conn.sadd(keys.workers, worker_id)


def test_a_dispatcher_with_a_stale_view_routes_past_a_worker_that_is_gone(settings, client_settings) -> None:
    conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    dispatcher_settings = DispatcherSettings(**settings.model_dump(), worker_refresh_s=3600.0)
    keys = dispatcher_settings.keys
    _register(conn, keys, "H100", "gone-1")
    dispatcher = Dispatcher(dispatcher_settings)
    for stream in (keys.intake, keys.completions):
        ensure_group(dispatcher.redis, stream, DISPATCHER_GROUP)
    dispatcher.refresh_workers()  # its view: one live worker
    conn.delete(keys.alive("gone-1"))  # which dies before the next refresh is due
    _register(conn, keys, "T4", "live-1")  # and a worker it has not seen yet joins
    with Client(client_settings) as client:
        handle = client.submit("hello", max_tokens=8)
        dispatcher.step()  # routes on the stale view: the hand-off refuses the dead worker
        assert conn.xlen(keys.queue("gone-1")) == 0
        assert conn.xpending(keys.intake, DISPATCHER_GROUP)["pending"] == 1  # still pending, not lost
        for _ in range(3):
            dispatcher.step()  # the refresh it asked for: the dead worker goes, the new one joins
        queued = [fields[JOB_FIELD] for _, fields in conn.xrange(keys.queue("live-1"))]
        assert queued == [handle.id]
        assert conn.hget(keys.job(handle.id), "worker") == "live-1"
    conn.close()
