"""Measurements on the GPU machine; each writes ``<name>.json`` to ``--out`` and prints a RESULT line.

On the device, ``ops/gpu/device.sh`` installs vLLM, starts Redis, sets the environment and runs
``python -m ops.gpu.measure <name>... --out $OUT``. Here, the same driver runs against the CPU
stand-in of vLLM (a dry run of the code path, no numbers worth keeping)::

    python -m ops.gpu.measure smoke --backend standin --out /tmp/gpu-dry

Measurements:
    smoke       start DIO's VllmEngine (no Redis), run concurrent batches, an abort and a rejected
                prompt; report capacity, live stats, throughput and TTFT.
    pytest-gpu  run ``pytest -m gpu tests/test_vllm_engine.py`` (the adapter tests on the real vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from gpu_worker import nvml
from gpu_worker.engine import EngineOutput, EngineRequest, RequestRejected
from gpu_worker.vllm_engine import VllmBackend, VllmEngine, read_model_config, resolve_model

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
    sys.path.insert(0, str(REPO / "tests"))
    from vllm_standin import StandinBackend

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
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ops.gpu.measure", description=__doc__.split("\n")[0])
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
    return parser.parse_args(argv)


def run_one(name: str, args: argparse.Namespace, env: dict[str, Any]) -> bool:
    """Run one measurement, write <out>/<name>.json, print its RESULT line; return whether it passed."""
    start = time.perf_counter()
    try:
        result = MEASUREMENTS[name](args)
    except Exception as exc:  # recorded in the JSON; the next measurement still runs
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    record = {"measurement": name, "wall_s": round(time.perf_counter() - start, 1), "environment": env, **result}
    path = Path(args.out) / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=str))
    brief = {k: v for k, v in record.items() if k not in ("environment", "traceback", "tail", "engine_args")}
    print(f"RESULT {name} " + json.dumps(brief, default=str), flush=True)
    return bool(result.get("ok"))


def main(argv: list[str] | None = None) -> int:
    """Run the named measurements in order; exit 1 when any of them failed."""
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = environment()
    outcomes = [run_one(name, args, env) for name in args.measurements]
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
