"""``dio bench pipeline``: what DIO's own machinery costs, with an engine that does no work.

Three measurements on the same Redis, in one run:

* **DIO** — a real dispatcher and instant-engine workers (one process), a client submitting as
  fast as it can: requests per second end to end (submit → intake → dispatcher → worker queue →
  worker → result notice read by the client). Then the client submits open loop at half that
  rate, and every request's latency is DIO's added latency (the engine takes zero time), split
  into its stages from the job's timestamps.
* **RQ** — one RQ job per request (JSON serializer, one ``SimpleWorker`` process), enqueued as
  fast as possible: jobs per second until the last one finished.
* **redis-benchmark** — the server's XADD ceiling on this machine (one XADD per round trip, and
  pipelined), the upper bound of any design that moves each request through a stream.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import redis

from dio.client import Client
from dio.client.handle import JobHandle
from dio.ops.bench import report
from dio.ops.bench.cluster_run import delete_prefix
from dio.ops.bench.cpu import CpuMeter
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.ops.redis_server import ensure_redis
from dio.ops.stats import percentile
from dio.protocol.connection import connect
from dio.protocol.settings import CommonSettings

SUBMIT_CHUNK = 500  # requests per submit_many call at full speed
TICK_S = 0.002  # the half-load submitter's period
RESULT_TIMEOUT_S = 120.0
RQ_START_TIMEOUT_S = 30.0
RQ_POLL_S = 0.01
XADD_RATE = re.compile(r"([\d.]+) requests per second")


@dataclass
class PipelineConfig:
    """Options of ``dio bench pipeline``."""

    requests: int = 20000  # DIO requests at full speed
    half_load_s: float = 5.0  # seconds of open-loop traffic at half the measured rate
    low_rates: tuple[float, ...] = (20.0, 100.0)  # also measure added latency at these rates (a replay's range)
    workers: int = 2  # instant-engine workers, hosted by one process
    max_num_seqs: int = 1024
    policy: str = "dio"
    rq_requests: int = 1000
    xadd_requests: int = 100000
    out_dir: Path | None = None
    name: str = "pipeline"


def request_fields(i: int) -> dict[str, Any]:
    """Return a small request (the instant engine answers it at once)."""
    return {"prompt": f"request {i}", "num_prompt_tokens": 16, "max_tokens": 4}


class Stopwatch:
    """Record when each handle's result arrived (a done-callback on its future)."""

    def __init__(self) -> None:
        self.done_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def watch(self, handles: list[JobHandle]) -> None:
        for handle in handles:
            handle.future.add_done_callback(lambda _f, job=handle.id: self._mark(job))

    def _mark(self, job_id: str) -> None:
        with self._lock:
            self.done_at[job_id] = time.time()


# --- DIO -----------------------------------------------------------------------------------------------


def dio_peak(client: Client, count: int) -> dict[str, Any]:
    """Submit ``count`` requests as fast as possible; return requests per second until the last result."""
    watch = Stopwatch()
    handles: list[JobHandle] = []
    start = time.time()
    for first in range(0, count, SUBMIT_CHUNK):
        chunk = client.submit_many([request_fields(i) for i in range(first, min(first + SUBMIT_CHUNK, count))])
        watch.watch(chunk)
        handles += chunk
    results = client.wait_all(handles, timeout=RESULT_TIMEOUT_S)
    end = max(watch.done_at.values())
    completed = sum(r.status.value == "completed" for r in results)
    return {"dio_rps": round(count / (end - start), 1), "completed": completed,
            "submit_rps": round(count / (handles[-1].request.submitted_at - start), 1)}


def dio_half_load(client: Client, rate_rps: float, duration_s: float) -> dict[str, Any]:
    """Submit open loop at ``rate_rps`` for ``duration_s``; return DIO's added latency and its stages (ms)."""
    watch = Stopwatch()
    handles: list[JobHandle] = []
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < duration_s:
        due = int(elapsed * rate_rps) - sent
        if due > 0:
            chunk = client.submit_many([request_fields(sent + i) for i in range(due)])
            watch.watch(chunk)
            handles += chunk
            sent += due
        time.sleep(TICK_S)
    results = client.wait_all(handles, timeout=RESULT_TIMEOUT_S)
    added = [1000.0 * (watch.done_at[h.id] - h.request.submitted_at) for h in handles if h.id in watch.done_at]
    out = {"half_load_rps": round(sent / duration_s, 1), "half_load_requests": sent,
           "added_p50_ms": _ms(percentile(added, 50)), "added_p99_ms": _ms(percentile(added, 99))}
    out["stages_p50_ms"] = stages(results, watch)
    return out


