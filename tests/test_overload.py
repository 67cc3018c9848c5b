"""Overload: the backlog's bounds (requests and bytes), rejections at once with a drain-time retry-after,
reasons always in words, and cancelled requests leaving the dispatcher promptly.

The router tests are pure (no Redis): the clock is the ``now`` each call is given. The dispatcher
tests run a real ``Dispatcher`` in a thread on the test Redis, with no worker registered, so every
request waits in the backlog until it leaves for the reason under test.
"""

from __future__ import annotations

import gc
import threading
import tracemalloc
from collections.abc import Iterator

import pytest
import redis
from waiting import wait_for

from dio.client import Client
from dio.dispatcher.backlog import Pending
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.router import Reject, Router
from dio.dispatcher.service import Dispatcher
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import DISPATCHER_GROUP
from dio.protocol.models import Completion, JobStatus, Request


def _settings(**more: object) -> DispatcherSettings:
    fields: dict = {"policy": "dio", "seed": 7, "max_wait_s": 600.0, **more}
    return DispatcherSettings(**fields)


def _item(i: int, now: float = 0.0, prompt: str = "x", **fields: object) -> Pending:
    request = Request(id=f"r{i}", model=DEFAULT_MODEL, prompt=prompt, max_tokens=8, submitted_at=now, **fields)
    return Pending(entry_id=f"e{i}", request=request, request_json=request.to_json(), received_at=now)


