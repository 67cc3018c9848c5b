"""Does batch work fill idle capacity? Interactive TTFT with and without a big batch on the same cluster.

Two runs, each on a fresh simulated cluster (dispatcher, workers, one ``dio batch-runner``, as
``dio up`` runs them), replay the same interactive trace open loop at ``load`` × the cluster's
estimated capacity:

* **alone**: nothing else runs;
* **with batch**: a ``batch_lines``-line Batch API batch is submitted first (``Client.submit_batch``;
  the runner sends it at tier ``batch``, pacing itself to the cluster's idle capacity:
  ``dio.client.batch_pacing``) and runs all along;
* **with batch, greedy** (``compare_greedy``): the same with the runner's pacing off (``--greedy``:
  ``concurrency`` requests in flight all along), to show what the pacing buys.

It reports the interactive TTFT (p50, p90, p99; simulated ms) of both runs and how much worse the
second is (the target: p99 at most 10% worse), and how the batch progressed while the interactive
requests ran (lines answered per simulated second: no starvation when that stays above zero).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dio.client import Client
from dio.client.batches import BatchHandle, cancel_batch
from dio.ops.bench.cluster_run import RunConfig, delete_prefix
from dio.ops.bench.report import payload, save, status
from dio.ops.capacity import capacity_rps
from dio.ops.demo import load_demo_trace
from dio.ops.local_cluster import LocalCluster, parse_workers
from dio.ops.openloop import Outcome, collect, request_fields, submit_on_schedule, to_outcome
from dio.ops.redis_server import ensure_redis
from dio.ops.traces import Trace, rescale_arrivals
from dio.protocol.batches import BatchStatus
from dio.protocol.settings import CommonSettings

MODES = ("alone", "with_batch", "with_batch_greedy")
TARGET_WORSE = 0.10  # the bound: interactive TTFT p99 at most 10% worse with the batch running
BATCH_WARMUP_WALL_S = 3.0  # the batch runs this long before the interactive trace starts


@dataclass
class InterferenceConfig:
    workers: str = "H100:1,A100-40GB:1,L4:1,T4:1"
    trace: str = "azure-conv"
    requests: int = 1000  # interactive requests
    load: float = 0.5  # their rate, as a fraction of the cluster's estimated capacity
    batch_lines: int = 10_000
    batch_prompt_tokens: int = 512  # each batch line's prompt (text of about this many tokens)...
    batch_max_tokens: int = 128  # ...and its output
    concurrency: int = 256  # the batch runner's requests in flight, at most
    min_in_flight: int = 2  # ...and while interactive work arrives
    compare_greedy: bool = True  # also run the batch without pacing
    repeats: int = 2  # runs of each mode, interleaved; the percentiles pool their requests
    time_scale: float = 2.0
    drain_wall_s: float = 60.0
    seed: int = 0
    out_dir: Path | None = None
    name: str = "batch-interference"
    env: dict[str, str] = field(default_factory=dict)


def batch_lines(config: InterferenceConfig) -> str:
    """The batch file: ``batch_lines`` completions requests of the configured size."""
    import json

    prompt = ("lorem ipsum dolor sit " * (config.batch_prompt_tokens // 5 + 1))[:config.batch_prompt_tokens * 4]
    body = {"prompt": prompt, "max_tokens": config.batch_max_tokens}
    return "".join(json.dumps({"custom_id": f"bg-{i}", "method": "POST", "url": "/v1/completions",
                               "body": body}) + "\n" for i in range(config.batch_lines))


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p90": round(float(np.percentile(arr, 90)), 1),
            "p99": round(float(np.percentile(arr, 99)), 1), "mean": round(float(arr.mean()), 1)}


def interactive_figures(outcomes: list[Outcome]) -> dict[str, Any]:
    ttfts = [o.ttft_ms for o in outcomes if o.ttft_ms is not None]
    latencies = [o.latency_ms for o in outcomes if o.latency_ms is not None]
    by_status: dict[str, int] = {}
    for o in outcomes:
        by_status[o.status] = by_status.get(o.status, 0) + 1
    return {"statuses": by_status, "ttft_ms": percentiles(ttfts), "latency_ms": percentiles(latencies),
            "_ttfts": ttfts, "_latencies": latencies}


def run_once(redis_url: str, config: InterferenceConfig, trace: Trace, with_batch: bool,
             batch_file: Path, greedy: bool = False) -> dict[str, Any]:
    """One run on a fresh cluster: the interactive trace, with or without the batch running."""
    run = RunConfig(workers=parse_workers(config.workers), time_scale=config.time_scale, seed=config.seed)
    prefix = f"{{dio-bench-{uuid.uuid4().hex[:8]}}}:"
    cluster = LocalCluster(redis_url, run.workers, key_prefix=prefix, time_scale=config.time_scale,
                           extra_env={**run.env(), **config.env}, one_worker_process=True, batch_runner=True,
                           batch_runner_args=["--concurrency", str(config.concurrency), "--min-in-flight",
                                              str(config.min_in_flight), *(["--greedy"] if greedy else [])])
    cluster.start()
    try:
        with Client(redis_url=redis_url, key_prefix=prefix) as client:
            return _measure(client, config, trace, with_batch, batch_file)
    finally:
        cluster.stop()
        delete_prefix(redis_url, prefix)


def _measure(client: Client, config: InterferenceConfig, trace: Trace, with_batch: bool,
             batch_file: Path) -> dict[str, Any]:
    handle: BatchHandle | None = None
    if with_batch:
        handle = client.submit_batch(batch_file)
        _wait_running(handle)
        time.sleep(BATCH_WARMUP_WALL_S)
    before = _answered(handle)
    started = time.monotonic()

    def fields(i: int, request: Any) -> dict:
        return request_fields(request, i, "llama-3.2-3b")

    handles = submit_on_schedule(client, trace, config.time_scale, fields)
    results = collect(client, handles, config.drain_wall_s)
    window_wall_s = time.monotonic() - started
    after = _answered(handle)
    outcomes = [to_outcome(r, config.time_scale) for r in results]
    figures: dict[str, Any] = {"interactive": interactive_figures(outcomes),
                               "window_wall_s": round(window_wall_s, 2),
                               "window_sim_s": round(window_wall_s * config.time_scale, 1)}
    if handle is not None:
        answered = after - before
        figures["batch"] = {"answered_before_window": before, "answered_in_window": answered,
                            "lines_per_sim_s_in_window": round(answered / (window_wall_s * config.time_scale), 2),
                            "status_after_window": handle.refresh().status.value,
                            "failed": handle.batch.request_counts.failed}
        if not handle.batch.status.terminal:
            cancel_batch(client, handle.id)  # the rest is not measured
    return figures


def _wait_running(handle: BatchHandle, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while handle.refresh().status is BatchStatus.validating:
        if time.monotonic() >= deadline:
            raise RuntimeError("the batch runner did not start the batch")
        time.sleep(0.1)


def _answered(handle: BatchHandle | None) -> int:
    if handle is None:
        return 0
    counts = handle.progress()
    return counts.completed + counts.failed


def run_interference(config: InterferenceConfig) -> dict[str, Any]:
    """Run both configurations, save ``<name>.json`` and return the summary."""
    import tempfile

    specs = parse_workers(config.workers)
    trace = load_demo_trace(config.trace, config.requests, config.seed)
    offered = config.load * capacity_rps(specs, "llama-3.2-3b", trace)
    trace = rescale_arrivals(trace, offered)
    with ensure_redis(CommonSettings().redis_url) as server, tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.jsonl"
        batch_file.write_text(batch_lines(config))
        modes = [m for m in MODES if config.compare_greedy or m != "with_batch_greedy"]
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for repeat in range(config.repeats):  # interleaved, so a slow spell of the machine hits every mode
            for mode in modes:
                status.print(f"repeat {repeat + 1}/{config.repeats}, {mode}: {config.requests} interactive requests "
                             f"at {config.load:.0%} of capacity" + ("" if mode == "alone" else
                                                                   f", a {config.batch_lines}-line batch beside them"))
                runs[mode].append(run_once(server.url, config, trace, mode != "alone", batch_file,
                                           greedy=mode == "with_batch_greedy"))
    pooled = {mode: pool(mode_runs) for mode, mode_runs in runs.items()}
    alone, mixed, greedy = pooled["alone"], pooled["with_batch"], pooled.get("with_batch_greedy")
    summary = _summary(config, offered, alone, mixed, greedy)
    path = save(config.name, payload("batch-interference", summary), config.out_dir)
    status.print(f"saved {path}")
    _print(summary)
    return summary


def pool(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's repeats: TTFT and latency percentiles over every request of every repeat, and each repeat's."""
    ttfts = [t for run in runs for t in run["interactive"].pop("_ttfts")]
    latencies = [t for run in runs for t in run["interactive"].pop("_latencies")]
    statuses: dict[str, int] = {}
    for run in runs:
        for name, n in run["interactive"]["statuses"].items():
            statuses[name] = statuses.get(name, 0) + n
    out: dict[str, Any] = {"interactive": {"statuses": statuses, "ttft_ms": percentiles(ttfts),
                                           "latency_ms": percentiles(latencies)},
                           "repeats": runs}
    batches = [run["batch"] for run in runs if "batch" in run]
    if batches:
        window_sim_s = sum(run["window_sim_s"] for run in runs)
        answered = sum(b["answered_in_window"] for b in batches)
        out["batch"] = {"answered_in_window": answered, "window_sim_s": round(window_sim_s, 1),
                        "lines_per_sim_s_in_window": round(answered / window_sim_s, 2) if window_sim_s else None,
                        "failed": sum(b["failed"] for b in batches),
                        "every_repeat_progressed": all(b["answered_in_window"] > 0 for b in batches)}
    return out


