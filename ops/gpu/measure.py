"""Measurements on the GPU machine; each writes ``<name>.json`` to ``--out`` and prints a RESULT line.

On the device, ``ops/gpu/device.sh`` installs vLLM, starts Redis, sets the environment and runs
``python -m dio.ops.gpu.measure <name>... --out $OUT``. Here, the same driver runs against the CPU
stand-in of vLLM (a dry run of the code path, no numbers worth keeping)::

    python -m dio.ops.gpu.measure smoke --backend standin --out /tmp/gpu-dry

Measurements (helpers in ``scenarios``, ``direct``, ``calibration``, ``predictors``, ``report``):
    smoke           start DIO's VllmEngine (no Redis), run concurrent batches, an abort and a rejected
                    prompt; report capacity, live stats, throughput and TTFT.
    pytest-gpu      run ``pytest -m gpu tests/test_vllm_engine.py`` (the adapter tests on the real vLLM).
    overhead        the same Azure-conversation requests straight into one engine and through DIO (a
                    burst, then one at a time): throughput ratio, added p50/p99 latency.
    hetero          three vLLM workers with different KV budgets on one GPU; capacity, then an Azure
                    replay at 70% / 90% of it per policy: latency, TTFT, SLO attainment, preemptions.
    predictor-real  replay the predictors (seed, vector, rls) on hetero's real service times.
    calibration     prefill and decode step times of two model shapes vs the simulator; fit its profile.
    summary         the headline numbers of the measurements in --out (also: python -m dio.ops.gpu.report DIR).

With ``--backend standin`` every engine (in this process, in engine child processes and in worker
processes, through ``DIO_VLLM_STANDIN``) is the CPU stand-in of vLLM: a dry run of the code path.
``MEASURE_DEADLINE`` (epoch seconds, set by device.sh) lets long measurements skip what no longer fits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from dio.client import Client
from dio.gpu_worker import nvml
from dio.gpu_worker.engine import EngineOutput, EngineRequest, RequestRejected
from dio.gpu_worker.vllm_engine import VllmBackend, VllmEngine, read_model_config, resolve_model
from dio.ops.gpu import report
from dio.ops.gpu.calibration import CALIBRATION_DECODE, Point, calibrate, measured_points
from dio.ops.gpu.predictors import evaluate
from dio.ops.gpu.scenarios import (
    GpuCluster,
    Sent,
    WorkerPlan,
    azure_conv,
    cancel_unfinished,
    completed,
    eager_from_env,
    engine_job,
    fit_linear,
    gpu_cluster,
    gpu_free_bytes,
    job_record,
    lengths,
    log,
    pct,
    read_jobs,
    request_fields,
    send_burst,
    send_one_by_one,
    send_open_loop,
    wait_gpu_released,
)
from dio.ops.traces import rescale_arrivals

REPO = Path(__file__).resolve().parents[2]
STATS_INTERVAL_S = 0.02  # how often a batch samples engine.stats()
PYTEST_TIMEOUT_S = 420
DEFAULT_RUNS = "64x512x64,64x512x128"  # requests x prompt tokens x output tokens (the recipe's AsyncLLM runs)

Measurement = Callable[[argparse.Namespace], dict[str, Any]]
MEASUREMENTS: dict[str, Measurement] = {}


def measurement(fn: Measurement) -> Measurement:
    """Register a measurement under its function name, underscores as dashes."""
    MEASUREMENTS[fn.__name__.replace("_", "-")] = fn
    return fn


# --- smoke ------------------------------------------------------------------------------------------


@dataclass
class Timed:
    """One request's outcome as the client of the engine saw it."""

    submitted_at: float
    finished_at: float = 0.0
    output: EngineOutput = field(default_factory=EngineOutput)

    @property
    def ttft_ms(self) -> float | None:
        first = self.output.first_token_at
        return None if first is None else (first - self.submitted_at) * 1000.0


def _backend(name: str) -> VllmBackend | None:
    """Return the engine backend: None for the real vLLM, or the CPU stand-in for dry runs."""
    if name == "vllm":
        return None
    from dio.gpu_worker.vllm_standin import StandinBackend

    return StandinBackend(step_s=0.005)


def _parse_runs(spec: str) -> list[tuple[int, int, int]]:
    """Parse "64x512x64,256x512x128" into (requests, prompt tokens, output tokens) triples."""
    runs = []
    for item in spec.split(","):
        n, prompt, out = (int(x) for x in item.strip().split("x"))
        runs.append((n, prompt, out))
    return runs


