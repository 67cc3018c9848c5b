"""The ACL file ``ops/redis/users.acl`` on a real redis-server: every role works, and only its keys.

A private server loads the file (each user given a random password, plus an admin for the test);
the dispatcher and worker run as processes with their own users, the client, gateway and batch
runner with theirs. Nothing may be refused while the pipeline runs (the server's ACL LOG stays
empty), and a role that reaches past its keys or commands is refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from fnmatch import fnmatchcase
from importlib import resources
from pathlib import Path

import pytest
import redis

from dio.client import Client, ClientSettings
from dio.ops.redis_server import RedisHandle, find_redis_server, server_version, start_private_server
from dio.protocol.keys import Keys

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROLES = ("dio-client", "dio-dispatcher", "dio-worker", "dio-gateway", "dio-batch-runner", "dio-admin")
KEYS = Keys()  # the file names the default prefix, {dio}:; the server is private, so the test uses it
TIME_SCALE = "200"


def acl_text() -> str:
    return resources.files("dio.ops").joinpath("redis", "users.acl").read_text()


@dataclass
class AclServer:
    server: RedisHandle
    passwords: dict[str, str]
    admin: redis.Redis

    def settings(self, role: str, **more: object) -> ClientSettings:
        return ClientSettings(redis_url=self.server.url, redis_username=role, redis_password=self.passwords[role],
                              poll_interval_s=0.2, **more)

    def env(self, role: str) -> dict[str, str]:
        return {**os.environ, "DIO_REDIS_URL": self.server.url, "DIO_REDIS_USERNAME": role,
                "DIO_REDIS_PASSWORD": self.passwords[role], "DIO_KEY_PREFIX": KEYS.prefix}

    def as_role(self, role: str) -> redis.Redis:
        return redis.Redis.from_url(self.server.url, username=role, password=self.passwords[role],
                                    decode_responses=True)

    def refusals(self) -> list[str]:
        """What the server refused since the last call (ACL LOG), as 'user: command key' lines."""
        entries = self.admin.acl_log()
        self.admin.acl_log_reset()
        return [f"{e['username']}: {e['client-info']['cmd']} {e['object']} ({e['reason']})" for e in entries]


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    """A private redis-server with DIO's ACL file, each user given a random password, and a test admin."""
    if server_version(find_redis_server()) < (7, 0):
        pytest.skip("the ACL file needs redis-server 7.0 or later (%R~ key rules)")
    passwords = {role: uuid.uuid4().hex for role in ROLES}
    admin_password = uuid.uuid4().hex
    lines = [line + f" >{passwords[line.split()[1]]}" if line.split()[1] in passwords else line
             for line in acl_text().splitlines() if line.strip()]
    lines.append(f"user test-admin on >{admin_password} ~* &* +@all")
    path = tmp_path_factory.mktemp("acl") / "users.acl"
    path.write_text("\n".join(lines) + "\n")
    with start_private_server(extra_args=("--aclfile", str(path))) as server:
        admin = redis.Redis.from_url(server.url, username="test-admin", password=admin_password,
                                     decode_responses=True)
        yield AclServer(server, passwords, admin)
        admin.close()


def test_the_file_has_one_user_per_role_and_the_default_user_is_off():
    users = {line.split()[1]: line.split()[2:] for line in acl_text().splitlines() if line.startswith("user ")}
    assert set(users) == {"default", *ROLES}
    assert "off" in users["default"]
    for role in ROLES:
        assert "-@all" in users[role] and "~*" not in users[role]  # nothing unless granted; DIO's keys only
        assert all(rule.startswith(("~{dio}:", "%R~{dio}:", "~{dio/*}:", "%R~{dio/*}:"))  # the prefix, or a pool of it
                   for rule in users[role] if "~" in rule)


def test_every_kind_of_key_belongs_to_some_role():
    """A key kind added to protocol/keys.py without an ACL pattern would be refused to every process."""
    patterns = [rule.split("~", 1)[1] for line in acl_text().splitlines() if line.startswith("user dio-")
                and not line.startswith("user dio-admin") for rule in line.split() if "~" in rule]
    kinds = [name for name in dir(Keys) if not name.startswith("_") and name not in ("prefix", "all_keys_pattern")]
    for name in kinds:
        attribute = getattr(KEYS, name)
        key = attribute("some-id") if callable(attribute) else attribute
        assert any(fnmatchcase(key, pattern) for pattern in patterns), f"no role may use {key} (Keys.{name})"


