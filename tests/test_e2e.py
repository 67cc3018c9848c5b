"""The whole pipeline on the real Redis: client → intake → dispatcher → worker queue → worker → client.

Every process is real (started like an operator starts it, ``python -m dio.ops.cli ...``) and runs
simulated GPUs at a high time scale so the tests stay short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis

from dio.client import Client, JobRejected
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.protocol.keys import REQUEST_FIELD, SIM_EOS_METADATA, Keys
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TIME_SCALE = "200"


@pytest.fixture
def cluster(redis_url: str, redis_prefix: str):
    running = LocalCluster(redis_url, [WorkerSpec("H100", 1), WorkerSpec("T4", 1)], key_prefix=redis_prefix,
                           time_scale=float(TIME_SCALE))
    running.start()
    yield running
    running.stop()


def test_submit_to_result(cluster: LocalCluster, redis_url: str, redis_prefix: str):
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        result = dio.submit("hello", max_tokens=16).result(timeout=30)
    assert result.status.value == "completed"
    assert result.output_tokens == 16
    assert result.worker in {"H100-1", "T4-1"}
    assert result.submitted_at <= result.dispatched_at <= result.started_at <= result.finished_at


def test_many_requests_all_end_exactly_once(cluster: LocalCluster, redis_url: str, redis_prefix: str):
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 500, "max_tokens": 50} for _ in range(300)])
        results = dio.wait_all(handles, timeout=60)
    assert [r.status.value for r in results] == ["completed"] * 300
    assert {r.worker for r in results} == {"H100-1", "T4-1"}


def test_the_simulated_model_stops_at_its_eos_under_the_cap(cluster, redis_url, redis_prefix):
    """max_tokens is a cap the router sees; the true output length reaches only the simulated engine."""
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        result = dio.submit("x", max_tokens=256, metadata={SIM_EOS_METADATA: "7"}).result(timeout=30)
        assert result.status.value == "completed" and result.output_tokens == 7
        assert result.worker in {"H100-1", "T4-1"}
        with pytest.raises(JobRejected) as caught:  # the worker refuses a malformed EOS: not retried
            dio.submit("x", max_tokens=8, metadata={SIM_EOS_METADATA: "soon"}).result(timeout=30)
    assert SIM_EOS_METADATA in caught.value.reason


def test_too_large_for_every_worker_is_rejected_with_a_reason(cluster, redis_url, redis_prefix):
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        with pytest.raises(JobRejected) as caught:
            dio.submit("x", num_prompt_tokens=250_000, max_tokens=1000).result(timeout=30)
    assert "too large for every worker" in caught.value.reason


def test_malformed_intake_entries_do_not_stop_the_dispatcher(cluster, redis_url, redis_prefix):
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    raw.xadd(keys.intake, {REQUEST_FIELD: "not json"})
    raw.xadd(keys.intake, {"nothing": "here"})
    raw.xadd(keys.intake, {REQUEST_FIELD: json.dumps({"id": "bad-1", "prompt": "x", "max_tokens": -5})})
    raw.xadd(keys.intake, {REQUEST_FIELD: json.dumps({"id": "bad-2", "prompt": "x", "evil": "__import__('os')"})})
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        assert dio.submit("still alive", max_tokens=4).result(timeout=30).status.value == "completed"
        assert dio.get("bad-1").status.value == "rejected"
        assert "max_tokens" in dio.get("bad-1").reason
        assert "evil" in dio.get("bad-2").reason
    assert raw.xlen(keys.deadletter) == 2


def test_a_workers_queue_never_exceeds_its_bound(redis_url: str, redis_prefix: str):
    keys = Keys(redis_prefix)
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1)], key_prefix=redis_prefix, time_scale=20.0,
                           worker_args=["--max-num-seqs", "4"])
    running.start()
    try:
        raw = redis.Redis.from_url(redis_url, decode_responses=True)
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 200, "max_tokens": 40}
                                       for _ in range(60)])
            depths = []
            while not all(h.done() for h in handles):
                depths.append(raw.xlen(keys.queue("L4-1")))
                time.sleep(0.01)
            results = dio.wait_all(handles, timeout=60)
        assert all(r.status.value == "completed" for r in results)
        assert max(depths) <= 4 + 2  # engine slots + prefetch; the rest waited in the dispatcher
        assert max(depths) >= 1
    finally:
        running.stop()


def test_a_killed_worker_loses_nothing(redis_url: str, redis_prefix: str):
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1), WorkerSpec("T4", 1)], key_prefix=redis_prefix,
                           time_scale=5.0)
    running.start()
    try:
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 300, "max_tokens": 1000}
                                       for _ in range(40)])
            # Kill the L4 once it holds some of them (under load its registration can lag the burst).
            conn = redis.Redis.from_url(redis_url, decode_responses=True)
            keys = Keys(redis_prefix)
            wait_for(lambda: any(conn.hget(keys.job(h.id), "worker") == "L4-1" for h in handles),
                     timeout_s=20, what="a job on the L4")
            conn.close()
            time.sleep(0.3)
            victim = running.processes[1]  # the L4 worker, mid-run
            os.killpg(victim.pid, signal.SIGKILL)
            results = dio.wait_all(handles, timeout=90)
        assert [r.status.value for r in results] == ["completed"] * 40
        assert {r.worker for r in results} == {"T4-1"}  # the L4's jobs were requeued and ran on the T4
        assert any(r.attempts and r.attempts > 1 for r in results)
    finally:
        running.stop()


def test_predictor_state_survives_a_dispatcher_restart(redis_url: str, redis_prefix: str):
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    running = LocalCluster(redis_url, [WorkerSpec("H100", 1)], key_prefix=redis_prefix, time_scale=100.0)
    running.start()
    try:
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            dio.wait_all(dio.submit_many([{"prompt": "x", "max_tokens": 20} for _ in range(20)]), timeout=30)
        # The clients have their results; the dispatcher learns from the completions a moment later
        # (it deletes each one it has learned from): stop it only once it has read them all.
        deadline = time.monotonic() + 10
        while raw.xlen(keys.completions) and time.monotonic() < deadline:
            time.sleep(0.05)
        dispatcher = running.processes[0]
        dispatcher.send_signal(signal.SIGTERM)
        dispatcher.wait(timeout=10)
        saved = json.loads(raw.hget(keys.predictor, "H100-1"))
        assert saved["seen"] >= 20
        env = running.env()
        restarted = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", "dispatcher"], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        running.processes.append(restarted)
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            assert dio.submit("after restart", max_tokens=5).result(timeout=30).status.value == "completed"
    finally:
        running.stop()
    assert "restored (2" in restarted.stderr.read()


def test_sigterm_drains_in_flight_jobs(redis_url: str, redis_prefix: str):
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1)], key_prefix=redis_prefix, time_scale=10.0)
    running.start()
    try:
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 100, "max_tokens": 400}
                                       for _ in range(5)])
            deadline = time.monotonic() + 10
            while raw.hget(keys.worker("L4-1"), "in_flight") != "5" and time.monotonic() < deadline:
                time.sleep(0.05)
            worker = running.processes[1]
            worker.send_signal(signal.SIGTERM)  # draining: stop reading, finish what runs
            results = dio.wait_all(handles, timeout=30)
            assert worker.wait(timeout=30) == 0
        assert [(r.status.value, r.worker, r.attempts) for r in results] == [("completed", "L4-1", 1)] * 5
    finally:
        running.stop()


def test_a_stalled_worker_registers_again_and_serves(redis_url: str, redis_prefix: str):
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1)], key_prefix=redis_prefix, time_scale=50.0,
                           extra_env={"DIO_HEARTBEAT_TTL_S": "1", "DIO_HEARTBEAT_INTERVAL_S": "0.2"})
    running.start()
    try:
        worker = running.processes[1]
        os.killpg(worker.pid, signal.SIGSTOP)  # a stall longer than its heartbeat's TTL
        deadline = time.monotonic() + 10
        while raw.sismember(keys.workers, "L4-1") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not raw.sismember(keys.workers, "L4-1")  # the dispatcher took it back
        os.killpg(worker.pid, signal.SIGCONT)
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            result = dio.submit("after the stall", max_tokens=8).result(timeout=20)
        assert (result.status.value, result.worker) == ("completed", "L4-1")
        assert raw.sismember(keys.workers, "L4-1")
    finally:
        running.stop()


def test_a_stalled_workers_requeued_jobs_run_to_the_end_once(redis_url: str, redis_prefix: str):
    """SIGSTOP a worker past its heartbeat: its jobs run elsewhere, and its own copies are aborted on SIGCONT."""
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    running = LocalCluster(redis_url, [WorkerSpec("L4", 2)], key_prefix=redis_prefix, time_scale=4.0,
                           extra_env={"DIO_HEARTBEAT_TTL_S": "1", "DIO_HEARTBEAT_INTERVAL_S": "0.2"})
    running.start()
    try:
        with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
            handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 200, "max_tokens": 400}
                                       for _ in range(8)])
            deadline = time.monotonic() + 10
            while int(raw.hget(keys.worker("L4-1"), "in_flight") or 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            stalled = running.processes[1]  # L4-1, running some of them
            os.killpg(stalled.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 10
            while raw.sismember(keys.workers, "L4-1") and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)  # its jobs were requeued and handed to L4-2
            os.killpg(stalled.pid, signal.SIGCONT)
            results = dio.wait_all(handles, timeout=60)
        assert [r.status.value for r in results] == ["completed"] * 8
        assert any(r.attempts and r.attempts > 1 for r in results)  # some ran after a requeue
        # Every copy ended, on both workers (a second copy would still be running): then count, per
        # worker, the jobs it ran to the end.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            time.sleep(0.5)  # more than a heartbeat
            if all(raw.hget(keys.worker(w), "in_flight") == "0" for w in ("L4-1", "L4-2")):
                break
        completed = [int(raw.hget(keys.worker(w), "completed") or 0) for w in ("L4-1", "L4-2")]
        assert sum(completed) == 8, completed  # not 8 + the requeued ones: no job ran to the end twice
    finally:
        running.stop()
