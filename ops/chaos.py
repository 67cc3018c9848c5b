"""``dio chaos``: DIO's delivery promise, checked while its processes die and Redis goes away.

The promise (README, *Guarantees*): every request accepted into the intake reaches exactly one
terminal state visible to its client — completed, rejected (reason), failed (error), cancelled —
within a bounded time, whatever DIO process dies or stalls and however long Redis is unreachable,
as long as Redis keeps its data. Execution is at-least-once, the visible result exactly-once.

A run starts its own redis-server (append-only file, fsync on every write, a free port: never the
machine's shared Redis), two dispatchers, simulated workers and one client; every DIO process is
started as an operator starts it (``python -m dio.ops.cli ...``). The client submits requests open
loop at about the cluster's capacity, cancels some at random, and writes malformed entries (bytes
that are not UTF-8 among them) straight to the intake. Meanwhile one fault at a time: a random
worker SIGKILLed and started again under its id within a second, a worker SIGSTOPped past its
heartbeat and resumed, the active dispatcher SIGKILLed or SIGSTOPped past its lease, Redis shut
down gracefully and SIGKILLed (each time started again from its AOF). Then ``audit`` checks, from
the client's side and from Redis, that every request has exactly one terminal state: none lost or
stuck, no job with two visible results, no KV reservation left, every live worker registered.
"""

from __future__ import annotations

import functools
import heapq
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import redis

from dio.client import Client, ClientSettings, DuplicateJobId, ResultTimeout
from dio.client.handle import JobHandle
from dio.client.mailbox import Mailbox
from dio.ops.capacity import capacity_rps
from dio.ops.local_cluster import parse_workers, worker_ids
from dio.ops.openloop import request_fields
from dio.ops.redis_server import find_redis_server, free_port
from dio.ops.stats import reason_key
from dio.ops.traces import TraceRequest
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import (
    ATTEMPTS_FIELD,
    DISPATCHER_GROUP,
    JOB_FIELD,
    REQUEST_FIELD,
    STATUS_FIELD,
    WORKER_GROUP,
    Keys,
)
from dio.protocol.models import TERMINAL_STATUSES, JobResult, JobStatus, Request

T = TypeVar("T")

PREFIX = "{dio-chaos}:"  # every key of a run (its Redis is private, so one prefix does)
REDIS_START_TIMEOUT_S = 20.0  # a restart replays the AOF before it answers
PROCESS_STOP_TIMEOUT_S = 15.0  # SIGTERM, then SIGKILL after this long
ADMIT_TIMEOUT_S = 20.0  # a worker restarted under its id waits out its predecessor's heartbeat (~3 s)
TAKEOVER_TIMEOUT_S = 20.0  # a standby takes the lease once the dead dispatcher's expires (~3 s)
SETTLE_TIMEOUT_S = 15.0  # after the drain, how long reservations and registrations get to settle
RETRY_S = 0.2  # a chaos-side Redis call that failed (an outage it caused) is retried this often
SUBMIT_TICK_S = 0.005
MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 32, 1024
MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS = 16, 128
CANCEL_DELAY_S = (0.0, 4.0)  # a cancelled request is cancelled this long after its submission
RESTART_DELAY_S = (0.1, 0.9)  # a killed worker is started again this long after the kill
DISPATCHER_RESTART_DELAY_S = 0.5
STOP_SETTLE_S = 0.2  # after a SIGSTOP, a pipeline already on the socket lands before the pending list is read


@dataclass
class ChaosConfig:
    requests: int = 2000
    workers: str = "H100:1,A100-40GB:1,L4:2,T4:1"
    model: str = DEFAULT_MODEL
    max_num_seqs: int = 8  # per worker: few sequences each, so that jobs take seconds, not minutes, of wall time
    load: float = 1.0  # offered load as a fraction of the cluster's estimated capacity
    submit_s: float = 120.0  # wall seconds over which the requests arrive (sets the time scale)
    cancel_fraction: float = 0.05
    malformed: int = 50
    worker_kills: int = 6
    worker_stalls: int = 1
    stall_s: float = 10.0
    dispatcher_kills: int = 2
    dispatcher_stalls: int = 1  # the active dispatcher SIGSTOPped for stall_s (past its lease), then resumed
    redis_restarts: int = 1
    redis_kills: int = 1
    # A graceful restart is short; a kill stays down past the workers' heartbeat TTL (3 s) and the
    # dispatcher's lease (3 s): when Redis comes back every alive key has expired, so the dispatcher
    # may take back the queues of workers that are running their jobs.
    redis_restart_down_s: float = 1.0
    redis_kill_down_s: float = 5.0
    max_wait_s: float = 30.0  # DIO_MAX_WAIT_S of the dispatchers: the backlog's bound on waiting
    drain_s: float = 120.0  # after the last submission and fault, the bound on reaching a terminal state
    seed: int = 0
    log_dir: Path | None = None

    def validate(self) -> None:
        specs = parse_workers(self.workers)
        ids = worker_ids(specs)
        if len(ids) < 4 or len({profile for profile, _ in ids}) < 2:
            raise ValueError(f"chaos needs at least 4 workers of at least 2 GPU types, not {self.workers!r}")
        if self.requests < 1 or self.submit_s <= 0 or self.load <= 0:
            raise ValueError("requests, submit_s and load must be positive")
        if not 0 <= self.cancel_fraction <= 1:
            raise ValueError("cancel_fraction is a fraction")


