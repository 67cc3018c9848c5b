"""Building blocks of the GPU measurements in ``dio.ops.gpu.measure`` (issue 5).

- Request sets: Azure conversation lengths clamped to the tiny model's context, with
  deterministic token-id prompts (``prompt_ids``): the same (tag, index) gives the same prompt to
  an engine driven straight and to DIO, and different tags never share a prefix-cache block.
- Child processes: an engine driven straight (``dio.ops.gpu.direct``) runs in a process group of its
  own, which is killed whole afterwards (vLLM's engine core is a grandchild), and the caller waits
  until the GPU memory it held is free again.
- ``GpuCluster``: vLLM workers started one after the other (vLLM sizes its KV cache from the GPU
  memory it sees while it profiles, so two engines must not start together on one GPU) and a
  dispatcher that is replaced between runs on the same workers.
- The client side: a burst, an open-loop replay, job records read back from the job hashes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import redis

from dio.client import Client, ResultTimeout
from dio.client.handle import JobHandle
from dio.client.jobs import parse_job
from dio.gpu_worker import nvml
from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.engine_factory import STANDIN_ENV
from dio.ops.local_cluster import LocalCluster
from dio.ops.redis_server import ensure_redis
from dio.ops.stats import percentile
from dio.ops.traces import Trace, bundled, load_trace, sample
from dio.protocol.connection import delete_keys
from dio.protocol.keys import Keys
from dio.protocol.models import JobResult, JobStatus, WorkerInfo, WorkerTelemetry, from_hash
from dio.protocol.settings import DEFAULT_REDIS_URL

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny-llama-1b"
MAX_PROMPT_TOKENS = 3000  # tiny-llama-1b's context is 4096: prompt + output must fit
MAX_OUTPUT_TOKENS = 512
FIRST_TOKEN_ID = 3  # skip the usual pad/bos/eos ids
GIB = 1024**3
READY_TIMEOUT_S = 300.0  # a vLLM worker: import (~30 s cold) + engine start (25-77 s seen)
STOP_TIMEOUT_S = 20.0
GPU_RELEASE_SLACK_BYTES = GIB  # free memory within this of the baseline counts as released


def log(message: str) -> None:
    """Print a progress line (the device call shows measure.log's tail)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- request sets -----------------------------------------------------------------------------------


def azure_conv(n: int, seed: int = 0, max_prompt: int = MAX_PROMPT_TOKENS,
               max_output: int = MAX_OUTPUT_TOKENS) -> Trace:
    """Return a contiguous window of n Azure conversation requests (arrivals kept), lengths clamped."""
    window = sample(load_trace(bundled("azure-conv")), n, seed)
    return [replace(r, prompt_tokens=min(r.prompt_tokens, max_prompt), output_tokens=min(r.output_tokens, max_output))
            for r in window]


def lengths(trace: Trace) -> list[tuple[int, int]]:
    """Return (prompt tokens, output tokens) of every request."""
    return [(r.prompt_tokens, r.output_tokens) for r in trace]


def prompt_ids(tag: str, index: int, count: int, vocab: int) -> list[int]:
    """Return ``count`` random token ids, the same for the same (tag, index) on every machine."""
    rng = np.random.default_rng(zlib.crc32(f"{tag}/{index}".encode()))
    return rng.integers(FIRST_TOKEN_ID, vocab, size=count).tolist()


def request_fields(tag: str, index: int, prompt_tokens: int, output_tokens: int, vocab: int,
                   model: str = MODEL) -> dict[str, Any]:
    """Return Client.submit fields of one request: job id ``tag-index``, token ids, exact output length."""
    return {"id": f"{tag}-{index}", "prompt_token_ids": prompt_ids(tag, index, prompt_tokens, vocab),
            "max_tokens": output_tokens, "ignore_eos": True, "model": model}


# --- child processes --------------------------------------------------------------------------------


def kill_group(proc: subprocess.Popen) -> None:
    """End a child started with start_new_session and whatever is left of its process group."""
    if proc.poll() is None:
        with _suppress_lookup():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    with _suppress_lookup():
        os.killpg(proc.pid, signal.SIGKILL)  # orphans of the group (vLLM's engine core)
    if proc.poll() is None:
        proc.wait()


@contextmanager
def _suppress_lookup() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


def run_child(module_args: list[str], timeout_s: float, env: dict[str, str] | None = None) -> int:
    """Run ``python -m <module_args>`` in its own process group; return its exit code."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"python -m {' '.join(module_args)} ran past {timeout_s:.0f} s") from None
    finally:
        kill_group(proc)


def gpu_free_bytes() -> int | None:
    memory = nvml.gpu_memory()
    return None if memory is None else memory[0]


def wait_gpu_released(baseline_free: int | None, timeout_s: float = 60.0) -> float | None:
    """Wait until the GPU's free memory is back near ``baseline_free``; return the seconds waited."""
    if baseline_free is None:
        return None
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        free = gpu_free_bytes()
        if free is None or free >= baseline_free - GPU_RELEASE_SLACK_BYTES:
            return round(time.monotonic() - start, 1)
        time.sleep(0.5)
    log(f"WARNING: GPU memory not released after {timeout_s:.0f} s: {gpu_free_bytes()} free, {baseline_free} before")
    return None


def eager_from_env() -> bool:
    """Whether engines run eager (no CUDA graphs): DIO_ENFORCE_EAGER, read by the worker's own settings."""
    return WorkerSettings().enforce_eager


def engine_job(job: dict[str, Any], work_dir: Path, name: str, timeout_s: float,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one ``dio.ops.gpu.direct`` job in a child process; return its result (raises if it failed)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = work_dir / f"{name}.job.json", work_dir / f"{name}.result.json"
    job_path.write_text(json.dumps(job))
    result_path.unlink(missing_ok=True)
    child_env = {**os.environ, **(env or {})}
    code = run_child(["dio.ops.gpu.direct", str(job_path), str(result_path)], timeout_s, child_env)
    if code != 0 or not result_path.exists():
        raise RuntimeError(f"{name}: the engine process exited with code {code} (its log is in measure.log)")
    return json.loads(result_path.read_text())


# --- a cluster of vLLM workers --------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerPlan:
    """One vLLM worker process: its id and its ``dio worker`` options."""

    id: str
    gpu_memory_utilization: float
    model: str = MODEL
    max_model_len: int = 4096
    max_num_seqs: int = 128

    def options(self) -> list[str]:
        return ["--engine", "vllm", "--id", self.id, "--model", self.model, "--load-format", "dummy",
                "--gpu-memory-utilization", str(self.gpu_memory_utilization),
                "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs)]


@dataclass
class GpuCluster(LocalCluster):
    """vLLM workers started one by one, and a dispatcher replaced between runs on the same workers."""

    plans: list[WorkerPlan] = field(default_factory=list)
    ready_timeout_s: float = READY_TIMEOUT_S
    dispatcher_proc: subprocess.Popen | None = None
    dispatchers_started: int = 0
    _redis: redis.Redis | None = None

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)

    @property
    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.redis_url, decode_responses=True)
        return self._redis

    def start(self) -> None:
        self.start_workers()
        self.start_dispatcher(self.policy)

    def start_workers(self) -> None:
        """Start each worker after the previous one registered (its KV cache is allocated by then)."""
        for plan in self.plans:
            start = time.monotonic()
            proc = self._spawn(plan.id, ["worker", *plan.options()])
            self._wait(lambda plan=plan: self.redis.sismember(self.keys.workers, plan.id), proc, f"worker {plan.id}")
            info = self.worker_info(plan.id)
            log(f"worker {plan.id} up in {time.monotonic() - start:.0f} s: "
                f"KV {info.kv_capacity_tokens} tokens, {info.max_num_seqs} seqs")

    def start_dispatcher(self, policy: str, predictor: str | None = None) -> None:
        """Stop the current dispatcher, forget what it learned and reserved, start a fresh one."""
        self.stop_dispatcher()
        self.reset_state()
        self.dispatchers_started += 1
        name = f"gpu-dispatcher-{self.dispatchers_started}"
        args = ["dispatcher", "--policy", policy, "--name", name]
        if predictor:
            args += ["--predictor", predictor]
        proc = self._spawn(f"dispatcher-{self.dispatchers_started}-{policy}", args)
        self.dispatcher_proc = proc
        self._wait(lambda: self.redis.get(self.keys.lease) == name, proc, f"dispatcher {name} ({policy})")
        log(f"dispatcher {name} active, policy {policy}")

    def stop_dispatcher(self) -> None:
        proc, self.dispatcher_proc = self.dispatcher_proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.remove(proc)

    def reset_state(self) -> None:
        """Delete the predictors' state and the KV reservations (no job is in flight between runs)."""
        self.redis.delete(self.keys.predictor, *(self.keys.reserved(p.id) for p in self.plans))

    def worker_info(self, worker_id: str) -> WorkerInfo:
        """Read a registered worker's capabilities from its hash."""
        return from_hash(WorkerInfo, self.redis.hgetall(self.keys.worker(worker_id)))

    def worker_counter(self, name: str) -> dict[str, int]:
        """Return one integer telemetry field of every worker (e.g. ``preemptions``, ``in_flight``; 0 unregistered)."""
        return {p.id: int(getattr(self._telemetry(p.id), name)) for p in self.plans}

    def _telemetry(self, worker_id: str) -> WorkerTelemetry:
        return from_hash(WorkerTelemetry, self.redis.hgetall(self.keys.worker(worker_id)))

    def wait_idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until no worker holds a job (by their heartbeats); return whether they got there."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.6)  # a heartbeat is 0.5 s
            if not any(self.worker_counter("in_flight").values()):
                return True
        return False

    def _wait(self, ready: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} (see its log under logs/)")
            if ready():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} was not ready within {self.ready_timeout_s:.0f} s")

    def stop(self) -> None:
        """Stop the dispatcher and the workers (they drain), then kill what is left of their groups."""
        procs = list(self.processes)
        self.dispatcher_proc = None
        super().stop()
        for proc in procs:
            kill_group(proc)

    def delete_keys(self) -> None:
        """Delete every key under this cluster's private prefix."""
        delete_keys(self.redis, self.keys)


