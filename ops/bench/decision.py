"""``dio bench decision``: the cost of one routing decision against the number of workers.

Two measurements per policy and worker count:

* **pure scoring** — ``Policy.decide`` on a synthetic ``dio.dispatcher.cluster.Cluster`` (one row
  per worker, GPU types in turn, predictors warmed with a few completions), µs per request over
  a batch, with each chosen worker's reservation held and released in turn so the cluster stays
  in a steady state;
* **end to end** — one real dispatcher process (``dio dispatcher``) draining an intake pre-filled
  with requests into the queues of fake workers (registered hashes, alive keys and warm predictor
  state in Redis, no worker processes), in decisions per second, timed from its first hand-off
  to its last through ``XINFO GROUPS``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import redis

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policies import POLICIES, make_policy
from dio.dispatcher.predictors import make_predictor
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.roofline import kv_capacity_tokens, unloaded_service_time_s
from dio.ops.bench import plots, report
from dio.ops.bench.cluster_run import DEFAULT_PREDICTOR, delete_prefix
from dio.ops.bench.cpu import process_cpu_s
from dio.ops.bench.workload import load_workload
from dio.ops.redis_server import ensure_redis
from dio.protocol.connection import connect
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import DISPATCHER_GROUP, REQUEST_FIELD, Keys
from dio.protocol.models import Request, WorkerInfo, WorkerTelemetry, to_hash
from dio.protocol.settings import CommonSettings

GPUS = ("H100-80GB", "A100-40GB", "L4", "T4")
WARM_COMPLETIONS = 30  # completions each synthetic worker's predictor learns before timing
IN_FLIGHT_PER_WORKER = 4  # reservations held per worker while timing the pure decision
FAKE_WORKER_TTL_S = 600
DISPATCHER_READY_S = 60.0
POLL_S = 0.01
PROGRESS_WINDOW = (0.1, 0.9)  # the e2e rate is measured between these fractions of the requests handed off


@dataclass
class DecisionConfig:
    """Options of ``dio bench decision``."""

    workers: list[int] = field(default_factory=lambda: [1, 8, 32, 128, 512, 1024])
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    e2e_policies: list[str] | None = None  # None: the same as policies
    trace: str = "azure-conv"
    model: str = DEFAULT_MODEL
    predictor: str = DEFAULT_PREDICTOR
    batch: int = 2000  # decisions timed per policy and worker count (pure)
    e2e_requests: int = 10000  # requests drained by the dispatcher per e2e run
    e2e: bool = True
    seed: int = 0
    out_dir: Path | None = None
    name: str = "decision"


# --- synthetic workers ------------------------------------------------------------------------------


def worker_info(index: int, model: str, kv_capacity: int | None = None, max_num_seqs: int = 256) -> WorkerInfo:
    """Return the capabilities of synthetic worker ``index`` (GPU types in turn)."""
    gpu, shape = GPUS[index % len(GPUS)], get_model(model)
    kv = kv_capacity or kv_capacity_tokens(get_profile(gpu), shape)
    return WorkerInfo(id=f"w{index}", engine="sim", model=model, gpu=gpu, kv_capacity_tokens=kv,
                      kv_bytes_per_token=shape.kv_bytes_per_token, weight_bytes=shape.weight_bytes,
                      max_num_seqs=max_num_seqs, max_model_len=min(kv, 131_072))


def load_units(model: str, kv_tokens: int) -> float:
    """Return KV tokens in units of the model's weights (the predictors' load feature)."""
    shape = get_model(model)
    return kv_tokens * shape.kv_bytes_per_token / shape.weight_bytes


def warm_samples(gpu: str, model: str, lengths: list[tuple[int, int]]) -> list[tuple[int, int, float]]:
    """Return (prompt, output, latency ms) of each length alone on the GPU (the roofline's latency)."""
    profile, shape = get_profile(gpu), get_model(model)
    return [(p, o, 1000.0 * unloaded_service_time_s(profile, shape, p, o)) for p, o in lengths]


def synthetic_cluster(count: int, model: str, predictor: str, lengths: list[tuple[int, int]]) -> Cluster:
    """Return a Cluster of ``count`` live workers whose predictors learned WARM_COMPLETIONS completions."""
    cluster = Cluster(predictor_kind=predictor)
    samples = {gpu: warm_samples(gpu, model, lengths[:WARM_COMPLETIONS]) for gpu in GPUS}
    for i in range(count):
        info = worker_info(i, model)
        row = cluster.upsert(info)
        cluster.set_telemetry(row, WorkerTelemetry(), alive=True)
        for prompt, output, latency in samples[info.gpu]:
            cluster.learn(row, prompt, output, latency, load_units(model, prompt + output))
    return cluster


def requests(lengths: list[tuple[int, int]], count: int, model: str) -> list[Request]:
    """Return ``count`` requests cycling through the trace's lengths."""
    return [Request(id=f"r{i}", prompt="x", num_prompt_tokens=p, max_tokens=o, model=model)
            for i, (p, o) in zip(range(count), _cycle(lengths), strict=False)]


def _cycle(lengths: list[tuple[int, int]]):
    while True:
        yield from lengths


# --- pure scoring -----------------------------------------------------------------------------------


def time_decisions(policy_name: str, cluster: Cluster, batch: list[Request], seed: int = 0) -> dict[str, float]:
    """Return µs per decide (mean and p50) over the batch, holding a few reservations per worker."""
    policy = make_policy(policy_name, prefetch=2, seed=seed)
    held: deque[tuple[int, str]] = deque()
    cap = IN_FLIGHT_PER_WORKER * len(cluster)
    times = np.empty(len(batch))
    now = time.time()
    for i, request in enumerate(batch):
        start = time.perf_counter()
        decision = policy.decide(request, cluster, now)
        times[i] = time.perf_counter() - start
        if decision.row is not None:
            cluster.reserve(decision.row, request.id, request.kv_tokens)
            held.append((decision.row, request.id))
        while len(held) > cap:
            cluster.release(*held.popleft())
    while held:
        cluster.release(*held.popleft())
    return {"score_us": round(float(times.mean() * 1e6), 2), "score_p50_us": round(float(np.median(times) * 1e6), 2)}


# --- end to end through Redis -----------------------------------------------------------------------


def register_fake_workers(client: redis.Redis, keys: Keys, count: int, model: str, predictor: str,
                          lengths: list[tuple[int, int]], max_num_seqs: int) -> None:
    """Register workers that never read their queues: hashes, alive keys, warm predictor state."""
    states = {gpu: _warm_state(gpu, model, predictor, lengths) for gpu in GPUS}
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        info = worker_info(i, model, kv_capacity=1_000_000_000, max_num_seqs=max_num_seqs)
        pipe.hset(keys.worker(info.id), mapping={**to_hash(info), **to_hash(WorkerTelemetry())})
        pipe.set(keys.alive(info.id), "1", ex=FAKE_WORKER_TTL_S)
        pipe.sadd(keys.workers, info.id)
        pipe.hset(keys.predictor, info.id, states[info.gpu])
    pipe.execute()


def _warm_state(gpu: str, model: str, predictor: str, lengths: list[tuple[int, int]]) -> str:
    import json

    bank = make_predictor(predictor)
    row = bank.add_row()
    for prompt, output, latency in warm_samples(gpu, model, lengths[:WARM_COMPLETIONS]):
        bank.update(row, prompt, output, latency, load_units(model, prompt + output))
    return json.dumps({**bank.snapshot(row), "gpu": gpu, "service_ms": 1000.0})


def fill_intake(client: redis.Redis, keys: Keys, batch: list[Request], chunk: int = 1000) -> None:
    """XADD every request to the intake (no job hashes: the hand-off script creates them)."""
    for start in range(0, len(batch), chunk):
        pipe = client.pipeline(transaction=False)
        for request in batch[start:start + chunk]:
            pipe.xadd(keys.intake, {REQUEST_FIELD: request.to_json()})
        pipe.execute()


def handed_off(client: redis.Redis, keys: Keys) -> int:
    """Return how many intake entries the dispatchers' group has read and acknowledged."""
    for group in client.xinfo_groups(keys.intake):
        if group["name"] == DISPATCHER_GROUP:
            return int(group.get("entries-read") or 0) - int(group["pending"])
    return 0


def start_dispatcher(redis_url: str, prefix: str, policy: str, predictor: str) -> subprocess.Popen:
    """Start ``dio dispatcher`` for the prefix (requests never time out while it drains)."""
    env = dict(os.environ, DIO_REDIS_URL=redis_url, DIO_KEY_PREFIX=prefix, DIO_MAX_WAIT_S="3600",
               PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "dio.ops.cli", "dispatcher", "--policy", policy,
                             "--predictor", predictor], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def drain_rate(samples: list[tuple[float, int]], total: int) -> float | None:
    """Return hand-offs per second between PROGRESS_WINDOW fractions of ``total`` (samples: time, count).

    When the drain is too quick for the samples to resolve that window, the rate is taken from the
    last sample before the first hand-off to the first sample with all of them: a lower bound.
    """
    lo, hi = (total * f for f in PROGRESS_WINDOW)
    first = next(((t, n) for t, n in samples if n >= lo), None)
    last = next(((t, n) for t, n in samples if n >= hi), None)
    if first is not None and last is not None and last[0] > first[0] and first[1] > 0:
        return (last[1] - first[1]) / (last[0] - first[0])
    before = [(t, n) for t, n in samples if n == 0]
    done = next(((t, n) for t, n in samples if n >= total), None)
    if not before or done is None or done[0] <= before[-1][0]:
        return None
    return done[1] / (done[0] - before[-1][0])


def e2e_run(redis_url: str, count: int, policy: str, config: DecisionConfig,
            lengths: list[tuple[int, int]]) -> dict[str, Any]:
    """Return one dispatcher's decisions per second draining the intake into ``count`` fake workers."""
    prefix = f"{{dio-bench-{uuid.uuid4().hex[:8]}}}:"
    keys = Keys(prefix)
    client = connect(CommonSettings(redis_url=redis_url, key_prefix=prefix))
    batch = requests(lengths, config.e2e_requests, config.model)
    proc = None
    try:
        register_fake_workers(client, keys, count, config.model, config.predictor, lengths, config.e2e_requests)
        fill_intake(client, keys, batch)
        proc = start_dispatcher(redis_url, prefix, policy, config.predictor)
        samples, cpu0 = _watch(client, keys, proc, len(batch))
        cpu1 = process_cpu_s(proc.pid)
        rate = drain_rate(samples, len(batch))
        busy = [t for t, n in samples if n > 0]
        span = busy[-1] - busy[0] if busy else 0.0
        cpu = None if cpu0 is None or cpu1 is None or span <= 0 else round((cpu1 - cpu0) / span, 3)
        return {"e2e_decisions_per_s": None if rate is None else round(rate, 1),
                "e2e_us_per_decision": None if not rate else round(1e6 / rate, 2),
                "e2e_handed_off": samples[-1][1] if samples else 0, "dispatcher_cores": cpu}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=20)
        delete_prefix(redis_url, prefix)