def stages(results: list, watch: Stopwatch) -> dict[str, float | None]:
    """Return the median of each stage: intake wait, queue wait, run, result write, notice to client."""
    spans: dict[str, list[float]] = {"submit_to_dispatch": [], "dispatch_to_start": [], "start_to_finish": [],
                                     "finish_to_client": []}
    for r in results:
        if None in (r.submitted_at, r.dispatched_at, r.started_at, r.finished_at) or r.id not in watch.done_at:
            continue
        spans["submit_to_dispatch"].append(r.dispatched_at - r.submitted_at)
        spans["dispatch_to_start"].append(r.started_at - r.dispatched_at)
        spans["start_to_finish"].append(r.finished_at - r.started_at)
        spans["finish_to_client"].append(watch.done_at[r.id] - r.finished_at)
    return {name: _ms(percentile([v * 1000.0 for v in values], 50)) for name, values in spans.items()}


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def run_dio(redis_url: str, config: PipelineConfig) -> dict[str, Any]:
    """Start a dispatcher and instant workers; measure the peak rate, then latency at half of it."""
    prefix = f"{{dio-bench-{uuid.uuid4().hex[:8]}}}:"
    cluster = LocalCluster(redis_url, [WorkerSpec("instant", config.workers)], key_prefix=prefix,
                           policy=config.policy, engine="instant", one_worker_process=True,
                           worker_args=["--max-num-seqs", str(config.max_num_seqs)])
    try:
        cluster.start()
        meter = CpuMeter({"dispatcher": cluster.dispatcher_pid, "workers": cluster.worker_pids[0]},
                         connect(CommonSettings(redis_url=redis_url)))
        with Client(redis_url=redis_url, key_prefix=prefix) as client:
            dio_peak(client, min(1000, config.requests))  # warm-up: predictors, connections
            meter.start()
            peak = dio_peak(client, config.requests)
            cpu = meter.stop()
            half = dio_half_load(client, peak["dio_rps"] / 2, config.half_load_s)
            low = {f"{rate:g}": _added(dio_half_load(client, rate, config.half_load_s)) for rate in config.low_rates}
    finally:
        cluster.stop()
        delete_prefix(redis_url, prefix)
    return {**peak, "cpu_cores_at_peak": cpu, "cpu_us_per_request": cpu_per_request(cpu, peak["dio_rps"]), **half,
            "added_ms_at_rate": low}


def _added(figures: dict[str, Any]) -> dict[str, Any]:
    """Keep the added-latency figures of a fixed-rate run."""
    return {"p50": figures["added_p50_ms"], "p99": figures["added_p99_ms"], "stages_p50": figures["stages_p50_ms"]}


def cpu_per_request(cores: dict[str, float | None], rps: float) -> dict[str, float]:
    """Return the CPU microseconds each process spent per request at the peak rate."""
    names = ("dispatcher", "workers", "bench", "redis")
    return {name: round(cores[name] / rps * 1e6, 1) for name in names if cores.get(name) is not None and rps > 0}


# --- RQ ----------------------------------------------------------------------------------------------------


def rq_echo(request: dict) -> dict:
    """The RQ job: return what an instant engine returns (no work)."""
    return {"status": "completed", "output_tokens": request.get("max_tokens", 0)}