# --- the private, durable Redis ------------------------------------------------------------------


class DurableRedis:
    """A private redis-server on a fixed free port that keeps every write in its AOF (fsync always).

    ``shutdown`` stops it gracefully, ``kill`` SIGKILLs it; ``start`` brings it back on the same port
    and directory, from its AOF, so every acknowledged write survives either.
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = find_redis_server()
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        return [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
                "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", str(self.workdir / "redis.log")]

    def start(self) -> None:
        """Start the server and wait until it answers (after replaying its AOF)."""
        self.process = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        deadline = time.monotonic() + REDIS_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the chaos redis-server exited with {self.process.returncode}")
            try:
                with redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5) as conn:
                    if conn.ping():
                        return
            except redis.RedisError:  # refused, or LOADING its AOF
                time.sleep(0.05)
        raise RuntimeError(f"the chaos redis-server did not answer within {REDIS_START_TIMEOUT_S:g} s")

    def shutdown(self) -> None:
        """SHUTDOWN: Redis fsyncs its AOF and exits."""
        try:
            with redis.Redis.from_url(self.url) as conn:
                conn.shutdown()
        except redis.ConnectionError:
            pass  # it closes the connection as it exits
        self._wait()

    def kill(self) -> None:
        """SIGKILL: what was fsynced to the AOF is all that survives (with fsync always: every write)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._wait()

    def _wait(self) -> None:
        if self.process is not None:
            try:
                self.process.wait(PROCESS_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def through_outages(call: Callable[[], T], stop: threading.Event | None = None) -> T:
    """Run a chaos-side Redis call, retrying while the Redis this run stopped is away."""
    while True:
        try:
            return call()
        except redis.RedisError:
            if stop is not None and stop.is_set():
                raise
            time.sleep(RETRY_S)


# --- the DIO processes ---------------------------------------------------------------------------


@dataclass
class Fleet:
    """The dispatchers and workers, each a ``python -m dio.ops.cli`` process in its own session."""

    redis_url: str
    config: ChaosConfig
    time_scale: float
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    profiles: dict[str, str] = field(default_factory=dict)  # worker id -> GPU profile
    dispatchers: list[str] = field(default_factory=list)  # names of the dispatcher processes alive
    started_dispatchers: int = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"DIO_REDIS_URL": self.redis_url, "DIO_KEY_PREFIX": PREFIX, "PYTHONUNBUFFERED": "1",
                    "DIO_MAX_WAIT_S": str(self.config.max_wait_s)})
        return env

    def spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        out: Any = subprocess.DEVNULL
        if self.config.log_dir is not None:
            self.config.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.config.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen([sys.executable, "-m", "dio.ops.cli", *args], env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.processes[name] = proc
        return proc

    def start(self) -> None:
        for _ in range(2):
            self.start_dispatcher()
        for profile, worker_id in worker_ids(parse_workers(self.config.workers)):
            self.profiles[worker_id] = profile
            self.start_worker(worker_id)

    def start_dispatcher(self) -> subprocess.Popen[bytes]:
        """Start a dispatcher under a new name (as ``dio dispatcher``'s default, which holds the pid)."""
        self.started_dispatchers += 1
        name = f"chaos-dispatcher-{self.started_dispatchers}"
        self.dispatchers.append(name)
        return self.spawn(name, ["dispatcher", "--name", name])

    def start_worker(self, worker_id: str) -> subprocess.Popen[bytes]:
        return self.spawn(worker_id, ["worker", "--engine", "sim", "--profile", self.profiles[worker_id],
                                      "--model", self.config.model, "--time-scale", f"{self.time_scale:.6g}",
                                      "--max-num-seqs", str(self.config.max_num_seqs), "--id", worker_id])

    @property
    def worker_ids(self) -> list[str]:
        return list(self.profiles)

    def signal(self, name: str, sig: signal.Signals) -> None:
        """Send ``sig`` to the process group of ``name`` (the process and anything it started)."""
        proc = self.processes[name]
        if proc.poll() is None:
            os.killpg(proc.pid, sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.processes[name].wait()

    def stop(self) -> None:
        """SIGTERM everything (a stalled process is resumed first), then SIGKILL what is left."""
        for name, proc in self.processes.items():
            if proc.poll() is None:
                self.signal(name, signal.SIGCONT)
                self.signal(name, signal.SIGTERM)
        deadline = time.monotonic() + PROCESS_STOP_TIMEOUT_S
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def exited(self) -> list[str]:
        """Names of processes that exited without being killed by this run."""
        return [name for name, proc in self.processes.items() if proc.poll() not in (None, -signal.SIGKILL)]


def wait_until(predicate: Callable[[], bool], timeout_s: float, pause_s: float = 0.05) -> float | None:
    """Poll ``predicate`` (through outages) until true; return the seconds it took, None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if predicate():
                return time.monotonic() - start
        except redis.RedisError:
            pass
        time.sleep(pause_s)
    return None


# --- the faults ----------------------------------------------------------------------------------


@dataclass
class FaultLog:
    worker_kills: int = 0
    worker_restarts_same_id: int = 0  # restarted under the killed worker's id and admitted (registered, alive)
    worker_stalls: int = 0
    dispatcher_kills: int = 0
    dispatcher_stalls: int = 0
    redis_restarts: int = 0
    redis_kills: int = 0
    admit_s: list[float] = field(default_factory=list)  # restart -> the new process owns the worker id
    takeover_s: list[float] = field(default_factory=list)  # dispatcher kill -> a standby holds the lease
    interrupted: set[str] = field(default_factory=set)  # jobs delivered to a worker when it was killed or stalled
    events: list[str] = field(default_factory=list)


class Faults(threading.Thread):
    """Inject the configured faults one at a time, at spread-out random moments of the submission window."""

    def __init__(self, config: ChaosConfig, fleet: Fleet, server: DurableRedis, conn: redis.Redis,
                 rng: random.Random) -> None:
        super().__init__(name="dio-chaos-faults", daemon=True)
        self.config, self.fleet, self.server, self.conn, self.rng = config, fleet, server, conn, rng
        self.keys = Keys(PREFIX)
        self.log = FaultLog()
        self.error: BaseException | None = None
        self.redis_up = threading.Event()
        self.redis_up.set()
        self._halt = threading.Event()
        self._t0 = self._fault_at = time.monotonic()

    def plan(self) -> list[tuple[float, Callable[[], None]]]:
        c = self.config
        faults: list[Callable[[], None]] = (
            [self.kill_worker] * c.worker_kills + [self.stall_worker] * c.worker_stalls
            + [self.kill_dispatcher] * c.dispatcher_kills + [self.stall_dispatcher] * c.dispatcher_stalls
            + [self.restart_redis] * c.redis_restarts
            + [self.kill_redis] * c.redis_kills
        )
        self.rng.shuffle(faults)
        gap = c.submit_s / (len(faults) + 1)
        return [((i + 1) * gap + self.rng.uniform(-gap / 4, gap / 4), fault) for i, fault in enumerate(faults)]

    def run(self) -> None:
        self._t0 = self._fault_at = time.monotonic()  # the submission starts now too
        try:
            for at, fault in self.plan():
                if self._halt.wait(max(at - (time.monotonic() - self._t0), 0.0)):
                    return  # the run is ending early; the fault under way (if any) was completed
                self._fault_at = time.monotonic()
                fault()
        except BaseException as exc:  # reported by the run: a fault that could not be injected
            self.error = exc

    def stop(self) -> None:
        """Inject no further fault (the one under way completes: what it killed is started again)."""
        self._halt.set()

    def note(self, text: str) -> None:
        self.log.events.append(f"{self._fault_at - self._t0:6.1f}s {text}")

    def live_workers(self) -> list[str]:
        return [w for w in self.fleet.worker_ids if self.fleet.processes[w].poll() is None]

    def kill_worker(self) -> None:
        worker_id = self.rng.choice(self.live_workers())
        self.fleet.kill(worker_id)
        self.log.worker_kills += 1
        self.log.interrupted |= self.delivered(worker_id)
        time.sleep(self.rng.uniform(*RESTART_DELAY_S))
        proc = self.fleet.start_worker(worker_id)
        admitted = wait_until(lambda: self.owns(worker_id, proc.pid), ADMIT_TIMEOUT_S)
        if admitted is not None:
            self.log.worker_restarts_same_id += 1
            self.log.admit_s.append(round(admitted, 2))
        self.note(f"SIGKILL worker {worker_id}, restarted under its id, admitted after "
                  f"{'never' if admitted is None else round(admitted, 1)} s")

    def stall_worker(self) -> None:
        worker_id = self.rng.choice(self.live_workers())
        self.fleet.signal(worker_id, signal.SIGSTOP)
        time.sleep(STOP_SETTLE_S)
        self.log.interrupted |= self.delivered(worker_id)
        time.sleep(self.config.stall_s)
        self.fleet.signal(worker_id, signal.SIGCONT)
        self.log.worker_stalls += 1
        self.note(f"SIGSTOP worker {worker_id} for {self.config.stall_s:g} s, then SIGCONT")

    def active_dispatcher(self) -> str:
        name = through_outages(self._lease_holder)
        return name if name in self.fleet.dispatchers else self.fleet.dispatchers[0]  # none holds it: any

    def kill_dispatcher(self) -> None:
        name = self.active_dispatcher()
        self.fleet.kill(name)
        self.fleet.dispatchers.remove(name)
        self.log.dispatcher_kills += 1
        killed_at = time.monotonic()
        time.sleep(DISPATCHER_RESTART_DELAY_S)
        self.fleet.start_dispatcher()
        took = wait_until(lambda: self._lease_holder() not in (None, name), TAKEOVER_TIMEOUT_S)
        if took is not None:
            self.log.takeover_s.append(round(time.monotonic() - killed_at, 2))
        self.note(f"SIGKILL active dispatcher {name}; {self._lease_holder()} took over after "
                  f"{self.log.takeover_s[-1] if took is not None else 'never'} s")

    def stall_dispatcher(self) -> None:
        name = self.active_dispatcher()
        self.fleet.signal(name, signal.SIGSTOP)
        stalled_at = time.monotonic()
        took = wait_until(lambda: self._lease_holder() not in (None, name), self.config.stall_s)
        time.sleep(max(self.config.stall_s - (time.monotonic() - stalled_at), 0.0))
        self.fleet.signal(name, signal.SIGCONT)  # it wakes mid-turn, with a backlog another one now routes
        self.log.dispatcher_stalls += 1
        self.note(f"SIGSTOP active dispatcher {name} for {self.config.stall_s:g} s, then SIGCONT; another took "
                  f"over after {'never' if took is None else round(took, 1)} s")

    def restart_redis(self) -> None:
        self.redis_up.clear()
        self.server.shutdown()
        time.sleep(self.config.redis_restart_down_s)
        self.server.start()
        self.redis_up.set()
        self.log.redis_restarts += 1
        self.note(f"Redis SHUTDOWN, down {self.config.redis_restart_down_s:g} s, started again from its AOF")

    def kill_redis(self) -> None:
        self.redis_up.clear()
        self.server.kill()
        time.sleep(self.config.redis_kill_down_s)
        self.server.start()
        self.redis_up.set()
        self.log.redis_kills += 1
        self.note(f"Redis SIGKILL, down {self.config.redis_kill_down_s:g} s, started again from its AOF")

    def _lease_holder(self) -> str | None:
        raw = self.conn.get(self.keys.lease)
        return raw.decode() if isinstance(raw, bytes) else raw

    def owns(self, worker_id: str, pid: int) -> bool:
        """Tell whether process ``pid`` holds the worker id: registered, alive, its pid in the hash."""
        pipe = self.conn.pipeline(transaction=False)
        pipe.sismember(self.keys.workers, worker_id)
        pipe.exists(self.keys.alive(worker_id))
        pipe.hget(self.keys.worker(worker_id), "pid")
        member, alive, hash_pid = pipe.execute()
        return bool(member) and bool(alive) and hash_pid is not None and int(hash_pid) == pid

    def delivered(self, worker_id: str) -> set[str]:
        """The jobs delivered to a worker and not finished (its queue's pending list): they run again."""
        queue = self.keys.queue(worker_id)

        def read() -> set[str]:
            try:
                pending = self.conn.xpending_range(queue, WORKER_GROUP, "-", "+", 100_000, consumername=worker_id)
            except redis.ResponseError:  # no group yet
                return set()
            jobs = set()
            for entry in pending:
                for _, fields in self.conn.xrange(queue, entry["message_id"], entry["message_id"]):
                    jobs.add(_text(fields.get(JOB_FIELD.encode(), b"")))
            return jobs

        return through_outages(read)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


# --- the client ----------------------------------------------------------------------------------


class WitnessMailbox(Mailbox[Future]):
    """The client's mailbox, counting every result notice its reply reader delivers, per job."""

    def __init__(self) -> None:
        super().__init__(Future)
        self.notices: Counter[str] = Counter()
        self.first: dict[str, JobResult] = {}
        self._count_lock = threading.Lock()

    def deliver(self, result: JobResult) -> None:
        with self._count_lock:
            self.notices[result.id] += 1
            self.first.setdefault(result.id, result)
        super().deliver(result)


class ChaosClient(Client):
    """A DIO client whose mailbox counts notices: a second notice for a job is a second visible result."""

    def __init__(self, settings: ClientSettings) -> None:
        super().__init__(settings)
        self.witness = WitnessMailbox()
        self._mailbox = self.witness


@dataclass
class Planned:
    at_s: float  # wall seconds after the start of the submission
    fields: dict[str, Any]
    cancel_after_s: float | None


def plan_requests(config: ChaosConfig, rng: random.Random) -> tuple[list[Planned], float]:
    """Draw the requests (lengths, Poisson arrivals, which are cancelled); return them and the time scale.

    The time scale makes the cluster's estimated capacity (roofline, in simulated requests/s) equal
    ``requests / submit_s / load`` wall requests per second.
    """
    specs = parse_workers(config.workers)
    lengths = [TraceRequest(0.0, rng.randint(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS),
                            rng.randint(MIN_OUTPUT_TOKENS, MAX_OUTPUT_TOKENS)) for _ in range(config.requests)]
    wall_rps = config.requests / config.submit_s
    time_scale = wall_rps / (config.load * capacity_rps(specs, config.model, lengths, config.max_num_seqs))
    at, planned = 0.0, []
    for i, request in enumerate(lengths):
        at += rng.expovariate(wall_rps)
        cancel = rng.uniform(*CANCEL_DELAY_S) if rng.random() < config.cancel_fraction else None
        planned.append(Planned(at, request_fields(request, i, config.model), cancel))
    return planned, time_scale


def malformed_entry(i: int, reply_to: str) -> tuple[dict[bytes, bytes], str | None]:
    """Return the ``i``-th malformed intake entry and the job id it names (None: it names none)."""
    job_id = f"chaos-malformed-{i}"
    body = {"id": job_id, "prompt": "x"}
    req = REQUEST_FIELD.encode()
    kinds: list[tuple[dict[bytes, bytes], str | None]] = [
        ({req: b'{"id": "' + job_id.encode() + b'", "prompt": "caf\xe9 \xff"}'}, job_id),  # not UTF-8
        ({req: b"\xff\xfe chaos " + job_id.encode() + b" \xc3("}, None),  # not UTF-8, not JSON
        ({req: json.dumps({**body, "max_tokens": -5}).encode()}, job_id),
        ({req: json.dumps({**body, "evil": "__import__('os')"}).encode()}, job_id),
        ({req: json.dumps({**body, "v": 99}).encode()}, job_id),  # another schema version
        ({req: b"not json " + job_id.encode()}, None),
        ({b"nothing": b"here"}, None),
        ({b"\xc3(": b"a field name that is not UTF-8"}, None),
        ({req: b"[1, 2, 3]"}, None),
        ({req: json.dumps({"id": "bad id!", "prompt": "x"}).encode()}, None),
        ({req: json.dumps({**body, "prompt": "", "reply_to": reply_to}).encode()}, job_id),  # notified
        ({req: b'{"id": "' + job_id.encode() + b'", "prompt": "x", "max_tokens": 1e999}'}, job_id),
    ]
    return kinds[i % len(kinds)]


@dataclass
class Load:
    """What the client did: handles, submission times, cancels, malformed entries."""

    handles: dict[str, JobHandle] = field(default_factory=dict)
    adopted: set[str] = field(default_factory=set)  # submitted, but a retried submission was refused as a duplicate
    submitted_at: dict[str, float] = field(default_factory=dict)  # monotonic
    done_at: dict[str, float] = field(default_factory=dict)  # monotonic, when the client's future resolved
    cancel_requested: int = 0
    cancel_won: set[str] = field(default_factory=set)
    malformed_named: list[str] = field(default_factory=list)
    malformed_entries: list[str] = field(default_factory=list)  # intake entry ids of those naming no job
    malformed_written: int = 0
    submit_retries: int = 0

    @property
    def job_ids(self) -> list[str]:
        return [*self.handles, *self.adopted]


class Submitter:
    """Submit the planned requests open loop, cancel some, and write malformed entries, through any outage."""

    def __init__(self, client: ChaosClient, raw: redis.Redis, faults: Faults, config: ChaosConfig,
                 rng: random.Random) -> None:
        self.client, self.raw, self.faults, self.config, self.rng = client, raw, faults, config, rng
        self.keys = Keys(PREFIX)
        self.load = Load()
        self._cancels: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._canceller = threading.Thread(target=self._cancel_loop, name="dio-chaos-cancels", daemon=True)

    def run(self, planned: list[Planned]) -> Load:
        self._canceller.start()
        malformed_at = set(self.rng.sample(range(len(planned)), min(self.config.malformed, len(planned))))
        start = time.monotonic()
        i = 0
        while i < len(planned):
            now = time.monotonic() - start
            due: list[tuple[int, Planned]] = []
            while i < len(planned) and planned[i].at_s <= now:
                due.append((i, planned[i]))
                i += 1
            if not due:
                time.sleep(min(SUBMIT_TICK_S, max(planned[i].at_s - now, 0.0)))
                continue
            self._submit([p for _, p in due])
            for index, _ in due:
                if index in malformed_at:
                    self._write_malformed()
        self._done.set()
        self._canceller.join()
        return self.load

    def _submit(self, due: list[Planned]) -> None:
        reqs = [Request(id=uuid.uuid4().hex, reply_to=self.client.client_id, **p.fields) for p in due]
        now = time.monotonic()
        pending = reqs
        while pending:
            try:
                handles = self.client.submit_many(pending)
                refused: list[str] = []
            except DuplicateJobId as exc:
                # A retry of a submission that went through (its reply was lost): the job is ours.
                handles, refused = exc.submitted, exc.job_ids
            except redis.RedisError:
                self.load.submit_retries += 1
                time.sleep(RETRY_S)
                continue
            for handle in handles:
                self._track(handle, now)
            self.load.adopted.update(refused)
            for job_id in refused:
                self.load.submitted_at[job_id] = now
            done = {h.id for h in handles} | set(refused)
            pending = [r for r in pending if r.id not in done]
        with self._lock:
            for req, p in zip(reqs, due, strict=True):
                if p.cancel_after_s is not None:
                    heapq.heappush(self._cancels, (now + p.cancel_after_s, req.id))

    def _track(self, handle: JobHandle, now: float) -> None:
        self.load.handles[handle.id] = handle
        self.load.submitted_at[handle.id] = now
        done_at, job_id = self.load.done_at, handle.id

        def resolved(_future: Future) -> None:
            done_at.setdefault(job_id, time.monotonic())

        handle.future.add_done_callback(resolved)

    def _write_malformed(self) -> None:
        fields, job_id = malformed_entry(self.load.malformed_written, self.client.client_id)
        self.faults.redis_up.wait()  # an XADD whose reply is lost could not be told from one never made
        entry = through_outages(lambda: self.raw.xadd(self.keys.intake, fields))
        self.load.malformed_written += 1
        if job_id is None:
            self.load.malformed_entries.append(_text(entry))
        else:
            self.load.malformed_named.append(job_id)

    def _cancel_loop(self) -> None:
        while True:
            with self._lock:
                due = self._cancels[0] if self._cancels else None
                if due is not None and due[0] <= time.monotonic():
                    heapq.heappop(self._cancels)
                else:
                    due = None
                idle = not self._cancels
            if due is None:
                if idle and self._done.is_set():
                    return
                time.sleep(0.01)
                continue
            job_id = due[1]
            self.load.cancel_requested += 1
            if through_outages(functools.partial(self.client.cancel, job_id)):
                self.load.cancel_won.add(job_id)


# --- the audit -----------------------------------------------------------------------------------

TERMINAL = frozenset(status.value for status in TERMINAL_STATUSES)


def read_jobs(conn: redis.Redis, keys: Keys, job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """HGETALL every job hash, 500 per round trip (an empty dict: the hash is gone)."""
    ids = list(job_ids)
    out: dict[str, dict[str, str]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        pipe = conn.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hgetall(keys.job(job_id))
        for job_id, fields in zip(chunk, pipe.execute(), strict=True):
            out[job_id] = {_text(k): _text(v) for k, v in fields.items()}
    return out


def reservations(conn: redis.Redis, keys: Keys, worker_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Every KV reservation left in Redis: worker id -> {job id: tokens}; also any worker's not listed."""
    names = {keys.reserved(w) for w in worker_ids}
    names |= {_text(k) for k in conn.scan_iter(match=keys.reserved("*").replace("{", "\\{").replace("}", "\\}"))}
    prefix = keys.reserved("")
    out = {}
    for name in sorted(names):
        held = conn.hgetall(name)
        if held:
            out[name[len(prefix):]] = {_text(k): _text(v) for k, v in held.items()}
    return out


def unregistered(conn: redis.Redis, keys: Keys, fleet: Fleet) -> list[str]:
    """The workers whose process lives but that are not registered, alive and owned by that process."""
    missing = []
    for worker_id in fleet.worker_ids:
        proc = fleet.processes[worker_id]
        if proc.poll() is not None:
            continue
        pipe = conn.pipeline(transaction=False)
        pipe.sismember(keys.workers, worker_id)
        pipe.exists(keys.alive(worker_id))
        pipe.hget(keys.worker(worker_id), "pid")
        member, alive, pid = pipe.execute()
        if not (member and alive and pid is not None and int(pid) == proc.pid):
            missing.append(worker_id)
    return missing


def deadlettered_entries(conn: redis.Redis, keys: Keys) -> set[str]:
    return {_text(fields.get(b"entry", b"")) for _, fields in conn.xrange(keys.deadletter)}


def leftovers(conn: redis.Redis, keys: Keys, worker_ids: Iterable[str]) -> dict[str, int]:
    """Entries still pending on the intake and left on the workers' queues."""
    try:
        intake_pending = int(conn.xpending(keys.intake, DISPATCHER_GROUP)["pending"])
    except redis.ResponseError:
        intake_pending = 0
    return {"intake_pending": intake_pending, "queued_left": sum(conn.xlen(keys.queue(w)) for w in worker_ids)}


def audit(conn: redis.Redis, load: Load, faults: FaultLog, witness: WitnessMailbox, fleet: Fleet,
          settle_s: float = SETTLE_TIMEOUT_S) -> dict[str, Any]:
    """Check every request from the client's side and from Redis; return the counts."""
    keys = Keys(PREFIX)
    jobs = read_jobs(conn, keys, load.job_ids)
    status = {job_id: fields.get(STATUS_FIELD) for job_id, fields in jobs.items()}
    by_status = Counter(s for s in status.values() if s in TERMINAL)
    lost = [j for j, fields in jobs.items() if not fields]
    stuck = [j for j, s in status.items() if s is not None and s not in TERMINAL]
    # What the client saw: its handle's result, else (a refused retry) the notice it got.
    seen: dict[str, JobResult | None] = {j: _settled(h) for j, h in load.handles.items()}
    seen.update({j: witness.first.get(j) for j in load.adopted})
    unseen = [j for j, r in seen.items() if r is None and status.get(j) in TERMINAL]
    duplicates = sorted({j for j, n in witness.notices.items() if n > 1}
                        | {j for j, r in seen.items() if r is not None and status.get(j) != r.status.value}
                        | {j for j, r in witness.first.items() if j in status and status[j] != r.status.value})
    attempts = {j: int(fields.get(ATTEMPTS_FIELD) or 0) for j, fields in jobs.items()}
    reexecuted = {j for j, n in attempts.items() if n > 1} | (faults.interrupted & set(jobs))
    cancelled_lost = [j for j in load.cancel_won if status.get(j) != JobStatus.cancelled.value]

    malformed = read_jobs(conn, keys, load.malformed_named)
    dead = deadlettered_entries(conn, keys)
    malformed_unanswered = ([j for j, f in malformed.items() if f.get(STATUS_FIELD) != JobStatus.rejected.value
                             or not f.get("reason")]
                            + [e for e in load.malformed_entries if e not in dead])
    duplicates += sorted(j for j in load.malformed_named if witness.notices[j] > 1)

    # Reservations of ended jobs are freed by the scripts, and the dispatcher's periodic sync frees
    # any a path left behind; a registration lapsed in a fault comes back with the next heartbeat.
    wait_until(lambda: not reservations(conn, keys, fleet.worker_ids), settle_s, pause_s=0.2)
    wait_until(lambda: not unregistered(conn, keys, fleet), settle_s, pause_s=0.2)
    leaked = reservations(conn, keys, fleet.worker_ids)
    not_registered = unregistered(conn, keys, fleet)
    waits = [load.done_at[j] - load.submitted_at[j] for j in load.handles if j in load.done_at]
    return {
        "submitted": len(load.job_ids),
        "completed": by_status.get(JobStatus.completed.value, 0),
        "rejected": by_status.get(JobStatus.rejected.value, 0),
        "failed": by_status.get(JobStatus.failed.value, 0),
        "cancelled": by_status.get(JobStatus.cancelled.value, 0),
        "lost": len(lost) + len(unseen),
        "stuck": len(stuck),
        "duplicate_results": len(duplicates),
        "reexecuted": len(reexecuted),
        "reexecutions": sum(max(n - 1, 0) for n in attempts.values()),
        "leaked_reservations": sum(len(held) for held in leaked.values()),
        "unregistered_workers": len(not_registered),
        "cancel_requested": load.cancel_requested,
        "cancel_won": len(load.cancel_won),
        "cancel_not_kept": len(cancelled_lost),
        "malformed": load.malformed_written,
        "malformed_rejected": sum(1 for f in malformed.values() if f.get(STATUS_FIELD) == JobStatus.rejected.value),
        "malformed_deadlettered": sum(1 for e in load.malformed_entries if e in dead),
        "malformed_unanswered": len(malformed_unanswered),
        "resubmissions_refused": len(load.adopted),
        "submit_retries": load.submit_retries,
        "failed_errors": dict(Counter(reason_key(jobs[j].get("error")) for j, s in status.items()
                                      if s == JobStatus.failed.value)),
        "rejected_reasons": dict(Counter(reason_key(jobs[j].get("reason")) for j, s in status.items()
                                         if s == JobStatus.rejected.value)),
        "terminal_p99_s": _round(np.percentile(waits, 99)) if waits else None,
        "terminal_max_s": _round(max(waits)) if waits else None,
        **leftovers(conn, keys, fleet.worker_ids),
        "examples": {"lost": (lost + unseen)[:5], "stuck": stuck[:5], "duplicate_results": duplicates[:5],
                     "leaked": {w: list(held)[:5] for w, held in leaked.items()},
                     "unregistered": not_registered, "malformed_unanswered": malformed_unanswered[:5]},
    }


def _settled(handle: JobHandle) -> JobResult | None:
    future = handle.future
    if not future.done() or future.exception() is not None:
        return None
    result = future.result()
    return result if isinstance(result, JobResult) else None


def _round(value: float) -> float:
    return round(float(value), 2)


FAILURE_COUNTS = ("lost", "stuck", "duplicate_results", "leaked_reservations", "unregistered_workers",
                  "malformed_unanswered", "cancel_not_kept")


def passed(summary: dict[str, Any]) -> bool:
    """Tell whether a run kept the promise (and injected every fault it was asked for)."""
    return (all(summary[name] == 0 for name in FAILURE_COUNTS) and not summary["fault_error"]
            and not summary["crashed_processes"])


# --- the run -------------------------------------------------------------------------------------


def run_chaos(config: ChaosConfig) -> dict[str, Any]:
    """Run the chaos test end to end and return its summary (``passed(summary)`` says if it held)."""
    config.validate()
    planned, time_scale = plan_requests(config, random.Random(f"{config.seed}-requests"))
    workdir = Path(tempfile.mkdtemp(prefix="dio-chaos-"))
    server = DurableRedis(workdir)
    server.start()
    fleet = Fleet(server.url, config, time_scale)
    conn = redis.Redis.from_url(server.url)  # bytes: malformed entries are written and read back as bytes
    faults = Faults(config, fleet, server, conn, random.Random(f"{config.seed}-faults"))
    started = time.monotonic()
    try:
        fleet.start()
        wait_ready(conn, fleet)
        settings = ClientSettings(redis_url=server.url, key_prefix=PREFIX, result_timeout_s=config.drain_s)
        client = ChaosClient(settings)
        with client:
            faults.start()
            submitter = Submitter(client, conn, faults, config, random.Random(f"{config.seed}-client"))
            load = submitter.run(planned)
            submit_wall_s = time.monotonic() - started
            faults.join()
            drain(client, load, config.drain_s)
            summary = audit(conn, load, faults.log, client.witness, fleet)
        crashed = fleet.exited()
    finally:
        faults.stop()
        if faults.is_alive():
            faults.join()
        fleet.stop()
        conn.close()
        server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    log = faults.log
    summary.update({
        "worker_kills": log.worker_kills, "worker_restarts_same_id": log.worker_restarts_same_id,
        "worker_stalls": log.worker_stalls, "dispatcher_kills": log.dispatcher_kills,
        "dispatcher_stalls": log.dispatcher_stalls,
        "redis_restarts": log.redis_restarts, "redis_kills": log.redis_kills,
        "worker_admit_s_max": max(log.admit_s, default=None), "dispatcher_takeover_s_max": max(log.takeover_s,
                                                                                              default=None),
        "fault_error": repr(faults.error) if faults.error else None, "crashed_processes": crashed,
        "workers": config.workers, "time_scale": round(time_scale, 4), "seed": config.seed,
        "submit_wall_s": round(submit_wall_s, 1), "wall_s": round(time.monotonic() - started, 1),
        "faults": log.events,
    })
    summary["passed"] = passed(summary)
    return summary


def wait_ready(conn: redis.Redis, fleet: Fleet, timeout_s: float = 60.0) -> None:
    """Wait until every worker registered and a dispatcher holds the lease."""
    keys = Keys(PREFIX)
    expected = {w.encode() for w in fleet.worker_ids}

    def ready() -> bool:
        return expected <= conn.smembers(keys.workers) and bool(conn.get(keys.lease))

    if wait_until(ready, timeout_s, pause_s=0.1) is None:
        raise TimeoutError(f"the chaos cluster did not come up within {timeout_s:.0f} s (exited: {fleet.exited()})")


def drain(client: Client, load: Load, drain_s: float) -> None:
    """Wait up to ``drain_s`` for every submitted job to reach a terminal state the client sees."""
    deadline = time.monotonic() + drain_s
    try:
        for _ in client.as_completed(load.handles.values(), timeout=drain_s):
            pass
    except ResultTimeout:
        return  # what is left is reported stuck (or lost) by the audit
    if load.adopted:
        wait_until(lambda: all((client.status(j) or JobStatus.queued).terminal for j in load.adopted),
                   max(deadline - time.monotonic(), 0.0), pause_s=0.5)


def print_summary(summary: dict[str, Any]) -> None:
    """Print what the run did and whether the promise held."""
    from rich.console import Console

    console = Console(width=max(Console().width, 120))
    verdict = "[bold green]HELD[/]" if summary["passed"] else "[bold red]BROKEN[/]"
    console.print(f"[bold]DIO chaos[/] — {summary['submitted']} requests on {summary['workers']} "
                  f"(time scale {summary['time_scale']}), {summary['wall_s']} s wall: the delivery promise {verdict}")
    console.print(f"faults: {summary['worker_kills']} worker SIGKILLs ({summary['worker_restarts_same_id']} restarted "
                  f"under their id and admitted, max {summary['worker_admit_s_max']} s), {summary['worker_stalls']} "
                  f"worker stalls, {summary['dispatcher_kills']} active-dispatcher SIGKILLs (takeover max "
                  f"{summary['dispatcher_takeover_s_max']} s), {summary['dispatcher_stalls']} active-dispatcher "
                  f"stalls, {summary['redis_restarts']} Redis restarts, "
                  f"{summary['redis_kills']} Redis SIGKILLs")
    for event in summary["faults"]:
        console.print(f"  {event}")
    console.print(f"completed {summary['completed']} · rejected {summary['rejected']} · failed {summary['failed']} · "
                  f"cancelled {summary['cancelled']} (of {summary['cancel_won']} cancels that won) · malformed "
                  f"{summary['malformed']} ({summary['malformed_rejected']} rejected, "
                  f"{summary['malformed_deadlettered']} dead-lettered)")
    console.print(f"lost {summary['lost']} · stuck {summary['stuck']} · duplicate results "
                  f"{summary['duplicate_results']} · leaked reservations {summary['leaked_reservations']} · "
                  f"unregistered workers {summary['unregistered_workers']} · re-executed {summary['reexecuted']} "
                  f"jobs · terminal within p99 {summary['terminal_p99_s']} s / max {summary['terminal_max_s']} s")
    for title, counts in (("failed", summary["failed_errors"]), ("rejected", summary["rejected_reasons"])):
        for reason, n in counts.items():
            console.print(f"  {title} ×{n}: {reason}")
    if summary["fault_error"] or summary["crashed_processes"]:
        console.print(f"fault error: {summary['fault_error']}; exited on their own: {summary['crashed_processes']}")
    if not summary["passed"]:
        console.print(f"examples: {summary['examples']}")