def test_the_default_user_cannot_connect(acl_server: AclServer):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(acl_server.server.url).ping()


@pytest.fixture(scope="module")
def pipeline(acl_server: AclServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A dispatcher and a worker, each a process logged in as its role."""
    commands = {"dio-dispatcher": ["dispatcher"],
                "dio-worker": ["worker", "--engine", "sim", "--profile", "H100", "--id", "H100-1",
                               "--time-scale", TIME_SCALE]}
    logs = tmp_path_factory.mktemp("logs")
    processes: dict[Path, subprocess.Popen[bytes]] = {}
    for role, args in commands.items():
        with open(logs / f"{role}.log", "wb") as log:
            processes[logs / f"{role}.log"] = subprocess.Popen(
                [sys.executable, "-m", "dio.ops.cli", *args], env=acl_server.env(role), stdout=log,
                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (acl_server.admin.sismember(KEYS.workers, "H100-1") and acl_server.admin.get(KEYS.lease)):
            died = [path.read_text()[-2000:] for path, p in processes.items() if p.poll() is not None]
            assert not died and time.monotonic() < deadline, f"the dispatcher or worker did not come up: {died}"
            time.sleep(0.05)
        yield
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.wait(20)


def test_the_pipeline_runs_with_each_roles_user(acl_server: AclServer, pipeline: None):
    acl_server.refusals()
    with Client(acl_server.settings("dio-client")) as dio:
        assert dio.redis.acl_whoami() == "dio-client"
        result = dio.submit("hello", max_tokens=8).result(timeout=30)
        results = dio.wait_all(dio.submit_many([{"prompt": "x", "max_tokens": 4} for _ in range(20)]), timeout=30)
        assert dio.get(result.id).status.value == "completed"
        slow = dio.submit("long", max_tokens=100_000 // int(TIME_SCALE) * 100)
        assert slow.cancel()  # finish.lua, run by the client
        assert slow.result(timeout=30, raise_on_error=False).status.value == "cancelled"
    assert result.status.value == "completed" and result.worker == "H100-1"
    assert [r.status.value for r in results] == ["completed"] * 20
    time.sleep(0.5)  # the worker and the dispatcher finish what the cancel left them (acks, reservations)
    assert acl_server.refusals() == []


def test_a_client_cannot_touch_what_is_not_its_own(acl_server: AclServer, pipeline: None):
    client = acl_server.as_role("dio-client")
    refused = {
        "delete a worker's queue": lambda: client.delete(KEYS.queue("H100-1")),
        "read a worker's queue": lambda: client.xreadgroup("workers", "me", {KEYS.queue("H100-1"): ">"}),
        "register a worker": lambda: client.hset(KEYS.worker("fake"), "gpu", "H100"),
        "take the dispatcher's lease": lambda: client.set(KEYS.lease, "me"),
        "rewrite the predictors": lambda: client.hset(KEYS.predictor, "H100-1", "{}"),
        "read the dead letters": lambda: client.xrange(KEYS.deadletter),
        "write outside the prefix": lambda: client.set("elsewhere", "x"),
        "list every key": lambda: client.keys("*"),
        "flush the database": lambda: client.flushdb(),
        "read the configuration": lambda: client.config_get("requirepass"),
        "flush the scripts": lambda: client.script_flush(),
    }
    for what, attempt in refused.items():
        with pytest.raises(redis.exceptions.NoPermissionError):
            attempt()
            pytest.fail(f"a client could {what}")
    assert acl_server.admin.exists(KEYS.queue("H100-1"))
    assert "dio-client: del {dio}:queue:H100-1 (key)" in acl_server.refusals()  # the server logged each


def test_workers_and_gateways_stay_in_their_lanes(acl_server: AclServer, pipeline: None):
    worker, gateway = acl_server.as_role("dio-worker"), acl_server.as_role("dio-gateway")
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.xadd(KEYS.intake, {"req": "{}"})  # a worker cannot submit requests...
    with pytest.raises(redis.exceptions.NoPermissionError):
        worker.set(KEYS.lease, "me")  # ...nor act as the dispatcher
    assert gateway.smembers(KEYS.workers) == {"H100-1"}  # the gateway reads the model list...
    with pytest.raises(redis.exceptions.NoPermissionError):
        gateway.hset(KEYS.worker("H100-1"), "model", "other")  # ...and cannot change it
    assert gateway.get(KEYS.lease)  # its /ready reads who holds the dispatcher lease...
    with pytest.raises(redis.exceptions.NoPermissionError):
        gateway.set(KEYS.lease, "me")  # ...and cannot take it
    admin = acl_server.as_role("dio-admin")
    assert admin.hget(KEYS.worker("H100-1"), "gpu")  # the operator reads every DIO key
    with pytest.raises(redis.exceptions.NoPermissionError):
        admin.flushall()
    acl_server.refusals()  # these refusals were the point


def test_an_operator_inspects_with_the_admin_user(acl_server: AclServer, pipeline: None):
    acl_server.refusals()
    shown = subprocess.run([sys.executable, "-m", "dio.ops.cli", "inspect", "--json"],
                           env=acl_server.env("dio-admin"), capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0 and "H100-1" in shown.stdout, shown.stderr[-2000:]
    assert acl_server.passwords["dio-admin"] not in shown.stdout + shown.stderr
    assert acl_server.refusals() == []


def test_the_gateway_and_the_batch_runner_run_a_batch(acl_server: AclServer, pipeline: None):
    from dio.client.batches import create_batch, get_batch, upload_file
    from dio.ops.batch_runner import BatchRunnerDaemon

    acl_server.refusals()
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": "llama-3.2-3b", "prompt": "x", "max_tokens": 4}}) for i in range(5)]
    runner = BatchRunnerDaemon(acl_server.settings("dio-batch-runner"), "runner-acl", scan_interval_s=0.1)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        with Client(acl_server.settings("dio-gateway")) as gateway:
            upload = upload_file(gateway, ("\n".join(lines) + "\n").encode(), "in.jsonl")
            batch = create_batch(gateway, upload.id, "/v1/completions")
            deadline = time.monotonic() + 30
            while (current := get_batch(gateway, batch.id)) is not None and current.status != "completed":
                assert time.monotonic() < deadline, current
                time.sleep(0.1)
        assert current is not None and current.request_counts.completed == 5
    finally:
        runner.stop()
        thread.join(20)
    assert acl_server.refusals() == []


def start_worker(acl_server: AclServer, worker_id: str, log: Path) -> subprocess.Popen[bytes]:
    """An L4 worker serving llama-3.1-8b (no other worker does), as dio-worker, registered when this returns."""
    env = {**acl_server.env("dio-worker"), "DIO_HEARTBEAT_TTL_S": "1", "DIO_HEARTBEAT_INTERVAL_S": "0.2"}
    args = ["worker", "--engine", "sim", "--profile", "L4", "--id", worker_id, "--model", "llama-3.1-8b",
            "--time-scale", "5"]
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not acl_server.admin.sismember(KEYS.workers, worker_id):
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.05)
    return process


def test_a_dead_workers_jobs_are_taken_back_with_the_dispatchers_user(acl_server: AclServer, pipeline: None,
                                                                     tmp_path: Path):
    acl_server.refusals()
    victim = start_worker(acl_server, "L4-1", tmp_path / "L4-1.log")
    heir = start_worker(acl_server, "L4-2", tmp_path / "L4-2.log")
    try:
        with Client(acl_server.settings("dio-client")) as dio:
            deadline = time.monotonic() + 30
            while dio.submit("probe", model="llama-3.1-8b", max_tokens=1).result(
                    timeout=30, raise_on_error=False).status.value != "completed":  # the dispatcher sees them
                assert time.monotonic() < deadline, "the dispatcher never saw the L4s"
                time.sleep(0.1)
            handles = dio.submit_many([{"prompt": "x", "model": "llama-3.1-8b", "max_tokens": 200}
                                       for _ in range(12)])
            while not acl_server.admin.xlen(KEYS.queue("L4-1")):
                assert time.monotonic() < deadline, [dio.get(h.id).reason for h in handles[:1]]
                time.sleep(0.02)
            victim.kill()  # the dispatcher takes its queue back (requeue.lua), as dio-dispatcher
            results = dio.wait_all(handles, timeout=60)
    finally:
        for process in (victim, heir):
            process.kill()
            process.wait(10)
    assert [r.status.value for r in results] == ["completed"] * 12
    assert any(r.attempts and r.attempts > 1 and r.worker == "L4-2" for r in results)
    assert acl_server.refusals() == []


def test_an_operator_resets_with_the_admin_user(acl_server: AclServer, pipeline: None):
    acl_server.refusals()
    reset = subprocess.run([sys.executable, "-m", "dio.ops.cli", "reset", "--yes"], env=acl_server.env("dio-admin"),
                           capture_output=True, text=True, timeout=60, check=False)
    assert reset.returncode == 0, reset.stderr[-2000:]
    assert int(reset.stdout.split()[1]) > 0  # "deleted N keys" (the running processes make some again)
    assert acl_server.refusals() == []


def test_the_file_is_shipped_with_the_package():
    assert Path(str(resources.files("dio.ops").joinpath("redis", "users.acl"))).is_file()


def test_a_pool_sharded_by_model_runs_with_each_roles_user(acl_server: AclServer, tmp_path: Path):
    """DIO_SHARD_BY_MODEL: a pool's keys are {dio/<model>}:..., the registry {dio}:pools; the file allows both."""
    from dio.client.pools import ClientPools
    from dio.protocol.keys import pool_keys
    from dio.protocol.served_models import read_served_in

    model, pool = "tiny-llama-1b", pool_keys(KEYS, "tiny-llama-1b")
    sharded = {"DIO_SHARD_BY_MODEL": "true", "DIO_MODEL": model}
    commands = {"dio-dispatcher": ["dispatcher"],
                "dio-worker": ["worker", "--engine", "sim", "--profile", "L4", "--id", "L4-pool", "--time-scale",
                               TIME_SCALE]}
    processes = []
    for role, args in commands.items():
        with open(tmp_path / f"{role}.log", "wb") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args],
                                              env={**acl_server.env(role), **sharded}, stdout=log,
                                              stderr=subprocess.STDOUT))
    acl_server.refusals()
    try:
        deadline = time.monotonic() + 30
        while not (acl_server.admin.sismember(pool.workers, "L4-pool") and acl_server.admin.get(pool.lease)):
            assert time.monotonic() < deadline and all(p.poll() is None for p in processes), \
                [(tmp_path / f"{r}.log").read_text()[-2000:] for r in commands]
            time.sleep(0.05)
        assert acl_server.admin.smembers(KEYS.pools) == {model}
        with ClientPools(acl_server.settings("dio-client", shard_by_model=True)) as pools:
            client = pools.for_model(model)
            result = client.submit("hello", max_tokens=4).result(timeout=30)
            assert pools.find(result.id) is client
            slow = client.submit("long", max_tokens=1500)
            assert slow.cancel()
        with Client(acl_server.settings("dio-gateway", shard_by_model=True)) as gateway:
            served = read_served_in(gateway.redis, KEYS, sorted(gateway.redis.smembers(KEYS.pools)))
            assert served[model].live == ["L4-pool"] and gateway.redis.get(pool.lease)
        shown = subprocess.run([sys.executable, "-m", "dio.ops.cli", "inspect", "--json"],
                               env=acl_server.env("dio-admin"), capture_output=True, text=True, timeout=60, check=False)
        assert shown.returncode == 0 and "L4-pool" in shown.stdout, shown.stderr[-2000:]
        assert result.status.value == "completed" and result.worker == "L4-pool"
        time.sleep(0.5)  # the worker and the dispatcher finish what the cancel left them
        assert acl_server.refusals() == []
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(20)
        for key in acl_server.admin.scan_iter(match=pool.all_keys_pattern()):
            acl_server.admin.delete(key)
        acl_server.admin.delete(KEYS.pools)
