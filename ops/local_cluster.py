"""A local DIO cluster: one dispatcher and simulated workers as separate processes.

Used by ``dio up``, ``dio demo`` and the benchmarks. Each process is the real thing started
with ``python -m dio.ops.cli ...``: the same code an operator runs, talking through a real Redis.
With ``one_worker_process`` every simulated GPU runs in a single worker process (``dio worker
--cluster``), so a benchmark on a small machine does not spend its cores on idle interpreters.

Every connection setting (URL, ACL user and password, TLS files, key prefix) reaches the children
through their environment (``DIO_REDIS_*``, ``DIO_KEY_PREFIX``), never their command line. ``dio up``
supervises its children (``supervise``): one that exits is started again after a capped,
doubling backoff, with a log line; the rest of the cluster keeps serving meanwhile.

Several model pools (``pools``: each a model and its GPUs) run in one deployment; with
``shard_by_model`` (``DIO_SHARD_BY_MODEL``) each pool's keys have their own hash tag and the pool
its own dispatcher (``dio dispatcher --model M``), else one dispatcher routes every model.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dio.ops.redis_server import free_port
from dio.protocol.connection import connect
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings

log = logging.getLogger("dio.ops")

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0
RESTART_MIN_S = 0.5  # a child that exited is started again after this long, doubling per quick exit...
RESTART_MAX_S = 30.0  # ...up to this
RESTART_RESET_S = 60.0  # a child that ran this long before it exited starts the backoff over
BATCH_RUNNER_NAME = "batch-runner-1"  # the batch runner's child name and runner name
GATEWAY_NAME = "gateway"  # the gateway's child name
# CommonSettings fields the children read from their environment, as DIO_<FIELD>.
CONNECTION_FIELDS = ("redis_url", "redis_username", "redis_password", "redis_ca_certs", "redis_certfile",
                     "redis_keyfile", "redis_cluster", "shard_by_model", "key_prefix")
DISPATCHER_NAME = "dispatcher"  # the dispatcher's child name; sharded by model, one per pool: dispatcher-<model>


@dataclass(frozen=True)
class WorkerSpec:
    profile: str
    count: int


def parse_workers(spec: str) -> list[WorkerSpec]:
    """Parse ``H100:1,L4:2,T4:1`` (a GPU profile and how many of it; the count defaults to 1)."""
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        profile, _, count = part.partition(":")
        try:
            n = int(count) if count else 1
        except ValueError:
            raise ValueError(f"bad worker spec {part!r}: expected PROFILE:COUNT, e.g. L4:2") from None
        if n < 1:
            raise ValueError(f"bad worker spec {part!r}: the count must be at least 1")
        out.append(WorkerSpec(profile.strip(), n))
    if not out:
        raise ValueError("no workers given: expected e.g. H100:1,L4:2")
    return out


@dataclass(frozen=True)
class Pool:
    """One model and the simulated GPUs that serve it."""

    model: str
    workers: tuple[WorkerSpec, ...]


def parse_pools(spec: str) -> list[Pool]:
    """Parse ``llama-3.2-3b=H100:1,L4:1;llama-3.1-8b=A100-40GB:1`` (each model's GPUs, as ``--workers`` spells them)."""
    pools = []
    for part in spec.split(";"):
        if not part.strip():
            continue
        model, eq, workers = part.partition("=")
        if not eq or not model.strip():
            raise ValueError(f"bad pool spec {part.strip()!r}: expected MODEL=PROFILE:COUNT,..., e.g. "
                             "llama-3.1-8b=H100:1,L4:1")
        pools.append(Pool(model.strip(), tuple(parse_workers(workers))))
    if not pools:
        raise ValueError("no pools given: expected e.g. llama-3.2-3b=H100:1;llama-3.1-8b=L4:2")
    if len({p.model for p in pools}) < len(pools):
        raise ValueError(f"a model appears twice in the pool spec {spec!r}")
    return pools


def format_workers(specs: list[WorkerSpec]) -> str:
    """Return the ``H100:1,L4:2`` spec of a worker list (the inverse of ``parse_workers``)."""
    return ",".join(f"{s.profile}:{s.count}" for s in specs)


def worker_ids(specs: list[WorkerSpec]) -> list[tuple[str, str]]:
    """(profile, worker id) for every worker, ids like ``L4-1``."""
    return [(s.profile, f"{s.profile}-{i + 1}") for s in specs for i in range(s.count)]


def assign_metrics_ports(names: list[str], base: int | None = None) -> dict[str, int]:
    """Give each process its ``/metrics`` port: ``base``, ``base + 1``, ... in order, or free ones picked now.

    Free ports are found by binding them all at once on 127.0.0.1 (port 0), then letting them go;
    another program could take one before the child binds it (the child then exits with the error,
    and ``dio up`` shows it).
    """
    if base is not None:
        return {name: base + i for i, name in enumerate(names)}
    sockets = []
    try:
        for _ in names:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return {name: sock.getsockname()[1] for name, sock in zip(names, sockets, strict=True)}
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class Child:
    """One process of the cluster, as ``supervise`` tracks it."""

    name: str  # "dispatcher", a worker id, or "workers"
    args: list[str]  # after ``python -m dio.ops.cli``
    started_at: float
    restarts: int = 0  # restarts in a row after short lives (the backoff's exponent)
    exited_at: float | None = None  # when supervise saw it exited (None: running)


@dataclass
class LocalCluster:
    redis_url: str
    workers: list[WorkerSpec]
    key_prefix: str = Keys().prefix
    policy: str = "dio"
    predictor: str = "vector"
    model: str = DEFAULT_MODEL
    engine: str = "sim"
    time_scale: float = 1.0
    log_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    one_worker_process: bool = False  # host every worker in one process (dio worker --cluster)
    batch_runner: bool = False  # also run one `dio batch-runner` (named BATCH_RUNNER_NAME), as `dio up` does
    batch_runner_args: list[str] = field(default_factory=list)  # its options (--concurrency N, ...)
    gateway_port: int | None = None  # also run `dio gateway` on 127.0.0.1 at this port (0: a free one); None: none
    # Child name ("dispatcher", a worker id, or "workers") -> its Prometheus /metrics port (none: not served).
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # Where the children connect: user, password and TLS files (its URL and prefix are redis_url and
    # key_prefix above). None: CommonSettings from this process's DIO_* environment.
    connection: CommonSettings | None = None
    # Several model pools (None: one, ``model`` on ``workers``); their worker ids start with the model.
    pools: list[Pool] | None = None
    shard_by_model: bool = False  # each pool its own keys (hash tag) and dispatcher
    processes: list[subprocess.Popen] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)  # one per process this cluster started

    def pool_list(self) -> list[Pool]:
        """The pools this cluster runs (one, ``model`` on ``workers``, unless ``pools`` says otherwise)."""
        return self.pools or [Pool(self.model, tuple(self.workers))]

    def pool_workers(self, pool: Pool) -> list[tuple[str, str]]:
        """(profile, worker id) of a pool's workers: ``L4-1``, or ``<model>-L4-1`` with several pools."""
        prefix = f"{pool.model}-" if self.pools and len(self.pools) > 1 else ""
        return [(profile, prefix + worker_id) for profile, worker_id in worker_ids(list(pool.workers))]

    def dispatcher_names(self) -> list[str]:
        """One dispatcher, or one per pool (``dispatcher-<model>``) when sharded by model."""
        if not self.shard_by_model:
            return [DISPATCHER_NAME]
        return [f"{DISPATCHER_NAME}-{pool.model}" for pool in self.pool_list()]

    def connection_settings(self) -> CommonSettings:
        """Return the settings the children connect with (``redis_url`` and ``key_prefix`` win)."""
        base = self.connection if self.connection is not None else CommonSettings()
        return base.model_copy(update={"redis_url": self.redis_url, "key_prefix": self.key_prefix,
                                       "shard_by_model": self.shard_by_model})

    def env(self) -> dict[str, str]:
        """Return the children's environment: this one's, ``extra_env``, then every connection setting."""
        env = dict(os.environ)
        env.pop("DIO_METRICS_PORT", None)  # one port cannot serve every child: each gets its own, or none
        env.update(self.extra_env)
        connection = self.connection_settings()
        for name in CONNECTION_FIELDS:
            value = getattr(connection, name)
            env[f"DIO_{name.upper()}"] = "" if value is None else str(value)  # "" unsets an inherited one
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = self._popen(name, args)
        self.processes.append(proc)
        self.children.append(Child(name, args, started_at=time.monotonic()))
        return proc

    def _popen(self, name: str, args: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args], env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)

    def child_names(self) -> list[str]:
        """Return the names of the processes ``start`` runs, in order: the dispatchers, then the workers."""
        workers = ["workers"] if self.one_worker_process else [
            wid for pool in self.pool_list() for _, wid in self.pool_workers(pool)]
        return [*self.dispatcher_names(), *workers]

    def _metrics_args(self, name: str) -> list[str]:
        port = self.metrics_ports.get(name)
        return [] if port is None else ["--metrics-port", str(port)]

    def start(self) -> None:
        """Start the dispatcher(s) and every worker, and wait until all workers registered."""
        for name, pool in zip(self.dispatcher_names(), self.pool_list(), strict=False):
            serves = ["--model", pool.model] if self.shard_by_model else []
            self._spawn(name, ["dispatcher", "--policy", self.policy, "--predictor", self.predictor, *serves,
                               *self._metrics_args(name)])
        for pool in self.pool_list():
            self._start_workers(pool)
        if self.gateway_port is not None:
            self.gateway_port = self.gateway_port or free_port()
            self._spawn(GATEWAY_NAME, ["gateway", "--host", "127.0.0.1", "--port", str(self.gateway_port)])
        if self.batch_runner:  # restarted under its name, it takes its batches over at once
            self._spawn(BATCH_RUNNER_NAME, ["batch-runner", "--name", BATCH_RUNNER_NAME, *self.batch_runner_args])
        self.wait_ready()

    def _start_workers(self, pool: Pool) -> None:
        common = ["--engine", self.engine, "--model", pool.model, "--time-scale", str(self.time_scale)]
        if self.one_worker_process:
            if len(self.pool_list()) > 1:  # dio worker --cluster names its workers L4-1, ... in every pool
                raise ValueError("one_worker_process runs one pool only")
            self._spawn("workers", ["worker", *common, "--cluster", format_workers(list(pool.workers)),
                                    *self.worker_args, *self._metrics_args("workers")])
            return
        for profile, worker_id in self.pool_workers(pool):
            self._spawn(worker_id, ["worker", *common, "--profile", profile, "--id", worker_id, *self.worker_args,
                                    *self._metrics_args(worker_id)])

    @property
    def dispatcher_pid(self) -> int | None:
        """Return the dispatcher's process id (None before ``start``)."""
        return self.processes[0].pid if self.processes else None

    @property
    def worker_pids(self) -> list[int]:
        """Return the worker processes' ids."""
        return [proc.pid for proc, child in zip(self.processes, self.children, strict=False)
                if child.name not in (*self.dispatcher_names(), BATCH_RUNNER_NAME, GATEWAY_NAME)]

    @property
    def batch_runner_pid(self) -> int | None:
        """Return the batch runner's process id (None when this cluster runs none)."""
        return next((proc.pid for proc, child in zip(self.processes, self.children, strict=False)
                     if child.name == BATCH_RUNNER_NAME), None)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        settings = self.connection_settings()
        client = connect(settings)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                if all(self._pool_ready(client, settings.keys_for(p.model), p) for p in self.pool_list()) \
                        and self._gateway_answers():
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"the local cluster did not come up within {timeout_s:.0f} s")

    def _pool_ready(self, client: Any, keys: Keys, pool: Pool) -> bool:
        """Every worker of the pool registered, and a dispatcher holds the lease it routes under."""
        expected = {wid for _, wid in self.pool_workers(pool)}
        return expected <= client.smembers(keys.workers) and bool(client.get(keys.lease))

    @property
    def gateway_url(self) -> str | None:
        """Return the gateway's URL (None when this cluster runs none); OpenAI's base_url is this + /v1."""
        return None if self.gateway_port is None else f"http://127.0.0.1:{self.gateway_port}"

    def _gateway_answers(self) -> bool:
        if self.gateway_url is None:
            return True
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1: never a proxy
            with opener.open(f"{self.gateway_url}/health", timeout=1.0) as reply:
                return reply.status == 200
        except OSError:  # not listening yet
            return False

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"a cluster process exited early (code {proc.returncode}): {proc.args[3:]}")

    # --- supervision ----------------------------------------------------------------------------

    def supervise(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Restart every child that exits (``restart_exited``) until ``stop`` is set."""
        while not stop.wait(interval_s):
            self.restart_exited()

    def restart_delay_s(self, name: str) -> float:
        """How long after its exit the child ``name`` is started again: doubling per quick exit, capped."""
        child = next(c for c in self.children if c.name == name)
        return min(RESTART_MAX_S, RESTART_MIN_S * 2.0 ** child.restarts)

    def restart_exited(self, now: float | None = None) -> list[str]:
        """Start again each child that exited and whose backoff has passed; return their names.

        A child seen exited for the first time is logged; one that ran ``RESTART_RESET_S`` or
        longer starts its backoff over. A worker restarted under its id waits out its dead
        predecessor's heartbeat, then runs the jobs left in its pending list.
        """
        now = time.monotonic() if now is None else now
        restarted = []
        for i, (proc, child) in enumerate(zip(self.processes, self.children, strict=False)):
            if proc.poll() is None:
                continue
            if child.exited_at is None:
                child.exited_at = now
                if now - child.started_at >= RESTART_RESET_S:
                    child.restarts = 0
                log.warning("%s exited (code %s); restarting it in %.1f s", child.name, proc.returncode,
                            self.restart_delay_s(child.name))
            if now < child.exited_at + self.restart_delay_s(child.name):
                continue
            self.processes[i] = self._popen(child.name, child.args)
            child.restarts += 1
            child.exited_at, child.started_at = None, now
            log.info("%s restarted (pid %d)", child.name, self.processes[i].pid)
            restarted.append(child.name)
        return restarted

    def stop(self) -> None:
        """SIGTERM everything (workers drain), then SIGKILL what is left after a timeout."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for proc in self.processes:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        self.children.clear()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
