"""DIO on a real Redis Cluster: three private ``redis-server --cluster-enabled yes`` nodes.

Every key of a deployment shares one hash tag, so each script, pipeline and multi-stream read
stays in one slot; the processes open ``RedisCluster`` clients from a ``redis+cluster://`` URL
(or ``DIO_REDIS_CLUSTER=true``). The pipeline is the real one: dispatcher and worker processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
from redis.crc import key_slot

from dio.client import AsyncClient, Client, ClientSettings
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.ops.redis_server import start_private_cluster
from dio.protocol.connection import connect, connect_async, delete_keys, is_cluster, server_url
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def every_key(keys: Keys) -> list[str]:
    """One name of each kind of key a deployment uses (every property and key method of ``Keys``)."""
    made = []
    for name in dir(Keys):
        if name.startswith("_") or name in ("prefix", "all_keys_pattern"):
            continue
        key = getattr(keys, name)
        made.append(key("some-id") if callable(key) else key)
    return made


def test_a_deployments_keys_share_one_slot_and_prefixes_spread_over_nodes(redis_cluster_url: str):
    assert len(every_key(Keys())) >= 20 and len({key_slot(k.encode()) for k in every_key(Keys())}) == 1
    conn = connect(CommonSettings(redis_url=redis_cluster_url))
    try:
        nodes = {conn.get_node_from_key(Keys(f"{{pool-{i}}}:").intake).name for i in range(12)}
    finally:
        conn.close()
    assert len(nodes) == 3  # different hash tags (deployments) land on different nodes


def test_a_cluster_url_or_setting_selects_a_cluster_client(redis_cluster_url: str):
    assert is_cluster(CommonSettings(redis_url=redis_cluster_url))
    plain = server_url(redis_cluster_url)
    assert plain.startswith("redis://") and not is_cluster(CommonSettings(redis_url=plain))
    conn = connect(CommonSettings(redis_url=plain, redis_cluster=True))
    try:
        assert conn.ping() and len(conn.get_primaries()) == 3
    finally:
        conn.close()
    with pytest.raises(ValueError, match="only database 0"):
        connect(CommonSettings(redis_url=redis_cluster_url.replace("/0", "/15")))


def getkeys_calls(conn: redis.Redis) -> int:
    """How many COMMAND GETKEYS the cluster's primaries have answered."""
    stats = conn.info("commandstats", target_nodes=redis.RedisCluster.PRIMARIES)  # type: ignore[call-arg]
    return sum(node.get("cmdstat_command|getkeys", {}).get("calls", 0) for node in stats.values())


def test_scripts_and_stream_reads_find_their_keys_without_asking_a_node(redis_cluster_url: str, cluster_prefix: str):
    keys = Keys(cluster_prefix)
    settings = CommonSettings(redis_url=redis_cluster_url)
    conn = connect(settings)
    try:
        conn.xadd(keys.intake, {"req": "x"})
        conn.xgroup_create(keys.intake, "g", id="0")
        before = getkeys_calls(conn)
        assert conn.xread({keys.intake: "0", keys.completions: "0"}, count=1)[0][0] == keys.intake
        assert conn.xreadgroup("g", "c", {keys.intake: ">"}, count=1)
        with conn.pipeline() as pipe:  # a pipelined script, as the dispatcher's hand-offs are
            pipe.execute_command("EVAL", "return redis.call('XLEN', KEYS[1])", 1, keys.intake)
            pipe.execute_command("EVAL", "return #KEYS", 2, keys.intake, keys.completions)
            assert pipe.execute() == [1, 2]

        async def read_async() -> list:
            aconn = connect_async(settings)
            try:
                return await aconn.xread({keys.intake: "0"}, count=1)
            finally:
                await aconn.aclose()

        assert asyncio.run(read_async())[0][0] == keys.intake
        assert getkeys_calls(conn) == before
    finally:
        conn.close()


