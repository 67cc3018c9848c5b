"""A roofline prior for a new worker's latency predictor, from its datasheet (pure: no I/O).

Without it a worker is *cold* until its first completion comes back: DIO cannot tell a T4 from
an H100, so it sends a cold worker only a couple of probe jobs and prices it like the average of
the others. On a cold cluster, or a short burst, that wait is most of the run.

A worker that registers its GPU's peak FLOP/s and memory bandwidth (the simulated engine always
does; the vLLM worker does for GPUs it finds in ``dio.gpu_worker.sim.profiles``) starts from a
physical estimate instead, in the vector predictor's features (prompt/1000, output/100·(1+ℓ), 1):

* prefill of 1,000 prompt tokens: 1,000 × 2·params FLOPs at ``COMPUTE_EFFICIENCY`` of peak
  (2·params FLOPs per token = the weights' bytes at 2 bytes per parameter);
* 100 output tokens: 100 decode steps, each reading the weights at ``BANDWIDTH_EFFICIENCY`` of
  peak bandwidth plus ``STEP_OVERHEAD_MS`` (the KV load multiplies it by 1 + ℓ);
* a fixed ``FIXED_MS`` per request.

The efficiencies are typical serving figures, not the simulator's own numbers; the NLMS steps
correct the prior from the first completions on.
"""

from __future__ import annotations

import numpy as np

from dio.protocol.models import WorkerInfo

COMPUTE_EFFICIENCY = 0.4
BANDWIDTH_EFFICIENCY = 0.7
STEP_OVERHEAD_MS = 2.0
FIXED_MS = 10.0


def roofline_prior(info: WorkerInfo) -> np.ndarray | None:
    """Vector-predictor weights (ms) for a worker from its datasheet; None if it gave none."""
    if info.peak_flops <= 0 or info.mem_bandwidth <= 0 or info.weight_bytes <= 0:
        return None
    scale = info.time_scale if info.time_scale > 0 else 1.0  # a simulated engine runs that much faster
    prefill_1k_ms = 1000.0 * info.weight_bytes / (info.peak_flops * COMPUTE_EFFICIENCY) * 1000.0
    step_ms = info.weight_bytes / (info.mem_bandwidth * BANDWIDTH_EFFICIENCY) * 1000.0 + STEP_OVERHEAD_MS
    # The prefill backlog (in 10k prompt tokens) waits its turn at the same prefill rate.
    return np.array([prefill_1k_ms, 100.0 * step_ms, FIXED_MS, 10.0 * prefill_1k_ms]) / scale


def token_priors(info: WorkerInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """TTFT and TPOT predictor weights (ms, ``dio.dispatcher.token_latency``'s features) from the datasheet.

    TTFT: prefill of 1,000 uncached tokens, the same rate for the queue ahead (in 10k tokens), and
    a fixed cost. TPOT: one decode step reading the weights, the same again per unit of KV load ℓ
    (KV bytes in weight units), and, at a prefill share ρ, one more step per unit of ρ. (The
    physical share — a full prefill chunk in a share ρ of the steps — is ten times larger on an
    H100; as a prior it made most workers look infeasible at once and lost goodput everywhere in
    the virtual replay: the learned weight gets there from the completions instead.)
    """
    weights = roofline_prior(info)
    if weights is None:
        return None
    prefill_1k_ms, decode_100_ms, fixed_ms, backlog_ms = weights
    step_ms = decode_100_ms / 100.0
    return (np.array([prefill_1k_ms, backlog_ms, fixed_ms]),
            np.array([step_ms, step_ms - STEP_OVERHEAD_MS / (info.time_scale or 1.0), step_ms]))
