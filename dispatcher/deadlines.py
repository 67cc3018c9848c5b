"""Deadline protection: how much more load a worker's jobs can take before one misses its deadline (pure).

Continuous batching shares a GPU: each request sent to a worker slows every job already there
(a decode step reads the whole batch's KV). A router that only checks the newcomer's own deadline
keeps adding work to the fastest GPU until the jobs already on it are late. DIO prices that.

When a job with a deadline is dispatched, its slack is the time left before its deadline minus
its predicted latency. The predictor says how many ms one more unit of load (KV in flight, in
units of the model's weights) adds to the job (``Predictor.load_sensitivity``), so the job
tolerates ``slack / sensitivity`` more units: its **load ceiling** is the worker's load at
dispatch plus that. A worker's ceiling is the lowest of its jobs' (``Cluster.ceiling``); a new
request whose load would push the worker past it would make some job late. Jobs already
predicted late, or without a deadline, set no ceiling: there is nothing left to protect.

The estimate is conservative: it charges the extra load to the whole job, also the part already
done, and releases it only when jobs end.
"""

from __future__ import annotations

import math

import numpy as np

NO_CEILING = math.inf


def load_ceiling(load: float, slack_ms: float, sensitivity_ms: float) -> float:
    """The load at which a job with ``slack_ms`` left (at ``load``) reaches its deadline."""
    if slack_ms < 0 or sensitivity_ms <= 0:
        return NO_CEILING
    return load + slack_ms / sensitivity_ms


def would_breach(loads_with: np.ndarray, ceilings: np.ndarray) -> np.ndarray:
    """Per worker: whether its load with the new request passes a job's ceiling."""
    return loads_with > ceilings
