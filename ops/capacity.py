"""Roofline estimates of a simulated cluster: its throughput and each request's unloaded latency (pure).

``dio demo`` and the benchmarks size their offered load and their SLOs with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.roofline import estimate_capacity_rps, unloaded_service_time_s
from dio.gpu_worker.sim.scheduler import DEFAULT_MAX_NUM_SEQS
from dio.ops.local_cluster import WorkerSpec
from dio.ops.traces import TraceRequest


def capacity_rps(specs: list[WorkerSpec], model_name: str, trace: Sequence[TraceRequest],
                 max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> float:
    """Return the roofline estimate of the cluster's saturation throughput (requests per simulated s)."""
    model = get_model(model_name)
    mean_prompt = float(np.mean([r.prompt_tokens for r in trace]))
    mean_output = float(np.mean([r.output_tokens for r in trace]))
    return sum(s.count * estimate_capacity_rps(get_profile(s.profile), model, mean_prompt, mean_output,
                                               max_num_seqs=max_num_seqs)
               for s in specs)


def unloaded_ms(specs: list[WorkerSpec], model_name: str, request: TraceRequest) -> float:
    """Return the request's latency alone on the fastest GPU of the cluster, in simulated ms."""
    model = get_model(model_name)
    return 1000.0 * min(unloaded_service_time_s(get_profile(s.profile), model, request.prompt_tokens,
                                                request.output_tokens) for s in specs)


def deadline_ms(specs: list[WorkerSpec], model_name: str, request: TraceRequest, k: float) -> float:
    """Return the request's SLO: k × its unloaded latency on the fastest GPU, in simulated ms."""
    return k * unloaded_ms(specs, model_name, request)


def deadlines_ms(specs: list[WorkerSpec], model_name: str, trace: Sequence[TraceRequest], k: float) -> list[float]:
    """Return every request's SLO in simulated ms (equal lengths are costed once)."""
    cache: dict[tuple[int, int], float] = {}
    out = []
    for request in trace:
        key = (request.prompt_tokens, request.output_tokens)
        if key not in cache:
            cache[key] = deadline_ms(specs, model_name, request, k)
        out.append(cache[key])
    return out