def _watch(client: redis.Redis, keys: Keys, proc: subprocess.Popen, total: int) -> tuple[list, float | None]:
    """Sample the hand-off count from the first hand-off until all are done (or the dispatcher stalls)."""
    deadline = time.monotonic() + DISPATCHER_READY_S
    samples: list[tuple[float, int]] = []
    cpu0 = None
    while time.monotonic() < deadline and proc.poll() is None:
        done = handed_off(client, keys)
        now = time.monotonic()
        if done and cpu0 is None:
            cpu0 = process_cpu_s(proc.pid)
            deadline = now + DISPATCHER_READY_S
        samples.append((now, done))
        if done >= total:
            break
        time.sleep(POLL_S)
    return samples, cpu0


# --- the benchmark -----------------------------------------------------------------------------------


def run_decision(config: DecisionConfig) -> dict[str, Any]:
    """Run the benchmark, print its table, write its JSON and plot; return the --json summary."""
    trace = load_workload(config.trace, max_requests=5000)
    lengths = [(r.prompt_tokens, r.output_tokens) for r in trace]
    pure_batch = requests(lengths, config.batch, config.model)
    e2e_policies = config.e2e_policies if config.e2e_policies is not None else config.policies
    results: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in config.policies}
    with ensure_redis(CommonSettings().redis_url) as server, report.progress() as bar:
        task = bar.add_task("decision", total=len(config.workers) * (len(config.policies) + len(e2e_policies)))
        for count in config.workers:
            cluster = synthetic_cluster(count, config.model, config.predictor, lengths)
            for policy in config.policies:
                bar.update(task, description=f"pure {policy} x {count}")
                results[policy][str(count)] = time_decisions(policy, cluster, pure_batch, config.seed)
                bar.advance(task)
            for policy in e2e_policies if config.e2e else []:
                bar.update(task, description=f"e2e {policy} x {count}")
                results.setdefault(policy, {}).setdefault(str(count), {}).update(
                    e2e_run(server.url, count, policy, config, lengths))
                bar.advance(task)
        data = report.payload("decision", _figures(config, results), connect(CommonSettings(redis_url=server.url)))
    out_dir = Path(config.out_dir or report.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(results, out_dir / f"{config.name}.png")
    data["figures_png"] = [png.name]
    path = report.save(config.name, data, out_dir)
    print_table(results)
    report.status.print(f"wrote {path} and {png}")
    return {"workers": {str(n): results.get("dio", {}).get(str(n), {}) for n in config.workers},
            "scaling": data["scaling"]}


def _figures(config: DecisionConfig, results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    return {"worker_counts": config.workers, "policies": config.policies, "model": config.model,
            "predictor": config.predictor, "trace": config.trace, "pure_batch": config.batch,
            "e2e_requests": config.e2e_requests, "scaling": scaling(results),
            "workers": {str(n): results.get("dio", {}).get(str(n), {}) for n in config.workers},
            "by_policy": results}


def scaling(results: dict[str, dict[str, dict[str, Any]]], small: str = "32", large: str = "1024") -> dict:
    """Return, per policy, the cost at ``large`` workers over the cost at ``small`` (pure and e2e)."""
    out = {}
    for policy, by_count in results.items():
        a, b = by_count.get(small, {}), by_count.get(large, {})
        entry = {}
        if a.get("score_us") and b.get("score_us"):
            entry["pure"] = round(b["score_us"] / a["score_us"], 2)
        if a.get("e2e_decisions_per_s") and b.get("e2e_decisions_per_s"):
            entry["e2e"] = round(a["e2e_decisions_per_s"] / b["e2e_decisions_per_s"], 2)
        if entry:
            out[policy] = entry
    return {f"cost_{large}_over_{small}": out}


def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Print one row per policy and worker count."""
    rows = [[policy, count, r.get("score_us"), r.get("score_p50_us"), r.get("e2e_decisions_per_s"),
             r.get("dispatcher_cores")]
            for policy, by_count in results.items() for count, r in by_count.items()]
    report.console.print(report.table("routing decision cost", ["policy", "workers", "pure µs/decision",
                                      "pure p50 µs", "e2e decisions/s", "dispatcher cores"], rows))


def plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    """Pure µs per decision against workers, one line per policy (log-log)."""
    series = {}
    for policy, by_count in results.items():
        counts = sorted(by_count, key=int)
        points = [(int(c), by_count[c]["score_us"]) for c in counts if by_count[c].get("score_us")]
        if points:
            series[policy] = tuple(list(v) for v in zip(*points, strict=True))
        e2e = [(int(c), 1e6 / by_count[c]["e2e_decisions_per_s"]) for c in counts
               if by_count[c].get("e2e_decisions_per_s")]
        if e2e:
            series[f"{policy} (e2e)"] = tuple(list(v) for v in zip(*e2e, strict=True))
    return plots.curves(series, "µs per routing decision (pure scoring, and e2e through Redis)", "workers",
                        "µs per decision", path, log_x=True, log_y=True, hline=10.0)
