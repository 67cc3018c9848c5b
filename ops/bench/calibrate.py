"""Measure a cluster's capacity through the whole system by a short saturation run.

The first requests of the trace are offered open loop at ``OVERDRIVE`` times the estimated
capacity, so a backlog builds and every GPU stays busy while requests keep arriving. Capacity is
the completion rate from the 10th percentile of the finish times (the warm-up left out) to the
last arrival (before the drain, when only the slowest GPUs still work), in requests per simulated
second. It is measured with the ``dio`` policy: how much a cluster serves depends on its router.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from rich.progress import Progress

from dio.ops.bench.cluster_run import RunConfig, run_trace
from dio.ops.bench.workload import at_rate
from dio.ops.traces import Trace

OVERDRIVE = 1.5  # offered load during calibration, as a multiple of the estimate
CALIBRATION_REQUESTS = 1000
WARMUP_PERCENTILE = 10.0
MIN_FINISHED = 20


def saturation_rps(arrivals_s: list[float], latencies_ms: list[float | None]) -> float | None:
    """Return the completion rate while requests still arrive, after warm-up (per simulated s)."""
    finish = np.sort([a + lat / 1000.0 for a, lat in zip(arrivals_s, latencies_ms, strict=True) if lat is not None])
    if finish.size < MIN_FINISHED:
        return None
    lo = float(np.percentile(finish, WARMUP_PERCENTILE))
    hi = max(arrivals_s)
    if hi <= lo:  # everything arrived before the warm-up ended: fall back to the 10th-90th percentiles
        hi = float(np.percentile(finish, 100.0 - WARMUP_PERCENTILE))
    inside = np.count_nonzero((finish >= lo) & (finish <= hi))
    return float(inside / (hi - lo)) if hi > lo else None


def measure_capacity(redis_url: str, config: RunConfig, trace: Trace, estimate_rps: float,
                     requests: int = CALIBRATION_REQUESTS, progress: Progress | None = None) -> float | None:
    """Return the measured saturation throughput of the cluster under ``dio`` (requests per simulated s)."""
    sample = at_rate(trace[:requests], OVERDRIVE * estimate_rps)
    calibration = replace(config, policy="dio", max_wait_s=1e6)
    record = run_trace(redis_url, calibration, sample, progress=progress)
    return saturation_rps([r.arrival_s for r in sample], [o.latency_ms for o in record.outcomes])