def _percentile(values: list[float], q: float) -> float | None:
    """Return the q-th percentile (0..100) of values, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100.0 * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 1)


async def _timed(engine: VllmEngine, request: EngineRequest) -> Timed:
    timed = Timed(submitted_at=time.time())
    timed.output = await engine.generate(request)
    timed.finished_at = time.time()
    return timed


async def _sample_stats(engine: VllmEngine, peaks: dict[str, float], stop: asyncio.Event) -> None:
    """Keep the peaks of running, waiting and KV usage until stop is set."""
    while not stop.is_set():
        stats = engine.stats()
        for key in ("running", "waiting", "kv_used_tokens", "kv_usage"):
            peaks[key] = max(peaks.get(key, 0), getattr(stats, key))
        await asyncio.sleep(STATS_INTERVAL_S)


async def _run_batch(
    engine: VllmEngine, tag: str, n: int, prompt_len: int, max_tokens: int, vocab: int, rng: random.Random
) -> dict[str, Any]:
    """Run n concurrent requests of random token ids; return throughput, TTFT and latency figures."""
    requests = [
        EngineRequest(
            id=f"{tag}-{i}",
            prompt_tokens=prompt_len,
            max_tokens=max_tokens,
            prompt_token_ids=[rng.randrange(3, vocab) for _ in range(prompt_len)],
            ignore_eos=True,
        )
        for i in range(n)
    ]
    peaks: dict[str, float] = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample_stats(engine, peaks, stop))
    preempted_before = engine.stats().preemptions
    start = time.perf_counter()
    results = await asyncio.gather(*(_timed(engine, r) for r in requests))
    wall = time.perf_counter() - start
    stop.set()
    await sampler
    out_tokens = sum(r.output.output_tokens for r in results)
    ttfts = [t for r in results if (t := r.ttft_ms) is not None]
    latencies = [(r.finished_at - r.submitted_at) * 1000.0 for r in results]
    return {
        "requests": n,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "wall_s": round(wall, 3),
        "out_tokens": out_tokens,
        "out_tok_per_s": round(out_tokens / wall),
        "prompt_plus_out_tok_per_s": round((out_tokens + n * prompt_len) / wall),
        "ttft_p50_ms": _percentile(ttfts, 50),
        "ttft_max_ms": _percentile(ttfts, 100),
        "latency_p50_ms": _percentile(latencies, 50),
        "latency_p99_ms": _percentile(latencies, 99),
        "cached_tokens": sum(r.output.cached_tokens for r in results),
        "finish_reasons": sorted({str(r.output.finish_reason) for r in results}),
        "peak_running": peaks.get("running", 0),
        "peak_waiting": peaks.get("waiting", 0),
        "peak_kv_used_tokens": peaks.get("kv_used_tokens", 0),
        "peak_kv_usage": round(peaks.get("kv_usage", 0.0), 4),
        "preemptions": engine.stats().preemptions - preempted_before,
    }


async def _check_abort(engine: VllmEngine) -> dict[str, Any]:
    """Abort a long request after its 5th output; report how its stream ended."""
    request = EngineRequest(
        id="abort-me", prompt_tokens=16, max_tokens=2000, prompt_token_ids=[5] * 16, ignore_eos=True
    )
    last, seen = EngineOutput(), 0
    async for out in engine.stream(request):
        last, seen = out, seen + 1
        if seen == 5:
            await engine.abort(request.id)
    return {
        "finish_reason": last.finish_reason,
        "output_tokens": last.output_tokens,
        "ok": last.finish_reason == "abort",
    }


async def _check_reject(engine: VllmEngine, max_model_len: int) -> dict[str, Any]:
    """Send a prompt as long as the context; vLLM must refuse it (RequestRejected)."""
    n = max_model_len
    request = EngineRequest(id="too-long", prompt_tokens=n, max_tokens=4, prompt_token_ids=[7] * n)
    try:
        await engine.generate(request)
    except RequestRejected as exc:
        return {"ok": True, "reason": str(exc)[:300]}
    return {"ok": False, "reason": "accepted a prompt of max_model_len tokens"}


async def _smoke(args: argparse.Namespace) -> dict[str, Any]:
    engine = VllmEngine(
        args.model,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        backend=_backend(args.backend),
    )
    start = time.perf_counter()
    await engine.start()
    result: dict[str, Any] = {
        "engine_start_s": round(time.perf_counter() - start, 1),
        "engine_args": engine.engine_args(),
        "capacity": asdict(engine.capacity()),
    }
    try:
        vocab = int(read_model_config(resolve_model(args.model)).get("vocab_size") or 32000)
        rng = random.Random(args.seed)
        await _run_batch(engine, "warmup", 8, 64, 16, vocab, rng)
        result["runs"] = []
        for i, (n, prompt_len, max_tokens) in enumerate(_parse_runs(args.runs)):
            run = await _run_batch(engine, f"run{i}", n, prompt_len, max_tokens, vocab, rng)
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
        result["abort"] = await _check_abort(engine)
        result["reject"] = await _check_reject(engine, engine.capacity().max_model_len)
        result["stats_idle"] = asdict(engine.stats())
    finally:
        await engine.shutdown()
    result["ok"] = result["abort"]["ok"] and result["reject"]["ok"]
    result["headline"] = {f"{r['requests']}x{r['prompt_len']}x{r['max_tokens']}": f"{r['out_tok_per_s']} tok/s, "
                          f"TTFT p50 {r['ttft_p50_ms']} ms" for r in result["runs"]}
    return result


@measurement
def smoke(args: argparse.Namespace) -> dict[str, Any]:
    """Start DIO's VllmEngine directly (no Redis) and run concurrent batches, an abort, a rejection."""
    return asyncio.run(_smoke(args))


# --- pytest-gpu -------------------------------------------------------------------------------------


def _junit_counts(path: Path) -> dict[str, int]:
    """Return tests/failures/errors/skipped from a JUnit XML report ({} when unreadable)."""
    try:
        suite = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    if suite is None:
        return {}
    return {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}


