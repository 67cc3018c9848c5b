"""One routing core: the dispatcher and the virtual replay decide the same way, from the same settings.

Both drivers hold a ``dio.dispatcher.router.Router`` built from a ``DispatcherSettings``. The test
gives them the same workers and the same requests and checks that they reject and place each
request identically — with ``shed_late`` on (hopeless requests are rejected at once) and off (they
are placed like any other) — so a setting means the same in the benchmark as in production.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis

from dio.client import Client, ClientSettings
from dio.dispatcher.backlog import Lateness, Pending
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.router import Reject, Router
from dio.dispatcher.service import Dispatcher
from dio.ops.bench.virtual import VirtualCluster
from dio.ops.traces import TraceRequest
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import JOB_FIELD
from dio.protocol.models import Request, WorkerTelemetry, to_hash

CLUSTER = "H100:1,A100-40GB:1,L4:1"
HOPELESS_MS = 1.0  # no GPU prefills thousands of tokens in a millisecond
RELAXED_MS = 600_000.0
# (prompt tokens, output tokens, deadline ms): every third request cannot make its deadline anywhere
# (and is marked sheddable: only such a request may be shed on a prediction); enough load that the
# others spread over two GPUs, so placements differ with the setting too.
REQUESTS = [(2000 + 700 * (i % 5), 200 + 60 * (i % 4), HOPELESS_MS if i % 3 == 1 else RELAXED_MS) for i in range(24)]
SHED = "cannot finish before its deadline"


def _settings(shed_late: bool, **more: object) -> DispatcherSettings:
    return DispatcherSettings(policy="dio", seed=0, shed_late=shed_late, **more)


def _virtual_decisions(shed_late: bool) -> list[str]:
    """Where each request went in the virtual replay: a worker id, or 'shed'."""
    virtual = VirtualCluster(CLUSTER, DEFAULT_MODEL, _settings(shed_late))
    _mark_hopeless_sheddable(virtual.router)
    trace = [TraceRequest(0.0, prompt, output) for prompt, output, _ in REQUESTS]
    outcomes = virtual.run(trace, [deadline for _, _, deadline in REQUESTS])
    assert all(o.status in ("completed", "rejected") for o in outcomes)
    return ["shed" if o.status == "rejected" and SHED in (o.reason or "") else str(o.worker) for o in outcomes]


def _mark_hopeless_sheddable(router: Router) -> None:
    """Mark the virtual replay's hopeless requests sheddable as they arrive, as the client marks them."""
    accept = router.accept

    def marked(item: Pending) -> Reject | None:
        item.request.sheddable = item.request.deadline_ms == HOPELESS_MS
        return accept(item)

    router.accept = marked  # type: ignore[method-assign]


def _register(conn: redis.Redis, settings: DispatcherSettings) -> list[str]:
    """Register the virtual cluster's workers in Redis, as their daemons would (alive for a minute)."""
    keys = settings.keys
    virtual = VirtualCluster(CLUSTER, DEFAULT_MODEL, settings)
    for info in virtual.cluster.infos:
        conn.hset(keys.worker(info.id), mapping={**to_hash(info), **to_hash(WorkerTelemetry())})
        conn.set(keys.alive(info.id), "1", ex=60)
        conn.sadd(keys.workers, info.id)
    return virtual.ids


def _dispatcher_decisions(shed_late: bool, settings, client_settings: ClientSettings) -> list[str]:
    """Where each request went through a real dispatcher on Redis: the queue it landed in, or 'shed'."""
    dispatcher_settings = _settings(shed_late, **settings.model_dump())
    conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    worker_ids = _register(conn, dispatcher_settings)
    with Client(client_settings) as client:
        handles = client.submit_many([{"prompt": f"request {i}", "num_prompt_tokens": prompt, "max_tokens": output,
                                       "model": DEFAULT_MODEL, "deadline_ms": deadline,
                                       "sheddable": deadline == HOPELESS_MS}
                                      for i, (prompt, output, deadline) in enumerate(REQUESTS)])
        dispatcher = Dispatcher(dispatcher_settings)
        thread = threading.Thread(target=dispatcher.run, daemon=True)
        thread.start()
        try:
            placed = _wait_for_placement(conn, dispatcher_settings, worker_ids, handles)
        finally:
            dispatcher.stop()
            thread.join(timeout=10)
    conn.close()
    return placed


def _wait_for_placement(conn: redis.Redis, settings: DispatcherSettings, worker_ids: list[str],
                        handles: list) -> list[str]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        where: dict[str, str] = {}
        for worker_id in worker_ids:
            for _, fields in conn.xrange(settings.keys.queue(worker_id)):
                where[fields[JOB_FIELD]] = worker_id
        for handle in handles:
            if conn.hget(settings.keys.job(handle.id), "status") == "rejected":
                reason = conn.hget(settings.keys.job(handle.id), "reason") or ""
                where[handle.id] = "shed" if SHED in reason else f"rejected: {reason}"
        if len(where) == len(handles):
            return [where[h.id] for h in handles]
        time.sleep(0.05)
    raise AssertionError(f"only {len(where)} of {len(handles)} requests were placed")