@pytest.fixture
def pipeline(redis_cluster_url: str, cluster_prefix: str):
    # Round-robin: these tests check the cluster's plumbing with both workers in use, which DIO's
    # routing does not promise for one burst (it may keep all of it on the H100, whose queue holds it).
    running = LocalCluster(redis_cluster_url, [WorkerSpec("H100", 1), WorkerSpec("T4", 1)], key_prefix=cluster_prefix,
                           time_scale=200.0, policy="round-robin")
    running.start()
    yield running
    running.stop()


def test_requests_end_exactly_once_on_a_cluster(pipeline: LocalCluster, redis_cluster_url: str, cluster_prefix: str):
    with Client(redis_url=redis_cluster_url, key_prefix=cluster_prefix) as dio:
        first = dio.submit("hello", max_tokens=16).result(timeout=30)
        handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 500, "max_tokens": 50} for _ in range(200)])
        results = dio.wait_all(handles, timeout=60)
        assert dio.get(first.id).status.value == "completed"
    assert (first.status.value, first.output_tokens) == ("completed", 16)
    assert [(r.status.value, r.attempts) for r in results] == [("completed", 1)] * 200  # each handed off once
    assert len({r.id for r in results}) == 200 and {r.worker for r in results} == {"H100-1", "T4-1"}


def test_the_async_client_on_a_cluster(pipeline: LocalCluster, redis_cluster_url: str, cluster_prefix: str):
    async def run() -> list[str]:
        async with AsyncClient(redis_url=redis_cluster_url, key_prefix=cluster_prefix) as dio:
            handles = await dio.submit_many([{"prompt": "x", "max_tokens": 8} for _ in range(20)])
            return [(await h.result(timeout=30)).status.value for h in handles]

    assert asyncio.run(run()) == ["completed"] * 20


def test_a_killed_worker_loses_nothing_on_a_cluster(redis_cluster_url: str, cluster_prefix: str):
    running = LocalCluster(redis_cluster_url, [WorkerSpec("L4", 1), WorkerSpec("T4", 1)], key_prefix=cluster_prefix,
                           time_scale=10.0, extra_env={"DIO_HEARTBEAT_TTL_S": "1", "DIO_HEARTBEAT_INTERVAL_S": "0.2"})
    running.start()
    try:
        with Client(redis_url=redis_cluster_url, key_prefix=cluster_prefix) as dio:
            handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 300, "max_tokens": 1000}
                                       for _ in range(20)])
            # Kill the L4 once it holds some of them (on a loaded machine its registration can lag the burst).
            keys = Keys(cluster_prefix)
            wait_for(lambda: any(dio.redis.hget(keys.job(h.id), "worker") == "L4-1" for h in handles),
                     timeout_s=60, what="a job on the L4")
            os.killpg(running.processes[1].pid, signal.SIGKILL)  # the L4 worker, mid-run
            results = dio.wait_all(handles, timeout=90)
        assert [r.status.value for r in results] == ["completed"] * 20
        assert any(r.attempts and r.attempts > 1 for r in results)  # the L4's jobs were requeued
    finally:
        running.stop()


def test_one_deployment_per_model_pool_spreads_the_pools_over_nodes(redis_cluster_url: str):
    """The documented layout: each model pool its own DIO_KEY_PREFIX (hash tag), dispatcher and workers."""
    conn = connect(CommonSettings(redis_url=redis_cluster_url))
    pools = {"llama-3.2-3b": "{dio-llama-3b}:", "llama-3.1-8b": "{dio-llama-8b}:"}
    try:
        assert len({conn.get_node_from_key(Keys(p).intake).name for p in pools.values()}) == 2
        running = [LocalCluster(redis_cluster_url, [WorkerSpec("H100", 1)], key_prefix=prefix, model=model,
                                time_scale=200.0) for model, prefix in pools.items()]
        try:
            for pool in running:
                pool.start()
            for model, prefix in pools.items():
                with Client(redis_url=redis_cluster_url, key_prefix=prefix) as dio:
                    result = dio.submit("x", model=model, max_tokens=4).result(timeout=30)
                assert (result.status.value, result.worker) == ("completed", "H100-1")
        finally:
            for pool in running:
                pool.stop()
    finally:
        for prefix in pools.values():
            delete_keys(conn, Keys(prefix))
        conn.close()