@measurement
def pytest_gpu(args: argparse.Namespace) -> dict[str, Any]:
    """Run the adapter tests against the real vLLM: pytest -m gpu tests/test_vllm_engine.py."""
    out = Path(args.out)
    report = out / "pytest-gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/test_vllm_engine.py", "-v", "-rs"]
    cmd += ["-p", "no:cacheprovider", f"--junitxml={report}"]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=PYTEST_TIMEOUT_S)
        code, log = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, log = 124, f"pytest ran past {PYTEST_TIMEOUT_S}s\n{exc.stdout or ''}{exc.stderr or ''}"
    (out / "pytest-gpu.log").write_text(log)
    counts = _junit_counts(report)
    passed = counts.get("tests", 0) - sum(counts.get(k, 0) for k in ("failures", "errors", "skipped"))
    return {
        "returncode": code,
        "passed": passed,
        **counts,
        "ok": code == 0 and passed > 0 and counts.get("skipped", 0) == 0,
        "tail": log.splitlines()[-25:],
    }


# --- shared by the measurements below ---------------------------------------------------------------

STANDIN_STEP_S = 0.01  # dry runs: seconds per output token of the stand-in engines
CHILD_TIMEOUT_S = 300  # one engine driven straight: start + runs
STOP_MARGIN_S = 30  # what stopping the workers may take at the end of a measurement
CALIBRATION_MODEL_S = 120  # one model's calibration (import, engine start, runs), generously


class Interrupted(Exception):
    """device.sh's time limit sent SIGTERM: record what was measured so far, run nothing more."""


def time_left() -> float:
    """Seconds until MEASURE_DEADLINE (set by device.sh); infinite when unset."""
    deadline = os.environ.get("MEASURE_DEADLINE")
    return float(deadline) - time.time() if deadline else math.inf


def _standin_step(args: argparse.Namespace) -> float | None:
    return args.standin_step_s if args.backend == "standin" else None


def _floats(spec: str) -> list[float]:
    return [float(x) for x in spec.split(",") if x.strip()]


def _ints(spec: str) -> list[int]:
    return [int(x) for x in spec.split(",") if x.strip()]


def _vocab(model: str) -> int:
    return int(read_model_config(resolve_model(model)).get("vocab_size") or 32000)


def _client(cluster: GpuCluster) -> Client:
    return Client(redis_url=cluster.redis_url, key_prefix=cluster.key_prefix)


def _checkpoint(args: argparse.Namespace, name: str) -> None:
    """Write what a measurement has so far to <out>/<name>.partial.json (kept if the call is cut short)."""
    (Path(args.out) / f"{name}.partial.json").write_text(json.dumps(args.partial, default=str))


# --- overhead ---------------------------------------------------------------------------------------

OVERHEAD_MAX_NUM_SEQS = 256
OVERHEAD_BATCHED_TOKENS = 8192  # the worker's default (WorkerSettings); the direct engine gets the same
UNLOADED_MAX_OUTPUT = 64  # one-at-a-time requests: Azure prompts, outputs cut to keep them short


