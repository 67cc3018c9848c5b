"""One deployment sharded by model (``DIO_SHARD_BY_MODEL``): each model pool's keys under its own hash tag.

The prefix derivation and its refusals are pure; the rest runs real processes on a real Redis: two
pools, one dispatcher each, simulated workers, the gateway and the batch runner on top, and the same
on the private three-node Redis Cluster with the two pools' slots on different nodes.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from pydantic import ValidationError
from redis.crc import key_slot

from dio.client import AsyncClient, Client, ClientSettings
from dio.client.batch import cancel_orphans
from dio.client.pools import AsyncClientPools, ClientPools
from dio.dispatcher.config import DispatcherSettings
from dio.gpu_worker.config import WorkerSettings
from dio.ops.cli_edge import error_line
from dio.ops.local_cluster import LocalCluster, Pool, WorkerSpec, parse_pools
from dio.protocol.connection import connect
from dio.protocol.keys import Keys, check_model_name, pool_keys, pool_prefix
from dio.protocol.pools import delete_deployment, read_pools
from dio.protocol.settings import CommonSettings

SMALL, LARGE = "llama-3.2-3b", "tiny-llama-1b"  # two simulated models an H100 and an L4 each hold
TIME_SCALE = 50.0


# --- the prefix derivation (pure) -----------------------------------------------------------------


def test_a_pool_prefix_extends_the_base_hash_tag():
    assert pool_prefix("{dio}:", "llama-3.2-3b") == "{dio/llama-3.2-3b}:"
    assert pool_prefix("{t1}:x:", "m") == "{t1/m}:x:"
    assert pool_prefix("{dio}:", "org/model-7b") == "{dio/org/model-7b}:"  # a path-like name keeps its slashes
    pool = pool_keys(Keys(), SMALL)
    kinds = [pool.intake, pool.job("j"), pool.reply("c"), pool.queue("w"), pool.completions, pool.lease,
             pool.tokens("j"), pool.workers, pool.worker("w"), pool.alive("w"), pool.reserved("w"), pool.predictor]
    assert len({key_slot(k.encode()) for k in kinds}) == 1  # every script of the pool stays in one slot
    assert key_slot(pool.intake.encode()) != key_slot(Keys().intake.encode())
    assert pool.all_keys_pattern() == "\\{dio/llama-3.2-3b\\}:*"
    assert Keys().all_keys_pattern() == "\\{dio\\}:*"  # as before


@pytest.mark.parametrize("prefix", ["dio:", "{}:", "x{dio}:", "{dio:", ""])
def test_a_base_prefix_without_a_leading_hash_tag_cannot_be_sharded(prefix: str):
    with pytest.raises(ValueError, match="begins with a hash tag"):
        pool_prefix(prefix, SMALL)


@pytest.mark.parametrize("model", ["", "a{b", "a}b", "a b", "tab\there", "new\nline"])
def test_a_model_name_that_would_break_the_hash_tag_is_refused(model: str):
    with pytest.raises(ValueError, match="cannot name a key pool"):
        check_model_name(model)
    with pytest.raises(ValueError, match="cannot name a key pool"):
        CommonSettings(shard_by_model=True).keys_for(model)


def test_the_settings_choose_the_pool_keys_only_when_sharding():
    assert CommonSettings().keys_for(SMALL) == Keys()  # off: every model shares the deployment's keys
    assert CommonSettings(shard_by_model=True).keys_for(SMALL) == Keys("{dio/llama-3.2-3b}:")
    assert CommonSettings(shard_by_model=True).keys == Keys()  # the base keys stay the base keys
    with pytest.raises(ValidationError) as bad:
        CommonSettings(shard_by_model=True, key_prefix="dio:")
    line = error_line(bad.value)
    assert line is not None and line.startswith("bad setting DIO_KEY_PREFIX = 'dio:'") and "\n" not in line
    with pytest.raises(ValidationError, match="serves one model's pool"):
        DispatcherSettings(shard_by_model=True)
    assert DispatcherSettings(shard_by_model=True, model=LARGE).pool_keys == Keys("{dio/tiny-llama-1b}:")
    assert DispatcherSettings(model=LARGE).pool_keys == Keys()  # not sharded: the model is not read
    with pytest.raises(ValidationError, match="cannot name a key pool"):
        WorkerSettings(shard_by_model=True, model="two words")


def test_a_pool_spec_names_each_models_gpus():
    pools = parse_pools(f"{SMALL}=H100:1,L4:2; {LARGE}=T4")
    assert pools == [Pool(SMALL, (WorkerSpec("H100", 1), WorkerSpec("L4", 2))), Pool(LARGE, (WorkerSpec("T4", 1),))]
    for bad in ("H100:1", f"{SMALL}=H100;{SMALL}=L4", "=H100"):
        with pytest.raises(ValueError):
            parse_pools(bad)


def dio_command(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dio.ops.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


def test_a_sharded_dispatcher_without_a_model_exits_with_one_line():
    done = dio_command("dispatcher", env={"DIO_SHARD_BY_MODEL": "true"}, timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: bad setting DIO_MODEL = None: Value error, DIO_SHARD_BY_MODEL is on, so a dispatcher serves one "
        "model's pool: name it with --model or DIO_MODEL"]
    done = dio_command("dispatcher", "--model", SMALL, env={"DIO_SHARD_BY_MODEL": "true", "DIO_KEY_PREFIX": "dio:"},
                       timeout=30)
    assert done.returncode == 2 and done.stderr.startswith("error: bad setting DIO_KEY_PREFIX = 'dio:'")


# --- clients of a pool, on a real Redis -------------------------------------------------------------


@pytest.fixture
def sharded(client_settings: ClientSettings) -> ClientSettings:
    return client_settings.model_copy(update={"shard_by_model": True})


@pytest.mark.integration
def test_a_client_serves_one_pool_and_refuses_another_models_request(sharded: ClientSettings):
    with Client(sharded.model_copy(update={"model": SMALL})) as dio:
        assert dio.keys == pool_keys(sharded.keys, SMALL) and dio.base_keys == sharded.keys
        assert dio.reply_stream.startswith(dio.keys.prefix)  # its reply stream is in the pool's slot
        with pytest.raises(ValueError, match=f"'{LARGE}'.*'{SMALL}'"):
            dio.submit("x", model=LARGE)
        handle = dio.submit("x", max_tokens=4)  # no dispatcher: it waits, queued, in its pool
        assert dio.redis.exists(pool_keys(sharded.keys, SMALL).job(handle.id))
        assert not dio.redis.exists(sharded.keys.job(handle.id))
        assert handle.cancel()


@pytest.mark.integration
def test_client_pools_make_a_client_per_pool_and_find_a_jobs_pool(client_settings: ClientSettings,
                                                                  sharded: ClientSettings):
    with ClientPools(client_settings) as one:  # not sharded: the one ordinary client for every model
        assert one.for_model(SMALL) is one.for_model(LARGE) and one.models() == []
        job = one.for_model(SMALL).submit("x", model=LARGE, max_tokens=2)
        assert one.find(job.id) is one.home and one.find("no-such-job") is None
        assert job.cancel()
    with ClientPools(sharded) as pools:
        small, large = pools.for_model(SMALL), pools.for_model(LARGE)
        assert small is not large and small.keys != large.keys and pools.for_model(SMALL) is small
        small.redis.sadd(sharded.keys.pools, SMALL, LARGE)  # what the pools' workers write as they register
        assert pools.models() == sorted([SMALL, LARGE])
        handles = pools.submit_many([{"prompt": "a", "model": LARGE}, {"prompt": "b", "model": SMALL}])
        assert [h.client for h in handles] == [large, small]
        assert pools.find(handles[0].id) is large and pools.find(handles[1].id) is small
        assert pools.find("no-such-job") is None
        assert all(h.cancel() for h in handles)

    async def run_async() -> None:
        async with AsyncClientPools(sharded) as apools:
            client = apools.for_model(LARGE)
            assert isinstance(client, AsyncClient) and client.keys == pool_keys(sharded.keys, LARGE)
            handle = await client.submit("x", max_tokens=2)
            assert await apools.find(handle.id) is client and await apools.models() == sorted([SMALL, LARGE])
            assert await handle.cancel()

    asyncio.run(run_async())


@pytest.mark.integration
def test_a_new_batch_runner_cancels_each_orphan_in_its_own_pool(sharded: ClientSettings):
    """A runner that takes a batch over cancels the jobs its predecessor left in flight: each in its pool."""
    with ClientPools(sharded) as pools:
        home = pools.home
        home.redis.sadd(sharded.keys.pools, SMALL, LARGE)
        handles = pools.submit_many([{"prompt": "x", "model": m, "max_tokens": 4} for m in (SMALL, LARGE, LARGE)])
        batch_id = f"batch_{uuid.uuid4().hex[:8]}"
        home.redis.hset(home.base_keys.batch_inflight(batch_id), mapping={h.id: f"c{i}" for i, h in enumerate(handles)})
        assert cancel_orphans(home, batch_id, pools) == 3
        assert [h.result(timeout=10, raise_on_error=False).status.value for h in handles] == ["cancelled"] * 3
        assert not home.redis.exists(home.base_keys.batch_inflight(batch_id))


# --- two pools, sharded, on one Redis: gateway, batch runner, inspect, reset -------------------------


@pytest.fixture(scope="module")
def base_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"{{sh{uuid.uuid4().hex[:8]}}}:"
    yield prefix
    conn = connect(CommonSettings(redis_url=redis_url))
    delete_deployment(conn, Keys(prefix))
    conn.close()


@pytest.fixture(scope="module")
def two_pools(redis_url: str, base_prefix: str) -> Iterator[LocalCluster]:
    running = LocalCluster(redis_url, [], key_prefix=base_prefix, time_scale=TIME_SCALE, batch_runner=True,
                           pools=[Pool(SMALL, (WorkerSpec("H100", 1),)), Pool(LARGE, (WorkerSpec("L4", 1),))],
                           shard_by_model=True)
    running.start()
    yield running
    running.stop()


def pool_settings(redis_url: str, prefix: str, **more: object) -> ClientSettings:
    return ClientSettings(redis_url=redis_url, key_prefix=prefix, shard_by_model=True, poll_interval_s=0.2, **more)


@pytest.mark.integration
@pytest.mark.slow
def test_two_sharded_pools_each_with_its_dispatcher_and_workers(two_pools: LocalCluster, redis_url: str,
                                                                base_prefix: str):
    assert two_pools.dispatcher_names() == [f"dispatcher-{SMALL}", f"dispatcher-{LARGE}"]
    with ClientPools(pool_settings(redis_url, base_prefix)) as pools:
        handles = pools.submit_many([{"prompt": "x", "model": (SMALL, LARGE)[i % 2], "max_tokens": 8}
                                     for i in range(40)])
        results = [h.result(timeout=60, raise_on_error=False) for h in handles]
        assert pools.models() == sorted([SMALL, LARGE])
        base = pools.settings.keys
        leases = {m: pools.home.redis.get(pool_keys(base, m).lease) for m in (SMALL, LARGE)}
    assert [r.status.value for r in results] == ["completed"] * 40
    assert {r.worker for r in results[0::2]} == {f"{SMALL}-H100-1"} and {r.worker for r in results[1::2]} == {
        f"{LARGE}-L4-1"}
    assert all(leases.values()) and len(set(leases.values())) == 2  # one dispatcher per pool


@pytest.mark.integration
@pytest.mark.slow
def test_the_gateway_serves_two_sharded_models(two_pools: LocalCluster, redis_url: str, base_prefix: str):
    from dio.ops.gateway.settings import GatewaySettings
    from tests.test_gateway import RunningGateway, call

    gateway = RunningGateway(GatewaySettings(redis_url=redis_url, key_prefix=base_prefix, shard_by_model=True,
                                             poll_interval_s=0.2, gateway_models_cache_s=0))
    try:
        models = call(gateway.url, "GET", "/v1/models").json()
        assert sorted(m["id"] for m in models["data"]) == sorted([SMALL, LARGE])
        ready = call(gateway.url, "GET", "/ready").json()
        assert ready["status"] == "ready" and sorted(ready["dispatchers"]) == sorted([SMALL, LARGE])
        client = gateway.openai()
        for model in (SMALL, LARGE):
            answer = client.completions.create(model=model, prompt="hello", max_tokens=5)
            assert answer.model == model and answer.usage is not None and answer.usage.completion_tokens == 5
            chunks = list(client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4, stream=True))
            assert chunks and chunks[-1].choices[0].finish_reason == "length"
        unknown = call(gateway.url, "POST", "/v1/completions", {"model": "no-such-model", "prompt": "x"})
        assert unknown.status_code == 404
    finally:
        gateway.close()


@pytest.mark.integration
@pytest.mark.slow
def test_a_stored_batch_with_lines_of_two_models(two_pools: LocalCluster, redis_url: str, base_prefix: str):
    from dio.client.batches import create_batch, file_content, get_batch, upload_file

    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": (SMALL, LARGE, "no-such-model")[i % 3], "prompt": "x", "max_tokens": 3}})
             for i in range(9)]
    with Client(pool_settings(redis_url, base_prefix)) as dio:  # the Batch API's keys are the deployment's
        batch = create_batch(dio, upload_file(dio, ("\n".join(lines) + "\n").encode(), "two.jsonl").id,
                             "/v1/completions")
        deadline = time.monotonic() + 60
        while (current := get_batch(dio, batch.id)) is not None and current.status != "completed":
            assert time.monotonic() < deadline, current
            time.sleep(0.2)
        assert current is not None and current.output_file_id and current.error_file_id
        output = [json.loads(line) for line in (file_content(dio, current.output_file_id) or b"").decode().splitlines()]
        errors = [json.loads(line) for line in (file_content(dio, current.error_file_id) or b"").decode().splitlines()]
    assert (current.request_counts.completed, current.request_counts.failed) == (6, 3)
    assert sorted(o["response"]["body"]["model"] for o in output) == sorted([SMALL, LARGE] * 3)
    assert {e["error"]["code"] for e in errors} == {"model_not_found"}  # no pool: answered, not left waiting


@pytest.mark.integration
@pytest.mark.slow
def test_inspect_top_and_reset_look_across_the_pools(two_pools: LocalCluster, redis_url: str, base_prefix: str):
    env = {"DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": base_prefix}
    shown = dio_command("inspect", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout)
    assert sorted(facts["pools"]) == sorted([SMALL, LARGE])
    assert {(w["pool"], w["id"]) for w in facts["workers"]} == {(SMALL, f"{SMALL}-H100-1"), (LARGE, f"{LARGE}-L4-1")}
    top = dio_command("top", "--once", "--interval", "0.2", env={**env, "COLUMNS": "200"})
    assert top.returncode == 0 and f"{SMALL}-H100-1" in top.stdout and f"{LARGE}-L4-1" in top.stdout, top.stderr
    two_pools.stop()
    reset = dio_command("reset", "--yes", env=env)
    assert reset.returncode == 0, reset.stderr
    conn = connect(CommonSettings(redis_url=redis_url))
    try:
        for keys in (Keys(base_prefix), pool_keys(Keys(base_prefix), SMALL), pool_keys(Keys(base_prefix), LARGE)):
            assert not list(conn.scan_iter(match=keys.all_keys_pattern()))
    finally:
        conn.close()


# --- the three-node Redis Cluster ---------------------------------------------------------------------


def prefix_on_two_nodes(conn: redis.Redis, models: tuple[str, str]) -> str:
    """A fresh base prefix whose two pools' slots are served by different nodes (a few tries at most)."""
    for _ in range(100):
        prefix = f"{{c{uuid.uuid4().hex[:8]}}}:"
        nodes = {conn.get_node_from_key(pool_keys(Keys(prefix), m).intake).name for m in models}  # type: ignore[attr-defined]
        if len(nodes) == 2:
            return prefix
    raise AssertionError("no prefix put the two pools on two nodes")