@contextmanager
def gpu_cluster(name: str, plans: list[WorkerPlan], log_dir: Path, *, standin_step_s: float | None = None,
                max_num_batched_tokens: int | None = None) -> Iterator[GpuCluster]:
    """Start the workers of ``plans`` (no dispatcher yet) under a private key prefix; stop them after."""
    url = os.environ.get("DIO_REDIS_URL", DEFAULT_REDIS_URL)
    env = {}
    if standin_step_s:
        env[STANDIN_ENV] = str(standin_step_s)
    if max_num_batched_tokens:
        env["DIO_MAX_NUM_BATCHED_TOKENS"] = str(max_num_batched_tokens)
    with ensure_redis(url) as server:
        prefix = f"{{gpu-{name}-{uuid.uuid4().hex[:6]}}}:"
        cluster = GpuCluster(server.url, workers=[], key_prefix=prefix, engine="vllm", log_dir=log_dir,
                             extra_env=env, plans=plans)
        try:
            cluster.start_workers()
            yield cluster
        finally:
            cluster.stop()
            cluster.delete_keys()
            cluster.redis.close()


# --- the client side --------------------------------------------------------------------------------


@dataclass
class Sent:
    """Requests sent through DIO: handles, when the first was sent, when each result reached the client."""

    handles: list[JobHandle]
    t0: float
    done_at: dict[str, float] = field(default_factory=dict)

    @property
    def unfinished(self) -> list[JobHandle]:
        return [h for h in self.handles if h.id not in self.done_at]


