"""The local cluster (``dio up``): supervised children, connection settings passed down, no secret printed.

Real processes on a real Redis: a child SIGKILLed under a supervising cluster comes back and serves;
``dio up`` against a private password-protected ``redis-server`` starts children that reach it,
restarts one that dies, and never prints the password (neither from DIO_REDIS_PASSWORD nor from
inside the URL).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from dio.client import Client, ClientSettings
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.ops.redis_server import find_redis_server
from dio.protocol.connection import redact_url
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings
from tests.dio_up import running_dio_up
from tests.waiting import wait_for

PASSWORD = "s3cret-Pa55"  # noqa: S105 - the private test server's, and what must never be printed
FAST_HEARTBEATS = {"DIO_HEARTBEAT_TTL_S": "1", "DIO_HEARTBEAT_INTERVAL_S": "0.2"}


@pytest.mark.parametrize(("url", "shown"), [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    (f"redis://:{PASSWORD}@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
    (f"rediss://dio:{PASSWORD}@redis.example:6380/2", "rediss://dio:***@redis.example:6380/2"),
    ("unix:///tmp/redis.sock?db=1", "unix:///tmp/redis.sock?db=1"),
    (f"redis://127.0.0.1:6379/0?password={PASSWORD}&db=2", "redis://127.0.0.1:6379/0?password=***&db=2"),
])
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_every_connection_setting_reaches_the_children_through_their_environment(monkeypatch) -> None:
    monkeypatch.delenv("DIO_REDIS_PASSWORD", raising=False)
    connection = CommonSettings(redis_url="rediss://redis.example:6380/0", redis_username="dio",
                                redis_password=PASSWORD, redis_ca_certs="/ca.pem", redis_certfile="/c.pem",
                                redis_keyfile="/k.pem", redis_cluster=True, key_prefix="{p}:")
    env = LocalCluster(connection.redis_url, [WorkerSpec("L4", 1)], key_prefix="{p}:", connection=connection).env()
    assert {k: env[k] for k in env if k.startswith("DIO_REDIS") or k == "DIO_KEY_PREFIX"} == {
        "DIO_REDIS_URL": "rediss://redis.example:6380/0", "DIO_REDIS_USERNAME": "dio", "DIO_REDIS_PASSWORD": PASSWORD,
        "DIO_REDIS_CA_CERTS": "/ca.pem", "DIO_REDIS_CERTFILE": "/c.pem", "DIO_REDIS_KEYFILE": "/k.pem",
        "DIO_REDIS_CLUSTER": "True", "DIO_KEY_PREFIX": "{p}:"}


@pytest.mark.integration
def test_a_killed_child_of_a_supervised_cluster_comes_back_and_serves(redis_url, redis_prefix, caplog):
    caplog.set_level(logging.INFO, logger="dio.ops")
    keys = Keys(redis_prefix)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    cluster = LocalCluster(redis_url, [WorkerSpec("H100", 1)], key_prefix=redis_prefix, time_scale=100.0,
                           extra_env=FAST_HEARTBEATS)
    cluster.start()
    stop = threading.Event()
    supervisor = threading.Thread(target=cluster.supervise, args=(stop,), kwargs={"interval_s": 0.1}, daemon=True)
    supervisor.start()
    try:
        for index in (1, 0):  # the worker, then the dispatcher
            victim = cluster.processes[index]
            os.killpg(victim.pid, signal.SIGKILL)
            wait_for(lambda i=index, v=victim: cluster.processes[i].pid != v.pid, 10, "the restart")
            if index == 1:
                wait_for(lambda v=victim: raw.hget(keys.worker("H100-1"), "pid") not in (None, str(v.pid)),
                         10, "the restarted worker to register")
            with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
                assert dio.submit("after a restart", max_tokens=4).result(timeout=20).status.value == "completed"
        restarts = [r.getMessage() for r in caplog.records if "restarting" in r.getMessage()]
        assert len(restarts) == 2 and "H100-1" in restarts[0] and "dispatcher" in restarts[1]
    finally:
        stop.set()
        supervisor.join(5)
        cluster.stop()
        raw.close()


def test_a_child_that_keeps_dying_is_restarted_with_capped_backoff() -> None:
    cluster = LocalCluster("redis://127.0.0.1:1/0", [WorkerSpec("L4", 1)])
    cluster._spawn("doomed", ["--an-option-that-does-not-exist"])  # exits at once, every time
    delays = []
    now = time.monotonic()
    try:
        for _ in range(8):
            cluster.processes[0].wait(30)
            assert cluster.restart_exited(now) == []  # seen exited: due once its backoff passed
            delay = cluster.restart_delay_s("doomed")
            assert cluster.restart_exited(now + delay - 0.01) == []
            assert cluster.restart_exited(now + delay) == ["doomed"]
            delays.append(delay)
            now += delay
    finally:
        cluster.stop()
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]  # doubling, capped


# --- dio up on a password-protected Redis ---------------------------------------------------------


@pytest.fixture
def protected_redis(tmp_path: Path) -> Iterator[int]:
    """A private redis-server that requires a password; yield its port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", PASSWORD],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(port), 10, "the private redis-server")
        yield port
    finally:
        server.kill()
        server.wait()


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, password=PASSWORD, socket_connect_timeout=0.2).ping())
    except redis.RedisError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("where", ["url", "variable"])
def test_dio_up_serves_from_a_password_protected_redis_and_never_prints_the_password(protected_redis, tmp_path,
                                                                                       where):
    port = protected_redis
    prefix = "{up}:"
    env = {**os.environ, **FAST_HEARTBEATS, "DIO_KEY_PREFIX": prefix, "PYTHONUNBUFFERED": "1"}
    env.pop("DIO_REDIS_PASSWORD", None)
    if where == "url":
        env["DIO_REDIS_URL"] = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    else:
        env["DIO_REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        env["DIO_REDIS_PASSWORD"] = PASSWORD
    logs = tmp_path / "logs"
    settings = ClientSettings(redis_url=f"redis://127.0.0.1:{port}/0", redis_password=PASSWORD, key_prefix=prefix)
    conn = redis.Redis(port=port, password=PASSWORD, decode_responses=True)
    try:
        args = ["--workers", "H100:1", "--time-scale", "100", "--log-dir", str(logs)]
        with running_dio_up(args, env) as (up, output):
            wait_for(lambda: any("Ctrl-C" in line for line in output) or up.poll() is not None, timeout_s=30,
                     what="dio up to come up")
            assert up.poll() is None, "".join(output)
            with Client(settings) as dio:
                assert dio.submit("through the password", max_tokens=4).result(timeout=20).status.value == "completed"
                worker_pid = int(conn.hget(Keys(prefix).worker("H100-1"), "pid"))
                os.kill(worker_pid, signal.SIGKILL)  # a child dies: it is restarted, the cluster stays up
                wait_for(lambda: conn.hget(Keys(prefix).worker("H100-1"), "pid") != str(worker_pid), timeout_s=15,
                         what="the worker's restart")
                assert dio.submit("after the restart", max_tokens=4).result(timeout=20).status.value == "completed"
    finally:
        conn.close()
    text = "".join(output)
    assert f"export DIO_REDIS_URL=redis://{':***@' if where == 'url' else ''}127.0.0.1:{port}/0" in text, text
    assert "restarting" in text and "H100-1" in text, text
    written = text + "".join(path.read_text(errors="replace") for path in logs.glob("*.log"))
    assert PASSWORD not in written