@pytest.mark.integration
@pytest.mark.slow
def test_two_model_pools_sharded_on_a_cluster_land_on_two_nodes(redis_cluster_url: str):
    conn = connect(CommonSettings(redis_url=redis_cluster_url))
    prefix = prefix_on_two_nodes(conn, (SMALL, LARGE))
    base = Keys(prefix)
    slots = {m: key_slot(pool_keys(base, m).intake.encode()) for m in (SMALL, LARGE)}
    nodes = {m: conn.get_node_from_key(pool_keys(base, m).intake).name for m in (SMALL, LARGE)}  # type: ignore[attr-defined]
    running = LocalCluster(redis_cluster_url, [], key_prefix=prefix, time_scale=200.0, shard_by_model=True,
                           pools=[Pool(SMALL, (WorkerSpec("H100", 1), WorkerSpec("T4", 1))),
                                  Pool(LARGE, (WorkerSpec("L4", 1),))])
    try:
        running.start()
        with ClientPools(pool_settings(redis_cluster_url, prefix)) as pools:
            handles = pools.submit_many([{"prompt": "x", "model": (SMALL, LARGE)[i % 2], "num_prompt_tokens": 200,
                                          "max_tokens": 20} for i in range(100)])
            streamed = pools.for_model(LARGE).submit("stream me", model=LARGE, max_tokens=6, stream=True)
            events = list(streamed.stream(timeout=30))
            results = [h.result(timeout=90, raise_on_error=False) for h in handles]
            assert pools.models() == sorted([SMALL, LARGE])
    finally:
        running.stop()
        delete_deployment(conn, base)
        conn.close()
    assert slots[SMALL] != slots[LARGE] and nodes[SMALL] != nodes[LARGE]
    assert len(results) == 100 and [r.status.value for r in results] == ["completed"] * 100  # lost: none
    assert {r.worker for r in results if r.worker and r.worker.startswith(LARGE)} == {f"{LARGE}-L4-1"}
    assert events[-1].result is not None and events[-1].result.status.value == "completed"
    print(f"pool slots {slots}, nodes {nodes}")


@pytest.mark.integration
@pytest.mark.slow
def test_dio_demo_runs_two_pools_sharded_on_a_private_cluster():
    shown = dio_command("demo", "--redis-cluster", "--pools", "2", "--json", "--requests", "60", "--time-scale",
                        "50", "--workers", "H100:1", env={}, timeout=240)
    assert shown.returncode == 0, shown.stderr[-2000:]
    summary = json.loads(shown.stdout.strip().splitlines()[-1])
    assert summary["submitted"] == 60 and summary["lost"] == 0 and summary["sharded_by_model"]
    assert summary["redis"] == "cluster (3 primaries)"
    assert sorted(summary["pools"]) == sorted([SMALL, LARGE])
    for pool in summary["pools"].values():
        assert pool["submitted"] == 30 and pool["lost"] == 0 and ":" in pool["node"]


@pytest.mark.integration
def test_the_pool_registry_reads_only_names_that_can_name_a_pool(redis_url: str, redis_prefix: str):
    conn = connect(CommonSettings(redis_url=redis_url))
    try:
        conn.sadd(Keys(redis_prefix).pools, SMALL, "bad name", "a{b")
        assert read_pools(conn, Keys(redis_prefix)) == [SMALL]
    finally:
        conn.close()