def collect(client: Client, sent: Sent, timeout_s: float) -> Sent:
    """Wait up to ``timeout_s`` for the results; stamp each with the time it reached the client."""
    try:
        for handle in client.as_completed(sent.unfinished, timeout=max(timeout_s, 0.1)):
            sent.done_at[handle.id] = time.time()
    except ResultTimeout:
        pass
    return sent


def send_burst(client: Client, fields: list[dict[str, Any]], timeout_s: float) -> Sent:
    """Submit every request at once and wait for all results (or the timeout)."""
    t0 = time.time()
    return collect(client, Sent(client.submit_many(fields), t0), timeout_s)


def send_one_by_one(client: Client, fields: list[dict[str, Any]], timeout_s: float) -> list[dict[str, float]]:
    """Submit the requests one at a time, each after the previous result came back; return timings (ms)."""
    out = []
    for item in fields:
        start = time.time()
        result = client.submit_many([item])[0].result(timeout=timeout_s, raise_on_error=False)
        done = time.time()
        ttft = None if result.first_token_at is None else (result.first_token_at - start) * 1000.0
        out.append({"prompt_tokens": len(item["prompt_token_ids"]), "output_tokens": result.output_tokens or 0,
                    "status": result.status.value, "ttft_ms": None if ttft is None else round(ttft, 2),
                    "latency_ms": round((done - start) * 1000.0, 2),
                    "stages_ms": stages_ms(client.get(result.id), done)})
    return out