def dio_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dio.ops.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120, check=False)


def test_inspect_and_reset_on_a_cluster(pipeline: LocalCluster, redis_cluster_url: str, cluster_prefix: str):
    env = {"DIO_REDIS_URL": redis_cluster_url, "DIO_KEY_PREFIX": cluster_prefix}
    inspected = dio_command("inspect", "--json", env=env)
    assert inspected.returncode == 0, inspected.stderr
    assert "H100-1" in inspected.stdout and "T4-1" in inspected.stdout
    pipeline.stop()
    reset = dio_command("reset", "--yes", env=env)
    assert reset.returncode == 0, reset.stderr
    conn = connect(CommonSettings(redis_url=redis_cluster_url))
    try:
        assert not list(conn.scan_iter(match=Keys(cluster_prefix).all_keys_pattern()))
    finally:
        conn.close()


def test_dio_demo_on_a_private_cluster_loses_nothing():
    shown = dio_command("demo", "--redis-cluster", "--json", "--requests", "60", "--time-scale", "50",
                        "--workers", "H100:1,T4:1", env={})
    assert shown.returncode == 0, shown.stderr[-2000:]
    summary = json.loads(shown.stdout.strip().splitlines()[-1])
    assert summary["submitted"] == 60 and summary["lost"] == 0
    assert summary["redis"] == "cluster (3 primaries)"


def test_a_streamed_job_and_a_stored_batch_on_a_cluster(pipeline: LocalCluster, redis_cluster_url: str,
                                                         cluster_prefix: str):
    from dio.client.batches import create_batch, get_batch, upload_file
    from dio.ops.batch_runner import BatchRunnerDaemon

    settings = ClientSettings(redis_url=redis_cluster_url, key_prefix=cluster_prefix, poll_interval_s=0.2)
    with Client(settings) as dio:
        handle = dio.submit("stream me", max_tokens=12, stream=True)
        events = list(handle.stream(timeout=30))
        assert events[-1].result is not None and events[-1].result.status.value == "completed"
        assert "".join(e.text for e in events) == events[-1].result.text
        lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": pipeline.model, "prompt": "x", "max_tokens": 4}}) for i in range(5)]
        batch = create_batch(dio, upload_file(dio, ("\n".join(lines) + "\n").encode(), "in.jsonl").id,
                             "/v1/completions")
        runner = BatchRunnerDaemon(settings, "runner-cluster", scan_interval_s=0.1)
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while (current := get_batch(dio, batch.id)) is not None and current.status != "completed":
                assert time.monotonic() < deadline, current
                time.sleep(0.1)
        finally:
            runner.stop()
            thread.join(20)
    assert current is not None and current.request_counts.completed == 5


def test_a_cluster_with_no_node_up_is_a_connection_error():
    """redis-py's own error for it is no RedisError: every process's outage handling would miss it."""
    with start_private_cluster() as cluster:
        settings = CommonSettings(redis_url=cluster.url, key_prefix="{down}:")
        sync = connect(settings)
        sync.set(settings.keys.lease, "x")
        for node in cluster.nodes:
            assert node.process is not None
            node.process.kill()
            node.process.wait()
        with pytest.raises(redis.ConnectionError):
            sync.get(settings.keys.lease)
        pipe = sync.pipeline(transaction=False)
        pipe.get(settings.keys.lease)
        with pytest.raises(redis.ConnectionError):
            pipe.execute()
        later = connect(settings)  # made on first use: a process started now waits for the cluster
        with pytest.raises(redis.ConnectionError):
            later.ping()

        async def read_async() -> None:
            async_client = connect_async(settings)
            try:
                await async_client.get(settings.keys.lease)
            finally:
                await async_client.aclose()

        with pytest.raises(redis.ConnectionError):
            asyncio.run(read_async())
