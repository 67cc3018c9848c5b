"""Measure a cluster's capacity by a short saturation run, instead of trusting the roofline estimate.

The first requests of the trace are offered at several times the estimated capacity, so a backlog
builds at once; the cluster then serves at its real saturation rate. Capacity is the completion
rate between the 10th and the 90th percentile of the finish times (the warm-up and the tail left
out), in requests per simulated second. It is measured with the ``dio`` policy: how well a
cluster is used depends on the router, and capacity is the most the best router gets out of it.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from rich.progress import Progress

from ops.bench.cluster_run import RunConfig, run_trace
from ops.bench.workload import at_rate
from ops.traces import Trace

OVERDRIVE = 3.0  # offered load during calibration, as a multiple of the estimate
CALIBRATION_REQUESTS = 600
WINDOW = (10.0, 90.0)  # percentiles of the finish times between which completions are counted


def saturation_rps(arrivals_s: list[float], latencies_ms: list[float | None]) -> float | None:
    """Return the completion rate between the WINDOW percentiles of the finish times (per simulated s)."""
    finish = np.sort([a + lat / 1000.0 for a, lat in zip(arrivals_s, latencies_ms, strict=True) if lat is not None])
    if finish.size < 10:
        return None
    lo, hi = np.percentile(finish, WINDOW)
    inside = np.count_nonzero((finish >= lo) & (finish <= hi))
    return float(inside / (hi - lo)) if hi > lo else None


def measure_capacity(redis_url: str, config: RunConfig, trace: Trace, estimate_rps: float,
                     requests: int = CALIBRATION_REQUESTS, progress: Progress | None = None) -> float | None:
    """Return the measured saturation throughput of the cluster (requests per simulated s)."""
    sample = at_rate(trace[:requests], OVERDRIVE * estimate_rps)
    calibration = replace(config, policy="dio", max_wait_s=1e6)
    record = run_trace(redis_url, calibration, sample, progress=progress)
    return saturation_rps([r.arrival_s for r in sample], [o.latency_ms for o in record.outcomes])