def stages_ms(job: JobResult | None, client_done: float) -> dict[str, float | None] | None:
    """Where one job's time went: intake → dispatched → started (worker) → finished → back at the client."""
    if job is None:
        return None
    marks = [job.submitted_at, job.dispatched_at, job.started_at, job.finished_at, client_done]
    names = ("to_dispatch", "to_worker_start", "in_engine", "to_client")
    return {name: None if a is None or b is None else round((b - a) * 1000.0, 2)
            for name, a, b in zip(names, marks, marks[1:], strict=False)}


def send_open_loop(client: Client, arrivals: list[float], fields: list[dict[str, Any]], drain_s: float) -> Sent:
    """Submit request i at ``arrivals[i]`` seconds after the start (open loop), then wait ``drain_s``."""
    handles: list[JobHandle] = []
    t0, i = time.time(), 0
    while i < len(fields):
        now = time.time() - t0
        due = []
        while i < len(fields) and arrivals[i] <= now:
            due.append(fields[i])
            i += 1
        if due:
            handles += client.submit_many(due)
        else:
            time.sleep(min(0.005, max(arrivals[i] - now, 0.0)))
    return collect(client, Sent(handles, t0), drain_s)


def cancel_unfinished(client: Client, sent: Sent) -> int:
    """Cancel the jobs that have not ended (a run's leftovers must not load the next run)."""
    cancelled = 0
    for handle in sent.unfinished:
        cancelled += bool(client.cancel(handle.id))
    return cancelled


def read_jobs(r: redis.Redis, keys: Keys, ids: list[str]) -> list[JobResult | None]:
    """Read jobs' states from their hashes (the source of truth: every timestamp is there)."""
    out: list[JobResult | None] = []
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        pipe = r.pipeline(transaction=False)
        for job_id in chunk:
            pipe.hgetall(keys.job(job_id))
        out += [parse_job(job_id, fields) for job_id, fields in zip(chunk, pipe.execute(), strict=True)]
    return out


def job_record(result: JobResult | None, job_id: str) -> dict[str, Any]:
    """Flatten one job's hash into a per-request record (times in ms where relative)."""
    if result is None:
        return {"id": job_id, "status": "lost"}

    def ms(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round((b - a) * 1000.0, 2)

    return {
        "id": job_id, "status": result.status.value, "worker": result.worker,
        "prompt_tokens": result.prompt_tokens, "output_tokens": result.output_tokens,
        "submitted_at": result.submitted_at, "dispatched_at": result.dispatched_at, "started_at": result.started_at,
        "first_token_at": result.first_token_at, "finished_at": result.finished_at,
        "latency_ms": ms(result.submitted_at, result.finished_at),
        "ttft_ms": ms(result.submitted_at, result.first_token_at),
        "service_ms": ms(result.started_at, result.finished_at), "queue_ms": ms(result.submitted_at, result.started_at),
        "reason": result.reason or result.error,
    }


# --- statistics -------------------------------------------------------------------------------------


def pct(values: list[float | None], q: float) -> float | None:
    """Return the q-th percentile, rounded to 0.1 ms (None when there is nothing)."""
    value = percentile(values, q)
    return None if value is None else round(value, 1)


def completed(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get("status") == JobStatus.completed.value]


def fit_linear(rows: list[tuple[float, float, float]]) -> list[float]:
    """Least-squares fit of y = a + b·x1 + c·x2 over (x1, x2, y) rows, no coefficient below 0; [a, b, c].

    A negative coefficient (noise on a few points) is pinned to 0 and the others refitted, so that
    no request's predicted latency shrinks as it grows.
    """
    x = np.array([[1.0, x1, x2] for x1, x2, _ in rows])
    y = np.array([row[2] for row in rows])
    free = [0, 1, 2]
    coef = np.zeros(3)
    while free:
        sub, *_ = np.linalg.lstsq(x[:, free], y, rcond=None)
        if (sub >= 0).all():
            coef[free] = sub
            break
        free.pop(int(np.argmin(sub)))
    return [float(c) for c in coef]