def run_rq(redis_url: str, count: int) -> dict[str, Any]:
    """Enqueue ``count`` RQ jobs (JSON serializer) for one SimpleWorker; return jobs per second."""
    from rq import Queue
    from rq.registry import FinishedJobRegistry
    from rq.serializers import JSONSerializer

    conn = redis.Redis.from_url(redis_url)
    name = f"dio-bench-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, connection=conn, serializer=JSONSerializer)
    worker = subprocess.Popen([sys.executable, "-m", "rq.cli", "worker", "-w", "rq.worker.SimpleWorker", "-S", "json",
                               "-u", redis_url, "-n", name, name], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    jobs = []
    try:
        _wait_rq_worker(conn, name, worker)
        start = time.time()
        datas = [Queue.prepare_data(rq_echo, args=(request_fields(i),), result_ttl=600) for i in range(count)]
        for first in range(0, count, SUBMIT_CHUNK):
            jobs += queue.enqueue_many(datas[first:first + SUBMIT_CHUNK])
        registry = FinishedJobRegistry(name, connection=conn, serializer=JSONSerializer)
        while registry.count < count and time.time() - start < RESULT_TIMEOUT_S:
            time.sleep(RQ_POLL_S)
        elapsed = time.time() - start
        return {"rq_rps": round(registry.count / elapsed, 1), "rq_jobs": count, "rq_finished": registry.count}
    finally:
        worker.terminate()
        worker.wait(timeout=20)
        _delete_rq(conn, queue, jobs)


def _wait_rq_worker(conn: redis.Redis, name: str, worker: subprocess.Popen) -> None:
    from rq import Worker

    deadline = time.monotonic() + RQ_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the RQ worker exited early (code {worker.returncode})")
        if any(w.name == name for w in Worker.all(connection=conn)):
            return
        time.sleep(0.05)
    raise TimeoutError("the RQ worker did not start")


def _delete_rq(conn: redis.Redis, queue: Any, jobs: list) -> None:
    queue.delete(delete_jobs=True)
    pipe = conn.pipeline(transaction=False)
    for job in jobs:
        pipe.delete(f"rq:job:{job.id}", f"rq:results:{job.id}")
    pipe.execute()
    for key in conn.scan_iter(match=f"*{queue.name}*", count=1000):
        conn.delete(key)


# --- redis-benchmark ------------------------------------------------------------------------------------


def run_xadd_ceiling(redis_url: str, count: int, pipeline: int) -> float | None:
    """Return redis-benchmark's XADD requests per second (None if redis-benchmark is missing)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    key = f"{{dio-bench-{uuid.uuid4().hex[:8]}}}:xadd"
    done = subprocess.run([binary, *_server_args(redis_url), "-n", str(count), "-P", str(pipeline), "-q",
                           "XADD", key, "*", "f", "v"], capture_output=True, text=True, timeout=300)
    redis.Redis.from_url(redis_url).delete(key)
    rates = XADD_RATE.findall(done.stdout.replace("\r", "\n"))
    return float(rates[-1]) if rates else None


def _server_args(redis_url: str) -> list[str]:
    url = urlsplit(redis_url)
    if url.scheme == "unix":
        return ["-s", url.path]
    args = ["-h", url.hostname or "127.0.0.1", "-p", str(url.port or 6379)]
    if url.password:
        args += ["-a", url.password]
    if url.path.strip("/"):
        args += ["--dbnum", url.path.strip("/")]
    return args


# --- the benchmark ------------------------------------------------------------------------------------------


def run_pipeline(config: PipelineConfig) -> dict[str, Any]:
    """Run the benchmark, print its table, write its JSON; return the --json summary."""
    with ensure_redis(CommonSettings().redis_url) as server, report.progress() as bar:
        task = bar.add_task("pipeline: DIO", total=3)
        dio = run_dio(server.url, config)
        bar.update(task, advance=1, description="pipeline: RQ")
        rq = run_rq(server.url, config.rq_requests)
        bar.update(task, advance=1, description="pipeline: redis-benchmark")
        xadd = {"xadd_rps": run_xadd_ceiling(server.url, config.xadd_requests, 1),
                "xadd_pipelined_rps": run_xadd_ceiling(server.url, config.xadd_requests, 16)}
        bar.advance(task)
        client = connect(CommonSettings(redis_url=server.url))
        summary = {**dio, **rq, **xadd, **ratios(dio, rq, xadd)}
        data = report.payload("pipeline", {"config": config.__dict__ | {"out_dir": str(config.out_dir)}, **summary},
                              client)
    path = report.save(config.name, data, config.out_dir)
    print_table(summary)
    report.status.print(f"wrote {path}")
    return {k: v for k, v in summary.items() if not isinstance(v, dict)}


def ratios(dio: dict[str, Any], rq: dict[str, Any], xadd: dict[str, Any]) -> dict[str, float | None]:
    """Return DIO's rate over RQ's and over the XADD ceilings."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a and b else None

    return {"dio_over_rq": ratio(dio.get("dio_rps"), rq.get("rq_rps")),
            "dio_over_xadd": ratio(dio.get("dio_rps"), xadd.get("xadd_rps")),
            "dio_over_xadd_pipelined": ratio(dio.get("dio_rps"), xadd.get("xadd_pipelined_rps"))}


def print_table(summary: dict[str, Any]) -> None:
    """Print the headline figures."""
    keys = ("dio_rps", "rq_rps", "dio_over_rq", "xadd_rps", "xadd_pipelined_rps", "half_load_rps", "added_p50_ms",
            "added_p99_ms")
    report.console.print(report.table("pipeline: requests per second, instant engine (same Redis, same run)",
                                      ["figure", "value"], [[k, summary.get(k)] for k in keys]))
    stages_ms = summary.get("stages_p50_ms") or {}
    report.console.print(report.table("DIO added latency at half load, median per stage (ms)", ["stage", "ms"],
                                      [[k, v] for k, v in stages_ms.items()]))


