"""What a benchmark replays: a trace's requests, the cluster's capacity and each request's SLO (pure).

Arrival times are in simulated seconds. A trace is loaded once with its own arrival pattern (or
Poisson arrivals), then rescaled to each offered load: ``load × capacity`` requests per simulated
second, every gap scaled by the same factor so bursts stay bursts.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SimRequest
from dio.ops.capacity import capacity_rps, deadline_ms, deadlines_ms, unloaded_ms
from dio.ops.local_cluster import WorkerSpec
from dio.ops.traces import (
    BUNDLED,
    Trace,
    bundled,
    detect_format,
    load_trace,
    poisson_arrivals,
    rescale_arrivals,
    with_arrivals,
)

__all__ = ["capacity_rps", "deadline_ms", "deadlines_ms", "unloaded_ms"]  # re-exported for the benchmarks

POISSON = "poisson"
TRACE_ARRIVALS = "trace"
SATURATION_SAMPLE = 800  # requests queued at once to measure one GPU's saturation throughput
NICE_STEPS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)  # time scales are rounded to these × 10^k


def trace_path(trace: str) -> Path:
    """Return the file of a bundled trace name (``azure-conv``, ...) or of a path."""
    if trace in BUNDLED:
        return bundled(trace)
    path = Path(trace)
    if not path.is_file():
        raise ValueError(f"no trace file {trace!r} (bundled names: {', '.join(sorted(BUNDLED))})")
    return path


def trace_name(trace: str) -> str:
    """Return a short name for a trace: the bundled name, or the file's stem."""
    return trace if trace in BUNDLED else Path(trace).stem


def load_workload(trace: str, *, arrivals: str = TRACE_ARRIVALS, max_requests: int | None = None,
                  seed: int = 0) -> Trace:
    """Load up to ``max_requests`` requests of a trace, with arrivals from the trace, Poisson, or a file.

    Args:
        arrivals: ``trace`` (the trace's own timestamps; Poisson for a length-only trace),
            ``poisson``, or the path of a timed trace whose arrival times to use.
    """
    path = trace_path(trace)
    if detect_format(path) == "lengths":
        if arrivals in (TRACE_ARRIVALS, POISSON):
            return load_trace(path, rate=1.0, seed=seed, max_requests=max_requests)
        return load_trace(path, arrivals=_arrival_times(arrivals, max_requests), max_requests=max_requests)
    rows = load_trace(path, max_requests=max_requests)
    if arrivals == TRACE_ARRIVALS:
        return rows
    if arrivals == POISSON:
        return with_arrivals(rows, poisson_arrivals(len(rows), 1.0, seed))
    return with_arrivals(rows, _arrival_times(arrivals, max_requests))


def _arrival_times(path: str, max_requests: int | None) -> list[float]:
    """Return the arrival times of a timed trace file."""
    return [r.arrival_s for r in load_trace(trace_path(path), max_requests=max_requests)]


def engine_saturation_rps(profile: str, model_name: str, trace: Trace, sample: int = SATURATION_SAMPLE) -> float:
    """Return one simulated GPU's saturation throughput on the trace's requests (requests per simulated s).

    Runs the GPU's scheduler alone (no network, no router) with the first ``sample`` requests all
    queued at time 0 (prefix cache on), and counts completions between the 10th and the 90th
    percentile of their finish times. Requests longer than the GPU's context are left out: they
    cannot run there.
    """
    scheduler = BatchScheduler(get_profile(profile), get_model(model_name))
    fits = [r for r in trace[:sample] if r.prompt_tokens + r.output_tokens <= scheduler.max_model_len]
    for i, request in enumerate(fits):
        scheduler.add(SimRequest(str(i), request.prompt_tokens, request.output_tokens,
                                 prefix_hashes=request.prefix_hashes), 0.0)
    finished = []
    while (t := scheduler.next_event_time()) is not None:
        finished += [e.time for e in scheduler.advance_to(t) if e.kind is not EventKind.first_token]
    if len(finished) < 10:
        return 0.0
    lo, hi = np.percentile(finished, (10, 90))
    inside = np.count_nonzero((np.asarray(finished) >= lo) & (np.asarray(finished) <= hi))
    return float(inside / (hi - lo)) if hi > lo else 0.0


def engine_capacity_rps(specs: list[WorkerSpec], model_name: str, trace: Trace) -> float:
    """Return the cluster's capacity as the sum of its GPUs' saturation throughputs (ideal routing)."""
    per_profile = {s.profile: engine_saturation_rps(s.profile, model_name, trace) for s in specs}
    return sum(s.count * per_profile[s.profile] for s in specs)


def at_rate(trace: Trace, rps: float) -> Trace:
    """Rescale the arrivals to ``rps`` requests per simulated second (bursts kept)."""
    return rescale_arrivals(trace, rps)


def span_s(trace: Trace) -> float:
    """Return the time from the first arrival to the last, in simulated seconds."""
    return trace[-1].arrival_s - trace[0].arrival_s if trace else 0.0


def nice_time_scale(raw: float) -> float:
    """Round a time scale down to 1, 1.25, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × a power of ten (at least 1)."""
    if raw <= 1.0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(raw))
    return max(step * power for step in NICE_STEPS if step * power <= raw * (1 + 1e-9))


def auto_time_scale(sim_span_s: float, target_wall_s: float) -> float:
    """Return the time scale that plays ``sim_span_s`` of arrivals in about ``target_wall_s`` wall seconds."""
    if target_wall_s <= 0:
        raise ValueError(f"target_wall_s must be positive, got {target_wall_s}")
    return nice_time_scale(sim_span_s / target_wall_s)