def _worse(alone: dict, other: dict | None) -> float | None:
    if other is None:
        return None
    p99_alone, p99_other = alone["interactive"]["ttft_ms"]["p99"], other["interactive"]["ttft_ms"]["p99"]
    return None if not p99_alone or p99_other is None else round(p99_other / p99_alone - 1.0, 4)


def _summary(config: InterferenceConfig, offered: float, alone: dict, mixed: dict,
             greedy: dict | None) -> dict[str, Any]:
    worse = _worse(alone, mixed)
    batch = mixed.get("batch", {})
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        "offered_rps_sim": round(offered, 3),
        "unit": "simulated ms (wall ms x time_scale)",
        "alone": alone, "with_batch": mixed, "with_batch_greedy": greedy,
        "ttft_p99_worse": worse, "ttft_p99_worse_greedy": _worse(alone, greedy), "target_worse": TARGET_WORSE,
        "meets_target": worse is not None and worse <= TARGET_WORSE,
        "batch_progressed": bool(batch.get("every_repeat_progressed")),
    }


def _print(summary: dict[str, Any]) -> None:
    for name in ("alone", "with_batch", "with_batch_greedy"):
        run = summary[name]
        if run is None:
            continue
        t = run["interactive"]["ttft_ms"]
        status.print(f"{name:<17} TTFT p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} ms; "
                     f"{run['interactive']['statuses']}")
    for name, worse_key in (("with_batch", "ttft_p99_worse"), ("with_batch_greedy", "ttft_p99_worse_greedy")):
        if summary[name] is None:
            continue
        batch = summary[name].get("batch", {})
        status.print(f"{name}: TTFT p99 {summary[worse_key]:+.1%} (target ≤ +{TARGET_WORSE:.0%}); the batch "
                     f"answered {batch.get('answered_in_window')} lines meanwhile "
                     f"({batch.get('lines_per_sim_s_in_window')}/sim s)")
