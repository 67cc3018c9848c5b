"""The Batch API on a real Redis: files, batches, statuses, the runner daemon, its lease and takeover."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from dio.client import Client
from dio.client.batch_lease import BatchLease, Holder, LeaseLost
from dio.client.batch_pacing import MIN_IN_FLIGHT
from dio.client.batches import (
    BatchInputError,
    FileTooLarge,
    cancel_batch,
    create_batch,
    file_content,
    get_batch,
    get_file,
    list_batches,
    upload_file,
)
from dio.client.stored_batch import StoredOutput
from dio.client.testing import EchoBackend, echo_decide
from dio.ops.batch_runner import BatchRunnerDaemon
from dio.ops.local_cluster import BATCH_RUNNER_NAME, LocalCluster, WorkerSpec
from dio.protocol.batches import BatchStatus
from dio.protocol.keys import STATUS_FIELD
from dio.protocol.models import JobResult, JobStatus
from dio.protocol.scripts import Scripts

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]


def line(i: int, prompt: str | None = None, url: str = "/v1/completions", **body) -> str:
    body = {"model": "llama-3.2-3b", "max_tokens": 16, **body}
    if url == "/v1/completions":
        body.setdefault("prompt", prompt or f"question {i}")
    else:
        body.setdefault("messages", [{"role": "user", "content": prompt or f"question {i}"}])
    return json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body})


def batch_file(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def records(client: Client, file_id: str | None) -> list[dict]:
    data = file_content(client, file_id) if file_id else b""
    return [json.loads(text) for text in (data or b"").splitlines()]


def wait_status(client: Client, batch_id: str, statuses: set[BatchStatus], timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = get_batch(client, batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch still {batch.status.value}: {batch.request_counts}")


@pytest.fixture
def runner(client_settings):
    """A batch-runner daemon in a thread (as `dio batch-runner` runs it)."""
    daemon = BatchRunnerDaemon(client_settings, "test-runner", scan_interval_s=0.1, concurrency=16)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    yield daemon
    daemon.stop()
    thread.join(10)


# --- files and validation -----------------------------------------------------------------------


def test_an_uploaded_file_is_stored_as_openai_shows_it(client):
    data = batch_file([line(i) for i in range(3)])
    file = upload_file(client, data, "in.jsonl")
    assert file.id.startswith("file-") and file.object == "file" and file.purpose == "batch"
    assert file.bytes == len(data) and file.filename == "in.jsonl"
    assert get_file(client, file.id) == file and file_content(client, file.id) == data
    assert get_file(client, "file-nope") is None and file_content(client, "file-nope") is None


@pytest.mark.parametrize(("data", "message"), [
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b"\n\n", "no requests"),
    (batch_file([line(0), "{not json"]), "line 2 is not valid JSON"),
    (batch_file([line(0), line(0)]), "custom_id 'req-0' appeared on an earlier line"),
    (batch_file([json.dumps({"custom_id": "x", "url": "/v1/embeddings", "body": {}})]), "url must be"),
    (batch_file([line(0, n=2)]), "'n' must be 1"),
    (batch_file([line(0, stop=["a", "b", "c", "d", "e"])]), "at most 4"),
])
def test_a_bad_file_is_refused_whole_with_the_lines_named(client, data, message):
    with pytest.raises(BatchInputError, match=message):
        upload_file(client, data, "in.jsonl")


def test_size_purpose_endpoint_and_window_are_checked(client, client_settings):
    small = Client(client_settings.model_copy(update={"max_batch_file_bytes": 100}))
    try:
        with pytest.raises(FileTooLarge, match="DIO_MAX_BATCH_FILE_BYTES"):
            upload_file(small, batch_file([line(i) for i in range(5)]), "in.jsonl")
    finally:
        small.close()
    with pytest.raises(BatchInputError, match="purpose"):
        upload_file(client, batch_file([line(0)]), "in.jsonl", purpose="fine-tune")
    file = upload_file(client, batch_file([line(0), line(1, url="/v1/chat/completions")]), "in.jsonl")
    with pytest.raises(BatchInputError, match="line 2: url /v1/chat/completions is not the batch's endpoint"):
        create_batch(client, file.id, "/v1/completions")
    with pytest.raises(BatchInputError, match="endpoint must be"):
        create_batch(client, file.id, "/v1/embeddings")
    with pytest.raises(BatchInputError, match="completion_window"):
        create_batch(client, file.id, "/v1/completions", completion_window="1h")
    with pytest.raises(BatchInputError, match="no uploaded batch file"):
        create_batch(client, "file-nope", "/v1/completions")


# --- running ------------------------------------------------------------------------------------


def test_a_batch_runs_to_completed_with_every_custom_id_answered_once(backend, client, runner):
    lines = [line(i, "fail this" if i == 3 else None) for i in range(40)] + [line(40, max_tokens=0)]
    file = upload_file(client, batch_file(lines), "in.jsonl")
    batch = create_batch(client, file.id, "/v1/completions", metadata={"team": "search"})
    assert batch.status is BatchStatus.validating and batch.request_counts.total == 41
    assert batch.id.startswith("batch_") and batch.model_dump()["object"] == "batch"
    done = wait_status(client, batch.id, {BatchStatus.completed})
    assert (done.request_counts.completed, done.request_counts.failed) == (39, 2)
    assert done.metadata == {"team": "search"} and done.in_progress_at and done.completed_at
    out, errors = records(client, done.output_file_id), records(client, done.error_file_id)
    assert Counter(r["custom_id"] for r in out + errors) == Counter(f"req-{i}" for i in range(41))
    assert all(r["response"]["status_code"] == 200 and r["error"] is None for r in out)
    assert {r["custom_id"]: r["error"]["code"] for r in errors} == {"req-3": "failed", "req-40": "invalid_request"}
    output_file = get_file(client, done.output_file_id)
    assert output_file.purpose == "batch_output" and output_file.bytes == len(file_content(client, output_file.id))
    assert backend.seen[0].tier.value == "batch" and backend.seen[0].metadata["batch_id"] == batch.id
    assert not client.redis.sismember(client.keys.active_batches, batch.id)
    assert [b.id for b in list_batches(client)] == [batch.id]


def test_list_pages_newest_first(client):
    file = upload_file(client, batch_file([line(0)]), "in.jsonl")
    ids = []
    for _ in range(3):
        ids.append(create_batch(client, file.id, "/v1/completions").id)
        client.redis.zincrby(client.keys.batches, len(ids), ids[-1])  # distinct creation times
    assert [b.id for b in list_batches(client)] == ids[::-1]
    assert [b.id for b in list_batches(client, limit=1, after=ids[2])] == [ids[1]]


def test_stop_sequences_cut_the_text_and_chat_lines_use_the_served_template(client_settings, client, runner):
    def answer(req):
        result = echo_decide(req)
        return result.model_copy(update={"output": f"{req.prompt}|one. two."})

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}<assistant>"
    client.redis.sadd(client.keys.workers, "w1")
    client.redis.hset(client.keys.worker("w1"), mapping={"model": "llama-3.2-3b", "chat_template": template})
    client.redis.set(client.keys.alive("w1"), "x")
    lines = [line(0, "hi", url="/v1/chat/completions", stop=". "), line(1, "yo", url="/v1/chat/completions")]
    with EchoBackend(client_settings, answer) as backend:
        file = upload_file(client, batch_file(lines), "in.jsonl")
        done = wait_status(client, create_batch(client, file.id, "/v1/chat/completions").id, {BatchStatus.completed})
    assert backend.seen[0].prompt == "<user>hi</s><assistant>" and backend.seen[0].stop == [". "]
    by_id = {r["custom_id"]: r["response"]["body"]["choices"][0] for r in records(client, done.output_file_id)}
    assert by_id["req-0"]["message"]["content"] == "<user>hi</s><assistant>|one"
    assert by_id["req-0"]["finish_reason"] == "stop"
    assert by_id["req-1"]["message"]["content"] == "<user>yo</s><assistant>|one. two."


def test_cancel_cancels_the_jobs_in_flight(client_settings, client, runner):
    with EchoBackend(client_settings, lambda req: None):  # every job hangs
        file = upload_file(client, batch_file([line(i) for i in range(40)]), "in.jsonl")
        batch = create_batch(client, file.id, "/v1/completions")
        deadline = time.monotonic() + 10
        while client.redis.hlen(client.keys.batch_inflight(batch.id)) < 16 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cancel_batch(client, batch.id).status is BatchStatus.cancelling
        done = wait_status(client, batch.id, {BatchStatus.cancelled})
    assert done.cancelling_at and done.cancelled_at and done.request_counts.completed == 0
    statuses = Counter(client.redis.hget(k, STATUS_FIELD) for k in client.redis.scan_iter(client.keys.job("*")))
    assert statuses == {"cancelled": 16}  # nothing left running on a GPU
    assert cancel_batch(client, batch.id).status is BatchStatus.cancelled  # an ended batch stays as it is
    assert cancel_batch(client, "batch_nope") is None


def test_a_batch_no_runner_started_is_cancelled_at_once(client):
    file = upload_file(client, batch_file([line(0)]), "in.jsonl")
    batch = create_batch(client, file.id, "/v1/completions")
    assert cancel_batch(client, batch.id).status is BatchStatus.cancelled
    assert not client.redis.sismember(client.keys.active_batches, batch.id)


def test_a_batch_past_its_window_expires_with_an_error_per_unanswered_line(client_settings, client, runner):
    with EchoBackend(client_settings, lambda req: None):
        file = upload_file(client, batch_file([line(i) for i in range(5)]), "in.jsonl")
        batch = create_batch(client, file.id, "/v1/completions")
        client.redis.hset(client.keys.batch(batch.id), "expires_at", str(int(time.time())))
        done = wait_status(client, batch.id, {BatchStatus.expired})
    errors = records(client, done.error_file_id)
    assert sorted(r["custom_id"] for r in errors) == [f"req-{i}" for i in range(5)]
    assert {r["error"]["code"] for r in errors} == {"batch_expired"} and done.expired_at


def test_a_gone_input_file_fails_the_batch(client, runner):
    file = upload_file(client, batch_file([line(0)]), "in.jsonl")
    batch = create_batch(client, file.id, "/v1/completions")
    client.redis.delete(client.keys.file_data(file.id))
    done = wait_status(client, batch.id, {BatchStatus.failed})
    assert done.errors.data[0].code == "input_file_gone" and done.failed_at


# --- the lease ----------------------------------------------------------------------------------


def test_a_runner_that_lost_its_lease_writes_nothing(client):
    key = client.keys.batch_lease("b1")
    mine = BatchLease(client.redis, Holder.me("one"))
    assert mine.acquire(key) is None
    output = StoredOutput(client, "b1", mine, "file-o", "file-e")
    record = {"id": "batch_req_j1", "custom_id": "c1", "response": {"status_code": 200, "body": {}}, "error": None}
    output.write(record)
    theirs = BatchLease(client.redis, Holder("two", "elsewhere", 1, "t"))
    theirs.acquire(key, force=True)
    with pytest.raises(LeaseLost):
        output.write({**record, "custom_id": "c2"})
    assert not mine.renew(key)
    written = client.redis.get(client.keys.file_data("file-o")).splitlines()
    assert [json.loads(text)["custom_id"] for text in written] == ["c1"]


def test_a_restarted_runner_takes_its_batch_over_at_once_and_cancels_the_old_jobs(client_settings, client):
    """The first runner dies holding the lease, with jobs in flight; its successor (same name) resumes at once."""
    hang = threading.Event()
    hang.set()

    def decide(req):
        return None if hang.is_set() else echo_decide(req)

    with EchoBackend(client_settings, decide):
        file = upload_file(client, batch_file([line(i) for i in range(30)]), "in.jsonl")
        batch = create_batch(client, file.id, "/v1/completions")
        first = BatchRunnerDaemon(client_settings, "same-name", scan_interval_s=0.1, concurrency=8)
        assert first.scan() == [batch.id]
        deadline = time.monotonic() + 10
        while client.redis.hlen(client.keys.batch_inflight(batch.id)) < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
        orphans = set(client.redis.hkeys(client.keys.batch_inflight(batch.id)))
        first.lease.renew = lambda key: False  # from here on it is as good as dead: it writes nothing
        hang.clear()
        second = BatchRunnerDaemon(client_settings, "same-name", scan_interval_s=0.1, concurrency=8)
        started = time.monotonic()
        assert second.scan() == [batch.id]  # no wait for the old lease to run out
        assert time.monotonic() - started < 2
        done = wait_status(client, batch.id, {BatchStatus.completed})
        second.stop()
        first.client.close()
        second.client.close()
    out = records(client, done.output_file_id)
    assert Counter(r["custom_id"] for r in out) == Counter(f"req-{i}" for i in range(30))
    old = [client.redis.hget(client.keys.job(job_id), STATUS_FIELD) for job_id in orphans]
    assert set(old) == {"cancelled"}  # the dead runner's jobs do not keep the GPUs busy


def test_the_runner_daemon_rides_out_a_redis_restart(restartable_redis):
    from dio.client import ClientSettings

    settings = ClientSettings(redis_url=restartable_redis.url, key_prefix="{rb}:", poll_interval_s=0.2)
    daemon = BatchRunnerDaemon(settings, "through", scan_interval_s=0.1)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        restartable_redis.outage(1.0).join(10)
        with EchoBackend(settings), Client(settings) as client:
            file = upload_file(client, batch_file([line(i) for i in range(10)]), "in.jsonl")
            batch = create_batch(client, file.id, "/v1/completions")
            assert wait_status(client, batch.id, {BatchStatus.completed}).request_counts.completed == 10
        assert thread.is_alive()
    finally:
        daemon.stop()
        thread.join(10)


# --- the command line and a real cluster ---------------------------------------------------------


def dio(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dio.ops.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_dio_batch_submit_wait_survives_a_killed_runner_and_worker(redis_url, redis_prefix, tmp_path):
    """`dio batch submit --wait` on a local cluster; its batch runner and a worker SIGKILLed midway."""
    cluster = LocalCluster(redis_url, [WorkerSpec("H100", 1), WorkerSpec("L4", 1)], key_prefix=redis_prefix,
                           time_scale=1.0, batch_runner=True, log_dir=tmp_path / "logs")
    path = tmp_path / "in.jsonl"
    path.write_text("".join(line(i, max_tokens=200) + "\n" for i in range(1500)))
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": redis_prefix}
    cluster.start()
    stop = threading.Event()
    supervisor = threading.Thread(target=cluster.supervise, args=(stop, 0.1), daemon=True)
    try:
        supervisor.start()
        submit = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", "batch", "submit", str(path), "--wait"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as client:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                batch = next(iter(list_batches(client)), None)
                if batch is not None and batch.request_counts.completed >= 300:
                    break
                time.sleep(0.05)
            assert batch is not None and batch.status is BatchStatus.in_progress, batch
            os.kill(cluster.batch_runner_pid, signal.SIGKILL)
            os.kill(cluster.worker_pids[1], signal.SIGKILL)
            out, err = submit.communicate(timeout=120)
            assert submit.returncode == 0, err
            batch_id = out.strip().splitlines()[-1]
            assert batch_id == batch.id and "1500/1500" in err
            results = dio("batch", "results", batch_id, "-o", str(tmp_path / "out.jsonl"), "--errors",
                          str(tmp_path / "err.jsonl"), env=env)
            assert results.returncode == 0, results.stderr
        answered = [json.loads(t) for t in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert Counter(r["custom_id"] for r in answered) == Counter(f"req-{i}" for i in range(1500))
        assert (tmp_path / "err.jsonl").read_text() == ""
        log = (tmp_path / "logs" / f"{BATCH_RUNNER_NAME}.log").read_text()
        assert "left in flight by an earlier runner" in log  # the successor settled the dead one's jobs
    finally:
        stop.set()
        supervisor.join(5)
        cluster.stop()


def test_cli_errors_are_one_line(redis_url, redis_prefix, tmp_path):
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": redis_prefix}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{nope\n")
    for args, message in ((("batch", "submit", str(bad)), "line 1 is not valid JSON"),
                          (("batch", "submit", str(tmp_path / "missing.jsonl")), "cannot read"),
                          (("batch", "status", "batch_nope"), "no batch 'batch_nope'"),
                          (("batch", "results", "batch_nope", "-o", str(tmp_path / "o")), "no batch")):
        done = dio(*args, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and message in done.stderr and "Traceback" not in done.stderr


def test_interactive_work_makes_the_batch_yield_its_gpus_and_it_still_finishes(client_settings, client, runner):
    """Other work arrives: the runner cancels its newest jobs down to min_in_flight, and runs them later."""
    hang = threading.Event()
    hang.set()
    with EchoBackend(client_settings, lambda req: None if hang.is_set() else echo_decide(req)):
        file = upload_file(client, batch_file([line(i) for i in range(40)]), "in.jsonl")
        batch = create_batch(client, file.id, "/v1/completions")
        inflight = client.keys.batch_inflight(batch.id)
        deadline = time.monotonic() + 10
        while client.redis.hlen(inflight) < 16 and time.monotonic() < deadline:  # an idle cluster: all 16
            time.sleep(0.02)
        first = set(client.redis.hkeys(inflight))
        client.submit("an interactive request", max_tokens=4)  # other work arrives
        deadline = time.monotonic() + 10
        while client.redis.hlen(inflight) > MIN_IN_FLIGHT and time.monotonic() < deadline:
            time.sleep(0.02)
        held_back = [client.redis.hget(client.keys.job(j), STATUS_FIELD) for j in first]
        assert Counter(held_back) == {"cancelled": 16 - MIN_IN_FLIGHT, "queued": MIN_IN_FLIGHT}  # the oldest run on
        hang.clear()
        scripts = Scripts(client.redis, client.keys)
        for job_id in first:  # the kept jobs end now (the hung backend never answers them)
            reply_to = client.redis.hget(client.keys.job(job_id), "reply_to")
            scripts.finish(client.redis, JobResult(id=job_id, status=JobStatus.completed, output="late",
                                                   output_tokens=1, prompt_tokens=1), reply_to)
        done = wait_status(client, batch.id, {BatchStatus.completed})
    out = records(client, done.output_file_id)
    assert Counter(r["custom_id"] for r in out) == Counter(f"req-{i}" for i in range(40))
