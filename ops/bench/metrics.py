"""The figures of one run, from what the client saw (pure: no I/O).

Latencies are simulated milliseconds. Percentiles describe the completed requests; SLO attainment
and goodput count every submitted request, so one that was rejected, failed or never finished
misses its SLO. Goodput is the output tokens per simulated second of the requests that met their
SLO, over the run's makespan (first submission to last result).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from dio.ops.bench.cluster_run import RunRecord
from dio.ops.openloop import LOST, Outcome
from dio.ops.stats import goodput, percentile, reason_key, slo_attained

STATUSES = ("completed", "rejected", "failed", "cancelled", LOST)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


def counts(outcomes: list[Outcome]) -> dict[str, int]:
    """Return how many requests ended in each status, plus rejections that carried a retry-after."""
    by_status = Counter(o.status for o in outcomes)
    out = {status: by_status.get(status, 0) for status in STATUSES}
    out["submitted"] = len(outcomes)
    out["rejected_with_retry_after"] = sum(1 for o in outcomes if o.status == "rejected" and o.retry_after_s)
    return out


def latency_figures(outcomes: list[Outcome]) -> dict[str, float | None]:
    """Return p50/p90/p99 of latency and TTFT over the completed requests (simulated ms)."""
    latencies = [o.latency_ms for o in outcomes]
    ttfts = [o.ttft_ms for o in outcomes]
    out: dict[str, float | None] = {}
    for q in (50, 90, 99):
        out[f"p{q}_ms"] = _round(percentile(latencies, q))
    for q in (50, 90, 99):
        out[f"ttft_p{q}_ms"] = _round(percentile(ttfts, q))
    return out


def slo_figures(outcomes: list[Outcome], deadlines_ms: list[float], span_s: float) -> dict[str, float | None]:
    """Return SLO attainment and goodput (output tokens/s of requests that met their SLO)."""
    latencies = [o.latency_ms for o in outcomes]
    tokens = [o.output_tokens if o.status == "completed" else 0 for o in outcomes]
    return {
        "slo_attainment": _round(slo_attained(latencies, deadlines_ms), 4),
        "goodput_tok_s": _round(goodput(tokens, latencies, deadlines_ms, span_s) if span_s > 0 else 0.0),
        "throughput_tok_s": _round(sum(tokens) / span_s if span_s > 0 else 0.0),
    }


def worker_figures(record: RunRecord, time_scale: float) -> dict[str, dict[str, Any]]:
    """Return per worker: GPU, share of the jobs, failures, latency, predictor error (simulated ms)."""
    routed = [o for o in record.outcomes if o.worker]
    total = max(len(routed), 1)
    out = {}
    for worker_id, gpu in record.worker_gpus.items():
        mine = [o for o in routed if o.worker == worker_id]
        latencies = [o.latency_ms for o in mine]
        pred = record.predictors.get(worker_id, {})
        error = pred.get("error_p50_ms")
        out[worker_id] = {
            "gpu": gpu, "jobs": len(mine), "share": round(len(mine) / total, 4),
            "failed": sum(1 for o in mine if o.status == "failed"),
            "p50_ms": _round(percentile(latencies, 50)), "p99_ms": _round(percentile(latencies, 99)),
            "predictor_error_p50_ms": _round(None if error is None else error * time_scale),
            "predictor_seen": int(pred.get("seen", 0)),
        }
    return out


def gpu_shares(workers: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Return the share of the routed jobs each GPU type received."""
    shares: Counter[str] = Counter()
    for w in workers.values():
        shares[w["gpu"]] += w["share"]
    return {gpu: round(share, 4) for gpu, share in shares.items()}


def predictor_error_ms(workers: dict[str, dict[str, Any]]) -> float | None:
    """Return the completions-weighted mean of the workers' median |error| (simulated ms)."""
    pairs = [(w["predictor_error_p50_ms"], w["predictor_seen"]) for w in workers.values()
             if w["predictor_error_p50_ms"] is not None and w["predictor_seen"]]
    if not pairs:
        return None
    errors, weights = zip(*pairs, strict=True)
    return _round(float(np.average(errors, weights=weights)))


def summarize_run(record: RunRecord, deadlines_ms: list[float], time_scale: float) -> dict[str, Any]:
    """Return every figure of one run (the per-policy, per-load entry of a result file)."""
    span_s = record.wall_s * time_scale
    workers = worker_figures(record, time_scale)
    outcomes = record.outcomes
    return {
        **counts(outcomes),
        **latency_figures(outcomes),
        **slo_figures(outcomes, deadlines_ms, span_s),
        "rejected_reasons": dict(Counter(reason_key(o.reason) for o in outcomes if o.status == "rejected")),
        "failed_errors": dict(Counter(reason_key(o.reason) for o in outcomes if o.status == "failed")),
        "predictor_error_ms": predictor_error_ms(workers),
        "gpu_share": gpu_shares(workers),
        "workers": workers,
        "makespan_s": round(span_s, 2),
        "wall_s": round(record.wall_s, 2),
        "cpu_cores": record.cpu,
        "cluster_overhead_s": record.overhead_s,
    }


def latency_cdf(outcomes: list[Outcome], points: int = 200) -> dict[str, list[float]]:
    """Return a compact latency CDF of the completed requests: quantile levels and latencies."""
    done = np.sort([o.latency_ms for o in outcomes if o.latency_ms is not None])
    if done.size == 0:
        return {"q": [], "ms": []}
    levels = np.linspace(0.0, 1.0, min(points, done.size))
    return {"q": [round(float(q), 4) for q in levels],
            "ms": [round(float(v), 1) for v in np.quantile(done, levels)]}
