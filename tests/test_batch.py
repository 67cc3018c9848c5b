"""Offline batches on a real Redis, against EchoBackend: output format, resume, cancel, RQ."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from rq import Callback, Queue
from rq.serializers import JSONSerializer

from dio.client import Tier
from dio.client.batch import (
    BATCH_FUNCTION,
    BatchBusy,
    BatchProgress,
    SimpleBatchWorker,
    claim_batch,
    enqueue_batch,
    get_progress,
    request_cancel,
    run_batch,
)
from dio.client.batch_lease import Holder
from dio.client.testing import EchoBackend, echo_decide
from dio.protocol.keys import STATUS_FIELD

pytestmark = pytest.mark.integration

LINES = 50
BAD_LINES = {10: "{this is not json", 30: json.dumps({"url": "/v1/completions", "body": {"prompt": "x"}})}


def request_line(i: int, prompt: str | None = None) -> str:
    """Line i: even lines use /v1/completions, odd ones /v1/chat/completions."""
    prompt = prompt or f"question {i}"
    if i % 2 == 0:
        body = {"model": "llama-3.2-3b", "prompt": prompt, "max_tokens": 16}
        return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
    body = {"model": "llama-3.2-3b", "messages": [{"role": "user", "content": prompt}], "max_tokens": 16}
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})


@pytest.fixture
def input_file(tmp_path) -> Path:
    """50 lines, 2 of them bad (invalid JSON, no custom_id)."""
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(BAD_LINES.get(i) or request_line(i) for i in range(LINES)) + "\n")
    return path


def read_output(path: Path) -> list[dict]:
    return [json.loads(text) for text in path.read_text().splitlines()]


def assert_complete(records: list[dict]) -> None:
    """48 responses and 2 errors, every request answered exactly once."""
    responses = [r for r in records if r["response"] is not None]
    errors = [r for r in records if r["error"] is not None]
    assert (len(responses), len(errors)) == (LINES - 2, 2)
    counts = Counter(r["custom_id"] for r in responses)
    assert counts == Counter(f"req-{i}" for i in range(LINES) if i not in BAD_LINES)


def test_batch_writes_openai_output(backend, client, input_file, tmp_path):
    output = tmp_path / "out.jsonl"
    progress = run_batch(input_file, output, client, concurrency=8, batch_id="b1")
    assert progress == BatchProgress("b1", total=50, done=48, failed=2, in_flight=0, status="completed")
    records = read_output(output)
    assert_complete(records)
    by_id = {r["custom_id"]: r for r in records if r["custom_id"]}
    text = by_id["req-4"]["response"]["body"]
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "echo: question 4"
    chat = by_id["req-5"]["response"]["body"]
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"]["content"] == "echo: user: question 5"
    errors = sorted((r["error"]["code"], r["custom_id"]) for r in records if r["error"])
    assert errors == [("invalid_json", None), ("missing_custom_id", None)]
    assert all("line" in r["error"]["message"] for r in records if r["error"])
    sent = backend.seen[0]
    assert sent.tier is Tier.batch and sent.metadata["batch_id"] == "b1"
    stored = get_progress(client, "b1")
    assert (stored["status"], stored["total"], stored["done"], stored["failed"]) == ("completed", "50", "48", "2")
    assert client.redis.ttl(client.keys.batch("b1")) > 0


def test_rerun_after_a_limit_resumes_without_duplicates(backend, client, input_file, tmp_path):
    output = tmp_path / "out.jsonl"
    first = run_batch(input_file, output, client, concurrency=4, limit=20)
    assert first.status == "stopped" and first.done + first.failed == 20
    # A crash in the middle of a write leaves a torn last line; the rerun cuts it off.
    with open(output, "a") as f:
        f.write('{"id": "batch_req_torn", "custom_id": "req-4')
    second = run_batch(input_file, output, client, concurrency=4)
    assert second.status == "completed" and (second.done, second.failed) == (48, 2)
    assert_complete(read_output(output))
    assert run_batch(input_file, output, client).status == "completed"  # nothing left: nothing sent
    assert len(read_output(output)) == LINES


def test_interrupted_batch_cancels_in_flight_jobs_and_resumes(client_settings, client, input_file, tmp_path):
    output = tmp_path / "out.jsonl"

    def stop_after_ten(progress: BatchProgress) -> None:
        if progress.done + progress.failed >= 10:
            raise KeyboardInterrupt

    def hang_two(req):  # questions 3 and 5 never end, so they are in flight at the interrupt
        return None if req.prompt.endswith(("question 3", "question 5")) else echo_decide(req)

    with EchoBackend(client_settings, hang_two):
        with pytest.raises(KeyboardInterrupt):
            run_batch(input_file, output, client, concurrency=16, progress_cb=stop_after_ten, batch_id="b2")
    assert get_progress(client, "b2")["status"] == "interrupted"
    statuses = Counter(client.redis.hget(k, STATUS_FIELD) for k in client.redis.scan_iter(client.keys.job("*")))
    assert statuses["cancelled"] == 2  # the hung jobs were cancelled, not left to run
    assert sum(1 for _ in read_output(output)) >= 10
    with EchoBackend(client_settings):
        assert run_batch(input_file, output, client, batch_id="b2").status == "completed"
    assert_complete(read_output(output))


def test_cancel_stops_the_batch_and_a_rerun_finishes_it(client_settings, client, input_file, tmp_path):
    output = tmp_path / "out.jsonl"
    outcome: list[BatchProgress] = []
    with EchoBackend(client_settings, lambda req: None):  # every job hangs
        runner = threading.Thread(target=lambda: outcome.append(
            run_batch(input_file, output, client, concurrency=10, batch_id="b3")))
        runner.start()
        deadline = time.monotonic() + 5
        while client.redis.hget(client.keys.batch("b3"), "in_flight") != "10" and time.monotonic() < deadline:
            time.sleep(0.02)
        request_cancel(client, "b3")
        runner.join(10)
    assert outcome[0].status == "cancelled" and outcome[0].done == 0
    statuses = Counter(client.redis.hget(k, STATUS_FIELD) for k in client.redis.scan_iter(client.keys.job("*")))
    assert statuses == {"cancelled": 10}
    assert get_progress(client, "b3").get("cancel_requested") is None  # consumed: a rerun resumes
    with EchoBackend(client_settings):
        assert run_batch(input_file, output, client, batch_id="b3").status == "completed"
    assert_complete(read_output(output))


def test_cancel_requested_before_start_submits_nothing(backend, client, input_file, tmp_path):
    request_cancel(client, "b4")
    progress = run_batch(input_file, tmp_path / "out.jsonl", client, batch_id="b4")
    assert progress.status == "cancelled" and backend.seen == []


def test_line_errors_duplicates_and_job_failures(backend, client, tmp_path):
    path = tmp_path / "in.jsonl"
    lines = [request_line(0), request_line(1, "x" * 300), request_line(0), request_line(2, "reject this"),
             request_line(4, "fail this"), json.dumps({"custom_id": "zero", "url": "/v1/completions",
                                                       "body": {"prompt": "p", "max_tokens": 0}})]
    path.write_text("\n".join(lines) + "\n")
    output = tmp_path / "out.jsonl"
    progress = run_batch(path, output, client, max_line_bytes=250)
    assert (progress.done, progress.failed) == (1, 5)
    codes = {r["custom_id"]: r["error"]["code"] for r in read_output(output) if r["error"]}
    assert codes == {None: "line_too_long", "req-0": "duplicate_custom_id", "req-2": "rejected",
                     "req-4": "failed", "zero": "invalid_request"}
    assert run_batch(path, output, client).status == "completed"
    assert len(read_output(output)) == 6  # the rerun added nothing


def test_rate_limit_spaces_submissions(backend, client, input_file, tmp_path):
    start = time.monotonic()
    run_batch(input_file, tmp_path / "out.jsonl", client, rate_limit=200)
    # 20 lines per 0.1 s: the last of 3 round trips goes out 0.2 s after the first.
    assert time.monotonic() - start >= 0.19


def test_a_live_runner_holds_its_batch_and_a_dead_ones_is_taken_at_once(client):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder = Holder("run_batch-elsewhere", socket.gethostname(), other.pid, "t0")
        client.redis.set(client.keys.batch_lease("b5"), holder.to_json(), px=60_000)
        with pytest.raises(BatchBusy, match=f"run_batch-elsewhere.*pid {other.pid}.*--force"):
            claim_batch(client, "b5", {"status": "running"})
    finally:
        other.kill()
        other.wait()
    lease = claim_batch(client, "b5", {"status": "running"})  # its process is gone: taken over at once
    assert lease.held_by(client.keys.batch_lease("b5")) == lease.holder


def test_force_takes_a_batch_from_a_live_runner(client):
    holder = Holder("run_batch-other-host", "another-host", 1, "t0")
    client.redis.set(client.keys.batch_lease("b7"), holder.to_json(), px=60_000)
    with pytest.raises(BatchBusy):
        claim_batch(client, "b7", {"status": "running"})
    lease = claim_batch(client, "b7", {"status": "running"}, force=True)
    assert lease.held_by(client.keys.batch_lease("b7")) == lease.holder


def test_rq_runs_a_batch_with_the_json_serializer(backend, client_settings, input_file, tmp_path, redis_url):
    output = tmp_path / "out.jsonl"
    queue_name = f"dio-batch-test-{client_settings.key_prefix.strip('{}:')}"
    conn = redis.Redis.from_url(redis_url)  # RQ wants bytes replies
    job = None
    try:
        job = enqueue_batch(conn, input_file, output, batch_id="b6", queue_name=queue_name,
                            redis_url=redis_url, key_prefix=client_settings.key_prefix, concurrency=8)
        assert job.serializer is JSONSerializer
        rq_queue = Queue(queue_name, connection=conn, serializer=JSONSerializer)
        SimpleBatchWorker([rq_queue], connection=conn, serializer=JSONSerializer).work(burst=True)
        job.refresh()
        assert job.get_status() == "finished", job.latest_result()
        assert job.return_value()["status"] == "completed"
        assert job.meta["progress"] == {"batch_id": "b6", "total": 50, "done": 48, "failed": 2, "in_flight": 0,
                                        "status": "completed"}
    finally:
        for pattern in (f"rq:*{queue_name}*", f"rq:*{job.id if job else 'none'}*"):
            for key in conn.scan_iter(pattern):
                conn.delete(key)
        conn.close()
    assert_complete(read_output(output))


@pytest.fixture
def rq_queue(redis_url, redis_prefix):
    """An RQ queue of its own (JSON serializer) on the test server; its RQ keys deleted afterwards."""
    name = f"dio-batch-test-{redis_prefix.strip('{}:')}"
    conn = redis.Redis.from_url(redis_url)
    yield Queue(name, connection=conn, serializer=JSONSerializer)
    for key in conn.scan_iter(f"rq:*{name}*"):
        conn.delete(key)
    conn.close()


@pytest.mark.parametrize("planted", ["another function", "a callback"])
def test_the_batch_worker_runs_nothing_but_dios_batch_runner(rq_queue, tmp_path, planted):
    made = tmp_path / "made-by-a-queue-writer"
    if planted == "another function":  # anyone who can write to the queue names any importable function
        job = rq_queue.enqueue("os.makedirs", str(made))
    else:  # or DIO's function, with a callback the worker would import and call
        job = rq_queue.enqueue(BATCH_FUNCTION, kwargs={"input_path": str(tmp_path / "in.jsonl"),
                                                       "output_path": str(tmp_path / "out.jsonl"), "batch_id": "x"},
                               on_success=Callback("os.makedirs"), on_failure=Callback("os.makedirs"))
    SimpleBatchWorker([rq_queue], connection=rq_queue.connection, serializer=JSONSerializer).work(burst=True)
    job.refresh()
    assert job.get_status() == "failed"
    assert "refused" in (job.latest_result().exc_string or "")
    assert not made.exists() and not (tmp_path / "out.jsonl").exists()  # nothing ran


def test_a_batch_worker_without_the_json_serializer_refuses_to_start(rq_queue, redis_url):
    with pytest.raises(ValueError, match="JSONSerializer"):
        SimpleBatchWorker([rq_queue.name], connection=rq_queue.connection)  # RQ's default: pickle
    SimpleBatchWorker([rq_queue.name], connection=rq_queue.connection, serializer="rq.serializers.JSONSerializer")
    rq = [os.path.join(os.path.dirname(sys.executable), "rq"), "worker", "--url", redis_url, "--burst",
          "--worker-class", "dio.client.batch.BatchWorker"]
    refused = subprocess.run([*rq, rq_queue.name], capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "JSONSerializer" in refused.stderr
    served = subprocess.run([*rq, "--serializer", "rq.serializers.JSONSerializer", rq_queue.name],
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 0, served.stderr


def test_a_batch_rides_out_a_redis_restart_and_loses_nothing(restartable_redis, input_file, tmp_path):
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from dio.client import Client, ClientSettings

    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{b}:", poll_interval_s=0.2)
    output = tmp_path / "out.jsonl"
    backends: list[EchoBackend] = []
    restarts: list[threading.Thread] = []

    def start_backend() -> None:
        backends.append(EchoBackend(settings, delay_s=0.02).__enter__())

    def restart_midway(progress: BatchProgress) -> None:
        if progress.done + progress.failed >= 10 and not restarts:
            restarts.append(restartable_redis.outage(1.5, then=start_backend))  # the first backend dies of it

    start_backend()
    try:
        with Client(settings) as client:
            client.redis.set_retry(Retry(NoBackoff(), 0))  # fail fast: no retries hidden inside redis-py
            progress = run_batch(input_file, output, client, concurrency=4, progress_cb=restart_midway,
                                 batch_id="through")
            assert restarts and not restarts[0].join(10)
            assert progress.status == "completed"
            assert get_progress(client, "through")["status"] == "completed"
    finally:
        for backend in backends:
            backend.__exit__(None, None, None)
    records = read_output(output)
    assert len(records) == LINES  # every line answered once
    assert_complete(records)


def test_a_rerun_cancels_the_jobs_a_killed_run_left_in_flight(client_settings, client, input_file, tmp_path):
    with EchoBackend(client_settings, lambda req: None):  # the killed run's job: it would run on and on
        orphan = client.submit("question 3", max_tokens=16)
    client.redis.hset(client.keys.batch_inflight("b8"), orphan.id, "req-3")  # what the killed run recorded
    # The backend reads the intake from its start: the orphan, still running on its worker, must not end there
    # before the rerun's cancel reaches it (a race the test would otherwise lose at random).
    def still_running(req):
        return None if req.id == orphan.id else echo_decide(req)

    with EchoBackend(client_settings, still_running):
        progress = run_batch(input_file, tmp_path / "out.jsonl", client, batch_id="b8")
    assert progress.status == "completed" and client.status(orphan.id).value == "cancelled"
    assert not client.redis.exists(client.keys.batch_inflight("b8"))
    assert_complete(read_output(tmp_path / "out.jsonl"))