def _drain_at(router: Router, per_s: int, seconds: int, start: float = 0.0) -> float:
    """Let ``per_s`` jobs end every second for ``seconds`` while the backlog waits; return the clock."""
    now = start
    for _ in range(seconds * 2):
        for j in range(per_s // 2):
            router.ended(Completion(job=f"done-{now}-{j}", worker="gone", status=JobStatus.completed))
        now += 0.5
        router.route(now)
    return now


# --- the bounds ---------------------------------------------------------------------------------


def test_the_backlog_is_bounded_in_bytes_of_request_json_as_well_as_in_requests() -> None:
    big = "x" * 4_000  # each request's JSON is a little over 4 KB
    router = Router(_settings(max_backlog=3, max_backlog_bytes=10_000))
    assert [router.accept(_item(i, prompt=big)) for i in range(2)] == [None, None]
    shed = router.accept(_item(2, prompt=big))  # 3 requests would fit, 12 KB would not
    assert isinstance(shed, Reject) and shed.reason.startswith("overloaded: ")
    assert "bytes" in shed.reason and shed.retry_after_s
    assert len(router.backlog) == 2 and router.backlog.bytes == sum(p.size_bytes for p in router.backlog.in_order())
    assert router.accept(_item(3)) is None  # a small one still fits: 3 requests
    by_count = router.accept(_item(4))
    assert isinstance(by_count, Reject) and by_count.reason.startswith("overloaded: 3 requests")
    router.route(now=1.0)
    router.forget_backlog()
    assert router.backlog.bytes == 0


def test_a_request_json_counts_its_utf8_bytes() -> None:
    assert _item(0, prompt="é" * 1000).size_bytes == len(_item(0, prompt="é" * 1000).request_json.encode())


# --- retry-after: the predicted drain time, jittered ----------------------------------------------


def test_retry_after_is_the_backlogs_drain_time_with_seeded_jitter() -> None:
    def shed_hints(seed: int) -> list[float]:
        router = Router(_settings(max_backlog=50, seed=seed))
        for i in range(50):  # no worker registered: they all wait
            assert router.accept(_item(i)) is None
        now = _drain_at(router, per_s=10, seconds=10)  # the cluster ends 10 jobs a second
        sheds = [router.accept(_item(100 + i, now)) for i in range(20)]
        assert all(isinstance(s, Reject) and s.reason.startswith("overloaded") for s in sheds)
        return [s.retry_after_s for s in sheds if s is not None and s.retry_after_s is not None]

    hints = shed_hints(seed=7)
    assert len(hints) == 20
    assert all(5.0 * 0.75 <= h <= 5.0 * 1.25 for h in hints), hints  # 50 waiting / 10 per s = 5 s, ±25%
    assert len(set(hints)) > 10  # spread out: the clients do not all come back at once
    assert shed_hints(seed=7) == hints  # the settings' seed makes it reproducible
    assert shed_hints(seed=8) != hints


def test_an_interactive_request_that_cannot_start_before_its_deadline_is_rejected_at_once() -> None:
    router = Router(_settings(max_backlog=10_000))
    for i in range(100):
        assert router.accept(_item(i)) is None
    now = _drain_at(router, per_s=10, seconds=10)  # 100 waiting at 10 per s: about 10 s to drain
    hopeless = router.accept(_item(200, now, deadline_ms=2_000))
    assert isinstance(hopeless, Reject) and hopeless.reason.startswith("overloaded: ")
    assert "drain" in hopeless.reason and 7.5 <= (hopeless.retry_after_s or 0) <= 12.5
    assert router.accept(_item(201, now, deadline_ms=60_000)) is None  # 60 s is enough
    assert router.accept(_item(202, now, deadline_ms=2_000, tier="batch")) is None  # batch waits as long as it takes


def test_a_burst_that_cannot_start_before_its_deadlines_is_rejected_once_the_drain_rate_is_known() -> None:
    router = Router(_settings(max_wait_s=20.0))
    for i in range(300):  # all at once, before anything ended: nothing to predict from yet
        assert router.accept(_item(i)) is None
    rejected: list[Reject] = []
    now = 0.0
    for _ in range(8):  # 4 s of 10 jobs ending per second
        for j in range(5):
            router.ended(Completion(job=f"done-{now}-{j}", worker="gone", status=JobStatus.completed))
        now += 0.5
        rejected += [a for a in router.route(now) if isinstance(a, Reject)]
    # At 10 a second, the first ~160 can start within their 20 s; the rest are told now, not at 20 s.
    assert 100 <= len(rejected) <= 160
    assert all(r.reason.startswith("overloaded: ") and "drain" in r.reason for r in rejected)
    assert min(int(r.item.entry_id[1:]) for r in rejected) >= 150  # the last in line
    assert len(router.backlog) == 300 - len(rejected)


def test_a_backlog_that_is_not_draining_rejects_nothing_early() -> None:
    router = Router(_settings())
    for i in range(100):
        assert router.accept(_item(i)) is None
    router.route(now=1.0)  # nothing ended yet: no rate to predict from
    assert router.accept(_item(200, 1.0, deadline_ms=2_000)) is None


# --- reasons ------------------------------------------------------------------------------------


def test_every_rejection_reason_is_in_words() -> None:
    router = Router(_settings(max_wait_s=1.0))
    for i in range(300):  # more than one route looks at before it calls the cluster full
        router.accept(_item(i))
    assert router.route(now=0.5) == []
    rejects = router.route(now=2.0)
    leftovers = Router(_settings())
    for i in range(300):
        leftovers.accept(_item(i))
    given_up = leftovers.give_up()
    assert len(rejects) == 300 and len(given_up) == 300
    for reject in [*rejects, *given_up]:
        assert isinstance(reject, Reject) and reject.reason and "None" not in reject.reason, reject.reason


# --- the dispatcher: cancelled requests and memory --------------------------------------------------


class Serving:
    """A dispatcher serving in a background thread."""

    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.thread = threading.Thread(target=dispatcher.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.dispatcher.stop()
        self.thread.join(10)


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def _dispatcher(settings, **more: object) -> Dispatcher:
    return Dispatcher(DispatcherSettings(**{**settings.model_dump(), "block_ms": 20, "dispatcher_name": "d1",
                                            "max_wait_s": 60.0, **more}))


def _pending(conn: redis.Redis, settings) -> int:
    return conn.xpending(settings.keys.intake, DISPATCHER_GROUP)["pending"]


@pytest.mark.integration
def test_a_cancelled_waiting_request_leaves_the_intake_and_the_dispatcher_promptly(settings, client_settings, conn):
    serving = Serving(_dispatcher(settings))
    try:
        with Client(client_settings) as client:
            handles = [client.submit("wait", max_tokens=4) for _ in range(3)]
            wait_for(lambda: len(serving.dispatcher.backlog) == 3, what="the backlog to hold all three")
            assert client.cancel(handles[1].id)
            wait_for(lambda: len(serving.dispatcher.backlog) == 2, timeout_s=3, what="the cancelled one to leave")
            assert conn.xlen(settings.keys.intake) == 2 and _pending(conn, settings) == 2
            assert {p.request.id for p in serving.dispatcher.backlog.in_order()} == {handles[0].id, handles[2].id}
    finally:
        serving.stop()


@pytest.mark.integration
def test_past_the_byte_bound_requests_are_rejected_at_once_and_what_left_is_freed(settings, client_settings, conn):
    prompt = "x" * 400_000
    tracemalloc.start()
    try:
        serving = Serving(_dispatcher(settings, max_backlog_bytes=4_000_000, max_wait_s=2.0))
        try:
            with Client(client_settings) as client:
                gc.collect()
                before = tracemalloc.get_traced_memory()[0]
                handles = [client.submit(prompt, max_tokens=4) for _ in range(30)]  # 12 MB of requests
                results = client.wait_all(handles, timeout=10)
                assert all(r.status == JobStatus.rejected for r in results)
                shed = [r for r in results if (r.reason or "").startswith("overloaded")]
                assert len(shed) >= 20  # at most 9 or so fit in 4 MB
                assert all(r.finished_at - r.submitted_at < 1.0 for r in shed)  # at once, not after max_wait_s
                assert all(r.retry_after_s for r in shed)
                wait_for(lambda: len(serving.dispatcher.backlog) == 0, what="the backlog to empty")
                assert serving.dispatcher.backlog.bytes == 0
                del handles, results, shed
                gc.collect()
                held = tracemalloc.get_traced_memory()[0] - before
                assert held < 2_000_000, f"{held} bytes still held after every request left"
        finally:
            serving.stop()
    finally:
        tracemalloc.stop()
    assert conn.xlen(settings.keys.intake) == 0
