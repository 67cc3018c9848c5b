"""Shared fixtures: a real Redis under a unique key prefix, cleaned up after each test.

Integration tests use the server at ``DIO_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``);
when none answers there, a private ``redis-server`` is started for the session (``dio.ops.redis_server``),
so a fresh machine runs every test instead of skipping them. Every test gets its own prefix, a Cluster hash tag such as
``{t1a2b3c4d}:``, so tests never see each other's keys and can run against a shared server.
A test that stops Redis (an outage) uses ``restartable_redis``, a private server of its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from dio.ops.redis_server import ensure_redis, find_redis_server
from dio.protocol.keys import Keys
from dio.protocol.pools import delete_deployment
from dio.protocol.settings import CommonSettings

TEST_REDIS_URL = os.environ.get("DIO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Return the test server's URL, starting a private server when none answers there."""
    with ensure_redis(TEST_REDIS_URL) as server:
        yield server.url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """Yield a unique key prefix; delete every key under it after the test."""
    prefix = f"{{t{uuid.uuid4().hex[:8]}}}:"
    yield prefix
    conn = redis.Redis.from_url(redis_url, decode_responses=True, encoding_errors="surrogateescape")
    try:
        delete_deployment(conn, Keys(prefix))  # a sharded test's model pools too
    finally:
        conn.close()


@pytest.fixture
def settings(redis_url: str, redis_prefix: str) -> CommonSettings:
    """Settings pointing at the test server and prefix (extend with ``Cls(**settings.model_dump())``)."""
    return CommonSettings(redis_url=redis_url, key_prefix=redis_prefix)


@pytest.fixture
def client_settings(settings: CommonSettings):
    """Client settings on the test server; a short poll interval keeps lost-notice tests fast."""
    from dio.client import ClientSettings

    return ClientSettings(**settings.model_dump(), poll_interval_s=0.2)


@pytest.fixture
def backend(client_settings):
    """A fake backend thread that ends every request through the real finish script."""
    from dio.client.testing import EchoBackend

    with EchoBackend(client_settings) as echo:
        yield echo


@pytest.fixture
def client(client_settings):
    """A sync client on the test server."""
    from dio.client import Client

    with Client(client_settings) as dio:
        yield dio


class RestartableRedis:
    """A private redis-server on a fixed port that a test stops and starts again: a Redis outage.

    ``stop(save=True)`` writes its data to disk first, so the next ``start()`` comes back with it (a
    restart); ``save=False`` comes back empty (a failover to a fresh server: groups and keys gone).
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = find_redis_server()
        self.workdir = workdir
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--daemonize", "no"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_connect_timeout=0.2).ping():
                    return
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("the private redis-server did not start")

    def stop(self, save: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            redis.Redis.from_url(self.url).shutdown(save=save, nosave=not save)
        except redis.ConnectionError:
            pass  # it closes the connection as it exits
        self.process.wait(10)

    def outage(self, seconds: float, then: Callable[[], None] = lambda: None) -> threading.Thread:
        """In a thread: stop (its data kept), stay down ``seconds``, start again, then call ``then``."""

        def run() -> None:
            self.stop(save=True)
            time.sleep(seconds)
            self.start()
            then()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread


@pytest.fixture
def restartable_redis(tmp_path: Path) -> Iterator[RestartableRedis]:
    """A private Redis the test may stop and restart (never the shared one)."""
    server = RestartableRedis(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture(scope="session")
def redis_cluster_url() -> Iterator[str]:
    """A private three-node Redis Cluster for the session: the ``redis+cluster://`` URL of its first node."""
    from dio.ops.redis_server import start_private_cluster

    with start_private_cluster() as cluster:
        yield cluster.url


@pytest.fixture
def cluster_prefix(redis_cluster_url: str) -> Iterator[str]:
    """Yield a unique key prefix (one hash tag) on the private cluster; delete its keys after the test."""
    from dio.protocol.connection import connect

    prefix = f"{{t{uuid.uuid4().hex[:8]}}}:"
    yield prefix
    conn = connect(CommonSettings(redis_url=redis_cluster_url))
    try:
        delete_deployment(conn, Keys(prefix))
    finally:
        conn.close()
