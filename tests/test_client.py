"""The sync client on a real Redis, against EchoBackend (the real finish script, no inference)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from dio.client import (
    Client,
    ClientSettings,
    DIOError,
    DuplicateJobId,
    JobCancelled,
    JobFailed,
    JobRejected,
    JobStatus,
    Request,
    ResultTimeout,
    Tier,
)
from dio.client.testing import EchoBackend
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import REQUEST_FIELD, STATUS_FIELD
from dio.protocol.models import JobResult
from dio.protocol.scripts import Scripts

pytestmark = pytest.mark.integration


def test_submit_returns_the_completed_result(backend, client):
    result = client.submit("hello", max_tokens=8).result(timeout=5)
    assert result.status is JobStatus.completed
    assert result.output == "echo: hello"
    assert result.worker == "echo-worker"
    sent = backend.seen[0]
    assert (sent.max_tokens, sent.model, sent.tier, sent.reply_to) == (8, DEFAULT_MODEL, Tier.interactive,
                                                                       client.client_id)


def test_submit_writes_the_job_hash_and_the_intake_entry(client):
    handle = client.submit(prompt_token_ids=[5, 6], tier="batch", metadata={"user": "u1"}, id="job-1")
    fields = client.redis.hgetall(client.keys.job("job-1"))
    assert fields[STATUS_FIELD] == JobStatus.queued
    assert (fields["tier"], fields["reply_to"]) == ("batch", client.client_id)
    [(_id, entry)] = client.redis.xrange(client.keys.intake)
    assert Request.model_validate_json(entry[REQUEST_FIELD]) == handle.request
    assert handle.status() is JobStatus.queued and not handle.done()


def test_submit_carries_the_slo_and_the_shedding_opt_in(client):
    handle = client.submit("x", deadline_ms=2000.0, ttft_slo_ms=500.0, tpot_slo_ms=30.0, sheddable=True)
    [(_id, entry)] = client.redis.xrange(client.keys.intake)
    sent = Request.model_validate_json(entry[REQUEST_FIELD])
    assert (sent.deadline_ms, sent.ttft_slo_ms, sent.tpot_slo_ms, sent.sheddable) == (2000.0, 500.0, 30.0, True)
    assert sent == handle.request
    assert client.submit("y").request.sheddable is False  # shedding is opt-in


def test_token_id_prompts_round_trip(backend, client):
    result = client.submit(prompt_token_ids=[1, 2, 3]).result(timeout=5)
    assert result.output_token_ids == [3, 2, 1]
    assert client.get(result.id).output_token_ids == [3, 2, 1]


def test_submit_many_resolves_2000_jobs_through_one_reply_stream(backend, client):
    handles = client.submit_many([{"prompt": f"p{i}"} for i in range(2000)])
    results = client.wait_all(handles, timeout=30)
    assert [r.output for r in results] == [f"echo: p{i}" for i in range(2000)]
    assert all(h.done() for h in handles[:5])
    # One reader thread and, besides it, one connection for commands: not one per job.
    readers = [t for t in threading.enumerate() if t.name.startswith("dio-reply-reader:")
               and client.client_id in t.name]
    assert len(readers) == 1
    names = [c["name"] for c in client.redis.client_list() if c["name"] == f"dio-client:{client.client_id}"]
    assert 1 <= len(names) <= 2


def test_as_completed_yields_every_handle_once(backend, client):
    handles = client.submit_many([{"prompt": f"q{i}"} for i in range(50)])
    seen = [h.id for h in client.as_completed(handles, timeout=10)]
    assert sorted(seen) == sorted(h.id for h in handles)


def test_rejected_job_raises_with_its_reason(backend, client):
    handle = client.submit("reject me")
    with pytest.raises(JobRejected) as info:
        handle.result(timeout=5)
    assert info.value.reason == "overloaded: no worker has room"
    assert info.value.retry_after_s == 2.5
    assert "retry after 2.5 s" in str(info.value)
    assert handle.result(raise_on_error=False).status is JobStatus.rejected


def test_failed_job_raises_with_its_error(backend, client):
    with pytest.raises(JobFailed) as info:
        client.submit("fail me").result(timeout=5)
    assert info.value.error == "CUDA out of memory"
    assert "echo-worker" in str(info.value)


def test_result_times_out_on_a_job_that_never_ends(backend, client):
    handle = client.submit("hang")
    start = time.monotonic()
    with pytest.raises(ResultTimeout) as info:
        handle.result(timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2
    assert info.value.job_id == handle.id and info.value.status == "queued"


def test_cancel_before_completion_is_final(backend, client, client_settings):
    handle = client.submit("hang")
    assert handle.cancel() is True
    with pytest.raises(JobCancelled):
        handle.result(timeout=2)
    assert handle.cancel() is False
    # The worker finishing later cannot overwrite the cancellation.
    late = JobResult(id=handle.id, status=JobStatus.completed, output="too late")
    assert Scripts(client.redis, client.keys).finish(client.redis, late, client.client_id) == 0
    assert client.get(handle.id).status is JobStatus.cancelled


def test_cancel_after_completion_returns_false(backend, client):
    handle = client.submit("quick")
    handle.result(timeout=5)
    assert handle.cancel() is False
    assert client.cancel("no-such-job") is False


def test_lost_notices_are_found_by_polling_the_job_hash(client_settings, client):
    with EchoBackend(client_settings, notify=False):
        start = time.monotonic()
        assert client.submit("lost").result(timeout=5).output == "echo: lost"
        assert time.monotonic() - start < 2
        handles = client.submit_many([{"prompt": f"l{i}"} for i in range(20)])
        assert len(client.wait_all(handles, timeout=5)) == 20


def test_deleted_reply_stream_does_not_lose_results(client_settings, client):
    with EchoBackend(client_settings, delay_s=0.2):
        handle = client.submit("deleted")
        client.redis.delete(client.reply_stream)
        assert handle.result(timeout=5).output == "echo: deleted"


def test_outputs_that_look_like_json_stay_text(client_settings, client):
    def decide(req: Request) -> JobResult:
        return JobResult(id=req.id, status=JobStatus.completed, output='{"a": [1, 2]}')

    with EchoBackend(client_settings, decide):
        handle = client.submit("json please")
        assert handle.result(timeout=5).output == '{"a": [1, 2]}'
    assert client.get(handle.id).output == '{"a": [1, 2]}'


def test_get_reads_the_job_hash(backend, client):
    assert client.get("unknown") is None
    handle = client.submit("x")
    handle.result(timeout=5)
    stored = client.get(handle.id)
    assert stored.status is JobStatus.completed and stored.output == "echo: x" and stored.submitted_at


def test_close_stops_the_reader_and_deletes_the_reply_stream(backend, client_settings):
    client = Client(client_settings)
    client.submit("bye").result(timeout=5)
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 1.5
    assert not any(client.client_id in t.name for t in threading.enumerate())
    with Client(client_settings) as other:
        assert other.redis.exists(client.reply_stream) == 0
    with pytest.raises(RuntimeError):
        client.submit("after close")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt": "x", "id": "bad id!"}, "id"),
        ({"prompt": "x", "prompt_token_ids": [1]}, "exactly one"),
        ({}, "exactly one"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "temperature": 3.0}, "temperature"),
    ],
)
def test_invalid_requests_raise_before_touching_redis(kwargs, message):
    # Nothing listens on port 1: any Redis command would raise ConnectionError instead.
    with Client(ClientSettings(redis_url="redis://127.0.0.1:1/0")) as client:
        with pytest.raises(ValidationError, match=message):
            client.submit(**kwargs)


def test_one_invalid_request_sends_none_of_the_batch(client):
    with pytest.raises(ValueError):
        client.submit_many([{"prompt": "ok"}, {"prompt": "bad", "max_tokens": 0}])
    with pytest.raises(ValueError, match="twice"):
        client.submit_many([{"prompt": "a", "id": "same"}, {"prompt": "b", "id": "same"}])
    assert client.redis.xlen(client.keys.intake) == 0


def test_constructor_overrides_and_environment(monkeypatch, redis_url):
    monkeypatch.setenv("DIO_MODEL", "llama-3.1-8b")
    monkeypatch.setenv("DIO_MAX_TOKENS", "64")
    with Client(redis_url=redis_url, key_prefix="{x}:") as client:
        assert (client.settings.model, client.settings.max_tokens) == ("llama-3.1-8b", 64)
        assert client.keys.intake == "{x}:intake"


def test_reusing_a_job_id_is_refused_and_never_overwrites_the_job(backend, client):
    first = client.submit("hello", id="job-1").result(timeout=5)
    with pytest.raises(DuplicateJobId) as caught:
        client.submit("other", id="job-1")
    assert isinstance(caught.value, DIOError) and caught.value.job_ids == ["job-1"]
    assert "job id 'job-1' is already taken" in str(caught.value)
    assert client.get("job-1") == client.get(first.id)
    assert client.get("job-1").output == "echo: hello"
    assert client.redis.xlen(client.keys.intake) == 1  # nothing was queued for the refused one
    # In a batch, the other requests are submitted; their handles ride on the error.
    with pytest.raises(DuplicateJobId) as caught:
        client.submit_many([{"prompt": "a", "id": "job-2"}, {"prompt": "b", "id": "job-1"}])
    assert caught.value.job_ids == ["job-1"]
    assert [h.id for h in caught.value.submitted] == ["job-2"]
    assert caught.value.submitted[0].result(timeout=5).output == "echo: a"
    assert client.get("job-1").output == "echo: hello"


def complete(settings: ClientSettings, job_ids: list[str], reply_to: str) -> Callable[[], None]:
    """Return a function that completes the jobs, as a worker would."""

    def run() -> None:
        conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        scripts = Scripts(conn, settings.keys)
        for job_id in job_ids:
            scripts.finish(conn, JobResult(id=job_id, status=JobStatus.completed, output="after"), reply_to)
        conn.close()

    return run


def test_result_and_wait_all_ride_out_a_redis_restart(restartable_redis):
    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", poll_interval_s=0.2)
    with Client(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
        one, two, three = client.submit_many([{"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}])
        restart = restartable_redis.outage(2.0, then=complete(settings, [one.id, two.id, three.id],
                                                              client.client_id))
        assert one.result(timeout=15).output == "after"
        assert [r.output for r in client.wait_all([two, three], timeout=15)] == ["after", "after"]
        restart.join(10)


def test_a_wait_that_outlasts_its_timeout_in_an_outage_raises_result_timeout(restartable_redis):
    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", poll_interval_s=0.1)
    with Client(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))
        handle = client.submit("hang")
        restartable_redis.stop(save=True)
        start = time.monotonic()
        with pytest.raises(ResultTimeout) as caught:
            handle.result(timeout=1.0)
        assert 1.0 <= time.monotonic() - start < 3.0
        assert caught.value.status is None  # no status could be read
        with pytest.raises(ResultTimeout):
            client.wait_all([handle], timeout=0.5)


def back_in(restartable_redis, seconds: float) -> threading.Thread:
    """Stop Redis now (its data kept) and start it again in ``seconds``, in a thread."""
    restartable_redis.stop(save=True)
    thread = threading.Thread(target=lambda: (time.sleep(seconds), restartable_redis.start()), daemon=True)
    thread.start()
    return thread


def test_submit_get_status_and_cancel_ride_out_a_redis_restart(restartable_redis):
    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", poll_interval_s=0.2)
    with Client(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
        restart = back_in(restartable_redis, 1.0)
        handle = client.submit("during", id="during")
        restart.join(10)
        assert client.status("during") is JobStatus.queued
        restart = back_in(restartable_redis, 1.0)
        assert client.get("during").status is JobStatus.queued
        restart.join(10)
        restart = back_in(restartable_redis, 1.0)
        assert client.status("during") is JobStatus.queued
        restart.join(10)
        restart = back_in(restartable_redis, 1.0)
        assert client.cancel("during") is True
        restart.join(10)
        assert handle.result(timeout=5, raise_on_error=False).status is JobStatus.cancelled
        conn = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        assert conn.xlen(settings.keys.intake) == 1  # submitted once
        conn.close()


def test_a_client_call_that_outlasts_its_retry_bound_raises_redis_unavailable(restartable_redis):
    from dio.client import RedisUnavailable

    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{c}:", client_retry_s=0.5)
    with Client(settings) as client:
        client.redis.set_retry(Retry(NoBackoff(), 0))
        restartable_redis.stop(save=True)
        for call in (lambda: client.submit("x"), lambda: client.get("x"), lambda: client.status("x"),
                     lambda: client.cancel("x")):
            start = time.monotonic()
            with pytest.raises(RedisUnavailable) as caught:
                call()
            assert 0.5 <= time.monotonic() - start < 3.0
            assert isinstance(caught.value, DIOError)


def test_a_submission_retried_after_an_ambiguous_failure_creates_one_job(backend, client, redis_prefix):
    real_pipeline = client.redis.pipeline
    failed = []

    def pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **k):
            replies = real_execute(*a, **k)
            if not failed:  # the scripts ran, then the connection "dropped" before the reply
                failed.append(True)
                raise redis.ConnectionError("connection reset")
            return replies

        pipe.execute = execute
        return pipe

    client.redis.pipeline = pipeline
    handle = client.submit("once", id="ambiguous")
    client.redis.pipeline = real_pipeline
    assert failed == [True]
    assert handle.result(timeout=5).output == "echo: once"
    with pytest.raises(DuplicateJobId):  # another request under that id is still refused
        client.submit("twice", id="ambiguous")
