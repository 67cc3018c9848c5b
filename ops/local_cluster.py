"""A local DIO cluster: one dispatcher and simulated workers as separate processes.

Used by ``dio up``, ``dio demo`` and the benchmarks. Each process is the real thing started
with ``python -m dio.ops.cli ...``: the same code an operator runs, talking through a real Redis.
With ``one_worker_process`` every simulated GPU runs in a single worker process (``dio worker
--cluster``), so a benchmark on a small machine does not spend its cores on idle interpreters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import Keys

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


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


def format_workers(specs: list[WorkerSpec]) -> str:
    """Return the ``H100:1,L4:2`` spec of a worker list (the inverse of ``parse_workers``)."""
    return ",".join(f"{s.profile}:{s.count}" for s in specs)


def worker_ids(specs: list[WorkerSpec]) -> list[tuple[str, str]]:
    """(profile, worker id) for every worker, ids like ``L4-1``."""
    return [(s.profile, f"{s.profile}-{i + 1}") for s in specs for i in range(s.count)]


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
    processes: list[subprocess.Popen] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        env["DIO_REDIS_URL"] = self.redis_url
        env["DIO_KEY_PREFIX"] = self.key_prefix
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        out = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args], env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(proc)
        return proc

    def start(self) -> None:
        """Start the dispatcher and every worker, and wait until all workers registered."""
        self._spawn("dispatcher", ["dispatcher", "--policy", self.policy, "--predictor", self.predictor])
        common = ["--engine", self.engine, "--model", self.model, "--time-scale", str(self.time_scale)]
        if self.one_worker_process:
            self._spawn("workers", ["worker", *common, "--cluster", format_workers(self.workers), *self.worker_args])
        else:
            for profile, worker_id in worker_ids(self.workers):
                self._spawn(worker_id, ["worker", *common, "--profile", profile, "--id", worker_id, *self.worker_args])
        self.wait_ready()

    @property
    def dispatcher_pid(self) -> int | None:
        """Return the dispatcher's process id (None before ``start``)."""
        return self.processes[0].pid if self.processes else None

    @property
    def worker_pids(self) -> list[int]:
        """Return the worker processes' ids."""
        return [proc.pid for proc in self.processes[1:]]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        keys = Keys(self.key_prefix)
        client = redis.Redis.from_url(self.redis_url, decode_responses=True)
        expected = {wid for _, wid in worker_ids(self.workers)}
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                registered = client.smembers(keys.workers)
                if expected <= registered and client.get(keys.lease):
                    return
                time.sleep(0.1)
        finally:
            client.close()
        raise TimeoutError(f"the local cluster did not come up within {timeout_s:.0f} s")

    def _check_alive(self) -> None:
        for proc in self.processes:
            if proc.poll() is not None:
                raise RuntimeError(f"a cluster process exited early (code {proc.returncode}): {proc.args[3:]}")

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

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