@pytest.mark.integration
@pytest.mark.parametrize("shed_late", [True, False])
def test_dispatcher_and_virtual_replay_make_the_same_decisions(shed_late, settings, client_settings) -> None:
    virtual = _virtual_decisions(shed_late)
    real = _dispatcher_decisions(shed_late, settings, client_settings)
    assert real == virtual
    hopeless = [i for i, (_, _, deadline) in enumerate(REQUESTS) if deadline == HOPELESS_MS]
    shed = [i for i, where in enumerate(virtual) if where == "shed"]
    assert shed == (hopeless if shed_late else [])  # the setting changes both drivers, the same way
    assert len({where for where in virtual if where != "shed"}) > 1  # a real placement decision, not one GPU


def test_the_router_takes_the_backlog_bound_from_the_settings() -> None:
    router = Router(_settings(True, max_backlog=2))
    items = [Pending(entry_id=f"e{i}", request=Request(id=f"r{i}", model=DEFAULT_MODEL, prompt="x", max_tokens=8),
                     request_json="", received_at=0.0) for i in range(3)]
    assert [router.accept(item) for item in items[:2]] == [None, None]
    shed = router.accept(items[2])
    assert isinstance(shed, Reject) and shed.reason.startswith("overloaded") and shed.retry_after_s
    assert len(router.backlog) == 2


def test_the_router_promotes_aged_batch_requests_ahead_of_later_interactive_ones() -> None:
    router = Router(_settings(True, batch_age_s=5.0))  # no worker yet: everything waits
    batch = Request(id="batch", model=DEFAULT_MODEL, prompt="x", max_tokens=8, tier="batch")
    router.accept(Pending(entry_id="b", request=batch, request_json="", received_at=0.0))
    assert router.route(now=4.0) == [] and [p.entry_id for p in router.backlog.in_order()] == ["b"]
    assert router.route(now=6.0) == []  # waited 6 s >= batch_age_s: promoted while it waits
    later = Request(id="later", model=DEFAULT_MODEL, prompt="x", max_tokens=8)
    router.accept(Pending(entry_id="i", request=later, request_json="", received_at=7.0))
    assert [p.entry_id for p in router.backlog.interactive] == ["b", "i"]  # served before later interactive work


def _waiting(router: Router, name: str, submitted_at: float, ttft_slo_ms: float | None = 1000.0) -> None:
    request = Request(id=name, model=DEFAULT_MODEL, prompt="x", max_tokens=8, ttft_slo_ms=ttft_slo_ms,
                      submitted_at=submitted_at)
    assert router.accept(Pending(entry_id=name, request=request, request_json="", received_at=submitted_at)) is None


def test_requests_past_their_ttft_limit_wait_behind_those_that_can_still_be_on_time() -> None:
    router = Router(_settings(True))  # no worker: everything waits, in the order it would be served
    _waiting(router, "old", 0.0)
    _waiting(router, "no-slo", 0.1, ttft_slo_ms=None)  # without a TTFT limit it is never late
    _waiting(router, "new", 1.5)
    assert router.route(now=1.6) == []  # "old" waited 1.6 s of its 1 s limit
    assert [p.entry_id for p in router.backlog.in_order()] == ["no-slo", "new", "old"]
    assert router.route(now=2.7) == []  # "new" is late now too: the late keep their arrival order
    assert [p.entry_id for p in router.backlog.in_order()] == ["no-slo", "old", "new"]


def test_one_fifo_line_when_late_last_is_off() -> None:
    router = Router(_settings(True, late_last=False))
    _waiting(router, "old", 0.0)
    _waiting(router, "new", 1.5)
    assert router.route(now=1.6) == []
    assert [p.entry_id for p in router.backlog.in_order()] == ["old", "new"]


def _pending(name: str, received_at: float, submitted_at: float | None = None) -> Pending:
    request = Request(id=name, model=DEFAULT_MODEL, prompt="x", max_tokens=8, ttft_slo_ms=1000.0,
                      submitted_at=received_at if submitted_at is None else submitted_at)
    return Pending(entry_id=name, request=request, request_json="", received_at=received_at)


def test_an_overloaded_cluster_counts_a_request_late_at_half_its_ttft_limit() -> None:
    lateness = Lateness()
    assert lateness.fraction == 1.0
    for i in range(200):  # dispatched after waiting 95% of their limit: the line's head starts too late
        lateness.dispatched(_pending(f"r{i}", received_at=0.0), now=0.95)
    assert lateness.overloaded and lateness.fraction == Lateness.OVERLOADED_FRACTION
    for i in range(200):  # then straight away again: the overload is over
        lateness.dispatched(_pending(f"s{i}", received_at=10.0), now=10.1)
    assert not lateness.overloaded and lateness.fraction == 1.0


def test_lateness_is_counted_on_the_dispatchers_clock_not_the_clients() -> None:
    router = Router(_settings(True))
    skewed = _pending("skewed", received_at=100.0, submitted_at=90.0)  # the client's clock 10 s behind
    assert router.accept(skewed) is None
    _waiting(router, "later", 100.2)
    assert router.route(now=100.5) == []
    assert [p.entry_id for p in router.backlog.in_order()] == ["skewed", "later"]  # waited 0.5 s here: on time