def _side(records: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """Throughput and latency of one side of the overhead comparison (times from the burst's start)."""
    done = [r for r in records if r.get("status", "completed") == "completed" and r.get("latency_ms") is not None]
    out_tokens = sum(r["output_tokens"] for r in done)
    latencies = [r["latency_ms"] for r in done]
    return {
        "requests": len(records), "completed": len(done), "wall_s": round(wall_s, 3), "output_tokens": out_tokens,
        "out_tok_per_s": round(out_tokens / wall_s, 1) if wall_s > 0 else None,
        "req_per_s": round(len(done) / wall_s, 2) if wall_s > 0 else None,
        "latency_p50_ms": pct(latencies, 50), "latency_p99_ms": pct(latencies, 99),
        "ttft_p50_ms": pct([r["ttft_ms"] for r in done], 50), "ttft_p99_ms": pct([r["ttft_ms"] for r in done], 99),
        "latencies_ms": latencies,
    }


def _dio_burst_records(cluster: GpuCluster, sent: Sent) -> list[dict[str, Any]]:
    """Per-request records of a burst through DIO: client-observed latency, TTFT from the job hash."""
    results = read_jobs(cluster.redis, cluster.keys, [h.id for h in sent.handles])
    records = []
    for handle, result in zip(sent.handles, results, strict=True):
        done = sent.done_at.get(handle.id)
        first = result.first_token_at if result else None
        records.append({
            "status": result.status.value if result else "lost",
            "output_tokens": (result.output_tokens or 0) if result else 0,
            "latency_ms": None if done is None else round((done - sent.t0) * 1000.0, 2),
            "ttft_ms": None if first is None else round((first - sent.t0) * 1000.0, 2),
        })
    return records


def _delta(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


@measurement
def overhead(args: argparse.Namespace) -> dict[str, Any]:
    """The same requests straight into one vLLM engine and through DIO: throughput ratio, added latency."""
    out, step = Path(args.out), _standin_step(args)
    burst = lengths(azure_conv(args.requests, seed=args.seed))
    one_by_one = [(p, min(o, UNLOADED_MAX_OUTPUT)) for p, o in lengths(azure_conv(args.unloaded, seed=args.seed + 1))]
    engine = {"model": args.model, "gpu_memory_utilization": args.gpu_memory_utilization,
              "max_model_len": args.max_model_len, "max_num_seqs": args.max_num_seqs or OVERHEAD_MAX_NUM_SEQS,
              "max_num_batched_tokens": args.max_num_batched_tokens or OVERHEAD_BATCHED_TOKENS}
    result: dict[str, Any] = args.partial
    result.update({"engine": engine, "trace": "azure-conv, prompt <= 3000, output <= 512 tokens",
                   "burst_requests": len(burst), "one_by_one_requests": len(one_by_one)})

    log(f"overhead: direct engine, burst of {len(burst)} then {len(one_by_one)} one at a time")
    free_before = gpu_free_bytes()
    job = {"task": "overhead", "engine": engine, "tag": "ov", "loaded": burst, "unloaded": one_by_one,
           "standin_step_s": step}
    direct = engine_job(job, out / "work", "overhead-direct", CHILD_TIMEOUT_S)
    result["direct"] = _side(direct["loaded"], direct["loaded_wall_s"])
    result["direct_engine_start_s"] = direct["engine_start_s"]
    result["gpu_release_wait_s"] = wait_gpu_released(free_before)
    log(f"overhead: direct {result['direct']['out_tok_per_s']} tok/s; now through DIO")

    vocab = _vocab(args.model)
    plan = WorkerPlan("vllm-0", engine["gpu_memory_utilization"], args.model, engine["max_model_len"],
                      engine["max_num_seqs"])
    with gpu_cluster("overhead", [plan], out / "logs" / "overhead", standin_step_s=step,
                     max_num_batched_tokens=engine["max_num_batched_tokens"]) as cluster:
        cluster.start_dispatcher("dio", args.predictor)
        with _client(cluster) as client:
            send_burst(client, [request_fields("warmup", i, 64, 16, vocab) for i in range(8)], 120)
            timeout = max(120.0, 4 * direct["loaded_wall_s"] + 60)
            sent = send_burst(client, [request_fields("ov", i, p, o, vocab) for i, (p, o) in enumerate(burst)], timeout)
            wall = max(sent.done_at.values()) - sent.t0 if sent.done_at else math.inf
            result["dio"] = _side(_dio_burst_records(cluster, sent), wall)
            log(f"overhead: DIO {result['dio']['out_tok_per_s']} tok/s; one at a time")
            unloaded = send_one_by_one(client, [request_fields("ov-u", i, p, o, vocab)
                                                for i, (p, o) in enumerate(one_by_one)], 120)
            result["dio_preemptions"] = cluster.worker_counter("preemptions")

    direct_u = [r["latency_ms"] for r in direct["unloaded"]]
    dio_u = [r["latency_ms"] for r in unloaded if r["status"] == "completed"]
    d, o = result["direct"], result["dio"]
    result.update({
        "throughput_ratio": round(o["out_tok_per_s"] / d["out_tok_per_s"], 4) if d["out_tok_per_s"] else None,
        "request_rate_ratio": round(o["req_per_s"] / d["req_per_s"], 4) if d["req_per_s"] else None,
        "added_p50_ms": _delta(d["latency_p50_ms"], o["latency_p50_ms"]),
        "added_p99_ms": _delta(d["latency_p99_ms"], o["latency_p99_ms"]),
        "added_ttft_p50_ms": _delta(d["ttft_p50_ms"], o["ttft_p50_ms"]),
        "direct_preemptions": direct.get("preemptions"),
        "direct_unloaded": direct["unloaded"], "dio_unloaded": unloaded,
    })
    result["direct"]["unloaded_latencies_ms"] = direct_u
    result["dio"]["unloaded_latencies_ms"] = dio_u
    paired = [b["latency_ms"] - a["latency_ms"] for a, b in zip(direct["unloaded"], unloaded, strict=True)
              if b["status"] == "completed"]
    result.update({
        "added_p50_ms_unloaded": _delta(pct(direct_u, 50), pct(dio_u, 50)),
        "added_p99_ms_unloaded": _delta(pct(direct_u, 99), pct(dio_u, 99)),
        "added_p50_ms_unloaded_paired": pct(paired, 50),
    })
    result["headline"] = {side: {k: result[side][k] for k in ("out_tok_per_s", "latency_p50_ms", "latency_p99_ms")}
                          for side in ("direct", "dio")}
    stages = [r["stages_ms"] for r in unloaded if r.get("stages_ms")]
    if stages:  # where DIO's time went, one request at a time (the engine's share included)
        result["dio_unloaded_stages_p50_ms"] = {k: pct([st[k] for st in stages], 50) for k in stages[0]}
    result["targets"] = {"throughput_ratio >= 0.95": (result["throughput_ratio"] or 0) >= 0.95,
                         "added_p50_ms_unloaded <= 5": (result["added_p50_ms_unloaded"] or math.inf) <= 5}
    result["ok"] = d["completed"] == len(burst) and o["completed"] == len(burst) and len(dio_u) == len(one_by_one)
    return result


# --- hetero -----------------------------------------------------------------------------------------

SLO_PROBES = [(p, o) for p in (128, 1024, 3000) for o in (16, 128)] + [(512, 512)]
WARMUP_PER_WORKER = 8  # short requests that warm every engine up once
# Each fresh dispatcher first routes a few requests, so that DIO's predictors (reset between
# policies) have seen a completion per worker: its cold-start probe filter would otherwise hold the
# first run's requests back for one service time.
POLICY_WARMUP_PER_WORKER = 4
WORKER_SIZES = {"kv_capacity_tokens", "max_num_seqs", "kv_bytes_per_token", "weight_bytes"}  # recorded per worker


def _completion_rate(sent: Sent) -> float:
    """Requests/s completed by a burst between its 10th and 90th percentile completion (steady state)."""
    times = sorted(sent.done_at.values())
    if len(times) < 10:
        return len(times) / max(times[-1] - sent.t0, 1e-3) if times else 0.0
    lo, hi = int(0.1 * len(times)), int(0.9 * len(times)) - 1
    return (hi - lo) / max(times[hi] - times[lo], 1e-3)


def _measure_capacity(cluster: GpuCluster, client: Client, args: argparse.Namespace, vocab: int) -> float:
    """Saturate the workers with a burst of Azure requests; return its steady completion rate (req/s)."""
    cap = azure_conv(args.capacity_requests, seed=args.seed + 100)
    log(f"hetero: capacity burst of {len(cap)} requests ({args.capacity_policy})")
    # batch tier: requests held in the dispatcher's backlog wait for as long as the burst takes
    sent = send_burst(client, [{**request_fields("cap", i, r.prompt_tokens, r.output_tokens, vocab), "tier": "batch"}
                               for i, r in enumerate(cap)], 240)
    cancel_unfinished(client, sent)
    cluster.wait_idle()
    args.partial.update({"capacity_policy": args.capacity_policy, "capacity_burst": len(cap),
                         "capacity_completed": len(sent.done_at)})
    return max(_completion_rate(sent), 0.5)


def _unloaded_ms(coef: list[float], prompt: int, output: int) -> float:
    """Latency of a request alone (the fitted linear model), at least 1 ms."""
    return max(coef[0] + coef[1] * prompt + coef[2] * output, 1.0)


def _run_summary(records: list[dict[str, Any]], preemptions: dict[str, int]) -> dict[str, Any]:
    """Latency, TTFT, SLO attainment and outcomes of one replay."""
    done = completed(records)
    statuses = Counter(r["status"] for r in records)
    per_worker = {}
    for worker in sorted({r["worker"] for r in records if r.get("worker")}):
        mine = [r for r in records if r.get("worker") == worker]
        lat = [r["latency_ms"] for r in completed(mine)]
        per_worker[worker] = {"jobs": len(mine), "failed": sum(r["status"] == "failed" for r in mine),
                              "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "preemptions": preemptions.get(worker, 0)}
    return {
        "submitted": len(records), "completed": len(done), "rejected": statuses.get("rejected", 0),
        "failed": statuses.get("failed", 0), "cancelled": statuses.get("cancelled", 0),
        "lost": sum(statuses.get(k, 0) for k in ("lost", "queued", "dispatched", "running")),
        "p50_ms": pct([r["latency_ms"] for r in done], 50), "p90_ms": pct([r["latency_ms"] for r in done], 90),
        "p99_ms": pct([r["latency_ms"] for r in done], 99),
        "ttft_p50_ms": pct([r["ttft_ms"] for r in done], 50), "ttft_p99_ms": pct([r["ttft_ms"] for r in done], 99),
        "slo_attainment": round(sum(bool(r.get("met_slo")) for r in records) / len(records), 4) if records else None,
        "preemptions": sum(preemptions.values()), "per_worker": per_worker,
        "reasons": dict(Counter((r.get("reason") or "")[:100] for r in records
                                if r["status"] in ("rejected", "failed"))),
    }


def _replay(cluster: GpuCluster, client: Client, args: argparse.Namespace, policy: str, load: float,
            capacity: float, coef: list[float], vocab: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Replay an Azure window open loop at ``load`` x capacity; return the run's summary and records."""
    rate = load * capacity
    n = min(max(round(rate * args.run_seconds), args.run_min), args.run_max)
    trace = rescale_arrivals(azure_conv(n, seed=args.seed + 7), rate)
    tag = f"h-{policy}-{round(load * 100)}"
    # Every request carries its SLO as deadline_ms: DIO routes by it (and sheds what it predicts
    # late); the baselines ignore it. Attainment is judged on the same deadlines for all.
    deadlines = [args.slo_k * _unloaded_ms(coef, r.prompt_tokens, r.output_tokens) for r in trace]
    fields = [{**request_fields(tag, i, r.prompt_tokens, r.output_tokens, vocab), "deadline_ms": round(dl, 1)}
              for i, (r, dl) in enumerate(zip(trace, deadlines, strict=True))]
    before = cluster.worker_counter("preemptions")
    log(f"hetero: {policy} at {load:.0%}: {n} requests at {rate:.1f} req/s ({trace[-1].arrival_s:.1f} s)")
    start = time.monotonic()
    sent = send_open_loop(client, [r.arrival_s for r in trace], fields, args.drain_s)
    timed_out = cancel_unfinished(client, sent)
    idle = cluster.wait_idle()
    after = cluster.worker_counter("preemptions")
    results = read_jobs(cluster.redis, cluster.keys, [h.id for h in sent.handles])
    records = []
    for handle, result, deadline in zip(sent.handles, results, deadlines, strict=True):
        record = job_record(result, handle.id)
        met = record["status"] == "completed" and record["latency_ms"] is not None and record["latency_ms"] <= deadline
        records.append({**record, "policy": policy, "load": load, "deadline_ms": round(deadline, 1), "met_slo": met})
    run = {"policy": policy, "load": load, "offered_rps": round(rate, 2), "requests": n,
           "arrival_span_s": round(trace[-1].arrival_s, 2), "wall_s": round(time.monotonic() - start, 1),
           "timed_out_cancelled": timed_out, "idle_after": idle,
           **_run_summary(records, {w: after[w] - before.get(w, 0) for w in after})}
    log(f"hetero: {policy} at {load:.0%}: p99 {run['p99_ms']} ms, SLO {run['slo_attainment']}, failed "
        f"{run['failed']}, rejected {run['rejected']}, preemptions {run['preemptions']}")
    return run, records


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@measurement
def hetero(args: argparse.Namespace) -> dict[str, Any]:
    """Three vLLM workers with different KV budgets on one GPU: each policy at 70% and 90% of capacity."""
    out, step = Path(args.out), _standin_step(args)
    plans = [WorkerPlan(f"vllm-{round(u * 100):02d}", u, args.model, args.max_model_len, args.hetero_max_num_seqs)
             for u in _floats(args.hetero_utilizations)]
    policies, loads, vocab = args.policies.split(","), _floats(args.loads), _vocab(args.model)
    run_s = args.run_seconds + args.drain_s + 15  # the longest a run may take, settling included
    result: dict[str, Any] = args.partial
    result.update({"model": args.model, "policies": policies, "loads": loads, "slo_k": args.slo_k, "runs": [],
                   "skipped": []})
    records: list[dict[str, Any]] = []
    with gpu_cluster("hetero", plans, out / "logs" / "hetero", standin_step_s=step) as cluster:
        result["workers"] = {p.id: {"gpu_memory_utilization": p.gpu_memory_utilization,
                                    **cluster.worker_info(p.id).model_dump(include=WORKER_SIZES)}
                             for p in plans}
        result["worker_kv_tokens"] = {w: v["kv_capacity_tokens"] for w, v in result["workers"].items()}
        with _client(cluster) as client:
            cluster.start_dispatcher(args.capacity_policy, args.predictor)
            send_burst(client, [request_fields("warmup", i, 64, 16, vocab)
                                for i in range(WARMUP_PER_WORKER * len(plans))], 120)
            probes = send_one_by_one(client, [request_fields("slo", i, p, o, vocab)
                                              for i, (p, o) in enumerate(SLO_PROBES)], 120)
            coef = fit_linear([(t["prompt_tokens"], t["output_tokens"], t["latency_ms"]) for t in probes])
            result["unloaded_probes"] = probes
            result["unloaded_model_ms"] = {"intercept": round(coef[0], 2), "per_prompt_token": round(coef[1], 5),
                                           "per_output_token": round(coef[2], 4),
                                           "note": "latency alone through DIO; the workers differ only in KV budget"}
            capacity = args.capacity_rps or _measure_capacity(cluster, client, args, vocab)
            result.update({"capacity_rps": round(capacity, 2), "capacity_given": bool(args.capacity_rps)})
            log(f"hetero: capacity {capacity:.1f} req/s")
            _checkpoint(args, "hetero")
            warmup = [(p, min(o, UNLOADED_MAX_OUTPUT)) for p, o in
                      lengths(azure_conv(POLICY_WARMUP_PER_WORKER * len(plans), seed=args.seed + 200))]
            result["policy_warmup"] = (f"{len(warmup)} requests (Azure prompts, <= {UNLOADED_MAX_OUTPUT} new tokens) "
                                       "through each fresh dispatcher before its runs, not counted")
            for policy in policies:
                if time_left() < run_s + STOP_MARGIN_S:
                    result["skipped"] += [{"policy": policy, "load": load, "why": "time limit"} for load in loads]
                    continue
                cluster.start_dispatcher(policy, args.predictor)
                send_burst(client, [request_fields(f"w-{policy}", i, p, o, vocab)
                                    for i, (p, o) in enumerate(warmup)], 120)
                for load in loads:
                    if time_left() < run_s + STOP_MARGIN_S:
                        result["skipped"].append({"policy": policy, "load": load, "why": "time limit"})
                        continue
                    run, run_records = _replay(cluster, client, args, policy, load, capacity, coef, vocab)
                    result["runs"].append(run)
                    records += run_records
                    _write_records(out / "hetero-records.jsonl", records)
                    _checkpoint(args, "hetero")
    result["predictor_real"] = _predictor_report(records, result["workers"])
    result["headline"] = {f"{r['policy']}@{r['load']}": f"p99 {r['p99_ms']} ms, TTFT p99 {r['ttft_p99_ms']} ms, "
                          f"SLO {r['slo_attainment']}, failed {r['failed']}, rejected {r['rejected']}, "
                          f"preempted {r['preemptions']}" for r in result["runs"]}
    failed = sum(r["failed"] for r in result["runs"])
    result["ok"] = bool(result["runs"]) and not result["skipped"] and failed == 0
    return result


# --- predictor-real ---------------------------------------------------------------------------------


def _load_units(workers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each worker's load unit as the dispatcher computes it: weight bytes / KV bytes per token."""
    return {w: v["weight_bytes"] / v["kv_bytes_per_token"] for w, v in workers.items()
            if v.get("weight_bytes") and v.get("kv_bytes_per_token")}


def _predictor_report(records: list[dict[str, Any]], workers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Replay the predictors on the dio runs (the dispatcher's own sequence), and on each policy's runs."""
    units = _load_units(workers)
    policies = list(dict.fromkeys(r["policy"] for r in records))
    dio_runs = [r for r in records if r["policy"] == "dio"]
    report_ = {"source": "dio runs" if dio_runs else "all runs", **evaluate(dio_runs or records, units)}
    report_["by_policy"] = {
        policy: {kind: {k: v[k] for k in ("completions_to_50ms", "median_abs_error_ms", "median_relative_error")}
                 for kind, v in evaluate([r for r in records if r["policy"] == policy], units).items()
                 if isinstance(v, dict)}
        for policy in policies
    }
    return report_


@measurement
def predictor_real(args: argparse.Namespace) -> dict[str, Any]:
    """Replay seed/vector/rls on hetero's per-request records (hetero-records.jsonl in --out)."""
    path = Path(args.records or Path(args.out) / "hetero-records.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    hetero_json = Path(args.out) / "hetero.json"
    workers = json.loads(hetero_json.read_text()).get("workers", {}) if hetero_json.exists() else {}
    result = {"records": str(path), "requests": len(records), **_predictor_report(records, workers)}
    result["headline"] = {f"{kind}_completions_to_50ms": result[kind]["completions_to_50ms"]
                          for kind in ("seed", "vector", "rls")}
    result["ok"] = bool(completed(records))
    return result


# --- calibration ------------------------------------------------------------------------------------



def _calibrate_model(args: argparse.Namespace, model: str, max_model_len: int) -> dict[str, Any]:
    """Measure one model's prefill and decode times in an engine child process."""
    batches = _ints(args.calib_batches)
    job = {"task": "calibration", "standin_step_s": _standin_step(args),
           "engine": {"model": model, "gpu_memory_utilization": args.calib_gpu_memory_utilization,
                      "max_model_len": max_model_len, "max_num_seqs": max(batches),
                      "max_num_batched_tokens": args.calib_batched_tokens},
           "prefill_tokens": [p for p in _ints(args.calib_prompts) if p < max_model_len],
           "repeats": args.calib_repeats, "decode_batches": batches,
           "decode_prompt": CALIBRATION_DECODE[0], "decode_tokens": CALIBRATION_DECODE[1]}
    # tiny-llama-1b declares a 4096-token context: vLLM accepts a longer one only when told to.
    env = {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}
    free = gpu_free_bytes()
    try:
        return engine_job(job, Path(args.out) / "work", f"calibration-{model}", CHILD_TIMEOUT_S, env)
    finally:
        wait_gpu_released(free)


@measurement
def calibration(args: argparse.Namespace) -> dict[str, Any]:
    """Prefill time vs prompt length and decode step vs batch of each model; fit the simulator's H100."""
    result: dict[str, Any] = args.partial
    result["models"] = {}
    points: list[Point] = []
    for model in args.calib_models.split(","):
        native = int(read_model_config(resolve_model(model)).get("max_position_embeddings") or 4096)
        if time_left() < CALIBRATION_MODEL_S:
            result["models"][model] = {"error": "skipped: time limit"}
            continue
        log(f"calibration: {model}")
        try:
            measured = _calibrate_model(args, model, args.calib_max_model_len)
        except (RuntimeError, TimeoutError) as exc:
            if native >= args.calib_max_model_len:
                result["models"][model] = {"error": str(exc)}
                continue
            log(f"calibration: {model} failed at max_model_len {args.calib_max_model_len} ({exc}); "
                f"again at its own {native}")
            measured = _calibrate_model(args, model, native)
        result["models"][model] = measured
        points += measured_points(model, measured, args.calib_batched_tokens)
        _checkpoint(args, "calibration")
    if not points:
        raise RuntimeError("no model could be measured")
    fit = calibrate(points)
    result.update({"fit": fit, "sim_error_max": fit["sim_error_max"],
                   "ok": all("error" not in m for m in result["models"].values())})
    result["headline"] = {k: fit[k] for k in ("fitted", "error_before", "error_after")}
    log(f"calibration: error max {fit['error_before']['max']} -> {fit['sim_error_max']}, fitted {fit['fitted']}")
    return result


# --- summary ----------------------------------------------------------------------------------------


@measurement
def summary(args: argparse.Namespace) -> dict[str, Any]:
    """The headline numbers of the measurements whose JSON is in --out (report.summary)."""
    data = report.summary(Path(args.out))
    return {**data, "ok": bool(data["sources"])}


# --- driver -----------------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict[str, Any]:
    """Describe the machine without importing torch or vLLM (no CUDA context in this process)."""
    memory = nvml.gpu_memory()
    return {
        "gpu": nvml.gpu_name(),
        "gpu_total_bytes": memory[1] if memory else None,
        "python": platform.python_version(),
        "host": platform.node(),
        "versions": {p: _version(p) for p in ("vllm", "torch", "transformers", "redis", "pydantic")},
        "vllm_env": {k: v for k, v in os.environ.items() if k.startswith("VLLM_")},
        "enforce_eager": eager_from_env(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m dio.ops.gpu.measure", description=__doc__.split("\n")[0])
    parser.add_argument("measurements", nargs="+", choices=sorted(MEASUREMENTS), metavar="MEASUREMENT")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-out"), help="folder for JSON and logs")
    parser.add_argument("--backend", choices=("vllm", "standin"), default="vllm", help="standin: dry run")
    parser.add_argument("--model", default="tiny-llama-1b", help="bundled model name or folder")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=None)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="requests x prompt x output tokens, comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--standin-step-s", type=float, default=STANDIN_STEP_S, help="stand-in: seconds per token")
    parser.add_argument("--predictor", default=None, help="dispatchers' predictor (default: theirs)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="engines with CUDA graphs and torch.compile (enforce_eager=False): slower start, "
                             "faster and steadier steps; sets DIO_ENFORCE_EAGER=false for every engine")
    group = parser.add_argument_group("overhead")
    group.add_argument("--requests", type=int, default=400, help="burst size (Azure conversation lengths)")
    group.add_argument("--unloaded", type=int, default=20, help="requests sent one at a time")
    group = parser.add_argument_group("hetero")
    group.add_argument("--hetero-utilizations", default="0.40,0.20,0.10", help="one vLLM worker per share")
    group.add_argument("--hetero-max-num-seqs", type=int, default=128)
    group.add_argument("--policies", default="dio,round-robin,least-loaded")
    group.add_argument("--loads", default="0.7,0.9", help="offered load, fractions of the measured capacity")
    group.add_argument("--capacity-requests", type=int, default=600, help="saturation burst size")
    group.add_argument("--capacity-policy", default="least-loaded", help="the policy of the saturation burst")
    group.add_argument("--capacity-rps", type=float, default=None, help="skip the burst: use this capacity")
    group.add_argument("--run-seconds", type=float, default=15.0, help="arrival span of one replay")
    group.add_argument("--run-min", type=int, default=150, help="fewest requests of one replay")
    group.add_argument("--run-max", type=int, default=600, help="most requests of one replay")
    group.add_argument("--drain-s", type=float, default=25.0, help="wait after the last arrival, then cancel")
    group.add_argument("--slo-k", type=float, default=5.0, help="deadline = k x the request's unloaded latency")
    group.add_argument("--records", default=None, help="predictor-real: records (default <out>/hetero-records.jsonl)")
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib-models", default="tiny-llama-1b,llama-3.2-3b")
    group.add_argument("--calib-prompts", default="128,256,512,1024,2048,4096,8192")
    group.add_argument("--calib-batches", default="1,2,4,8,16,32,64,128,256")
    group.add_argument("--calib-repeats", type=int, default=3)
    group.add_argument("--calib-max-model-len", type=int, default=8448)
    group.add_argument("--calib-batched-tokens", type=int, default=16384, help="one chunk for an 8k prompt")
    group.add_argument("--calib-gpu-memory-utilization", type=float, default=0.5)
    return parser.parse_args(argv)


BRIEF_LIST_ITEMS = 12  # the RESULT line shows longer lists as their length
BRIEF_LEFT_OUT = ("environment", "traceback", "tail", "engine_args")


def _brief(value: Any) -> Any:
    """Shrink a result for its RESULT line: long lists become "<n items>"."""
    if isinstance(value, dict):
        return {k: _brief(v) for k, v in value.items() if k not in BRIEF_LEFT_OUT}
    if isinstance(value, list):
        return f"<{len(value)} items>" if len(value) > BRIEF_LIST_ITEMS else [_brief(v) for v in value]
    return value


def _headline(record: dict[str, Any]) -> dict[str, Any]:
    """The RESULT line: the record's top-level numbers and words, and its ``headline`` if it has one."""
    scalars = {k: v for k, v in record.items() if not isinstance(v, dict | list) and k not in BRIEF_LEFT_OUT}
    return {**scalars, **record.get("headline", {})}


def run_one(name: str, args: argparse.Namespace, env: dict[str, Any]) -> bool:
    """Run one measurement, write <out>/<name>.json (and a PNG), print its RESULT line; return whether it passed.

    A measurement may fill ``args.partial`` as it goes: if it fails, what it measured is kept.
    """
    start = time.perf_counter()
    args.partial = {}
    interrupted = None
    try:
        result = MEASUREMENTS[name](args)
    except Exception as exc:  # recorded in the JSON; the next measurement still runs
        interrupted = exc if isinstance(exc, Interrupted) else None
        result = {**args.partial, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()}
    record = {"measurement": name, "wall_s": round(time.perf_counter() - start, 1), "environment": env, **result}
    out = Path(args.out)
    record["png"] = report.plot(name, record, out)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2, default=str))
    print(f"DETAIL {name} " + json.dumps(_brief(record), default=str), flush=True)
    print(f"RESULT {name} " + json.dumps(_headline(record), default=str), flush=True)
    if interrupted is not None:
        raise interrupted
    return bool(result.get("ok"))


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signum} (device.sh's time limit?)")


def main(argv: list[str] | None = None) -> int:
    """Run the named measurements in order; exit 1 when any of them failed."""
    args = parse_args(argv)
    if args.cuda_graphs:  # read by the worker processes (WorkerSettings) and dio.ops.gpu.direct
        os.environ["DIO_ENFORCE_EAGER"] = "false"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _interrupt)
    env = environment()
    outcomes = []
    try:
        for name in args.measurements:
            log(f"measurement {name} (time left: {time_left():.0f} s)")
            outcomes.append(run_one(name, args, env))
    except Interrupted:
        return 124
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
