"""Scorers: the cost, in milliseconds, of sending a request to each candidate worker."""

from __future__ import annotations

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.deadlines import would_breach
from dio.dispatcher.policy import Ask, Scorer

INFEASIBLE_MS = 1e5  # added to a worker that would miss the request's own deadline
BREACH_MS = 1e6  # added to a worker where the request would make a job already there miss its deadline


def predicted_ms(ask: Ask, cluster: Cluster, rows: np.ndarray) -> np.ndarray:
    """The NLMS latency of the request on each row; cold rows get the warm rows' mean.

    A cold worker (no completion yet) is neither shunned nor flooded: it is priced like an
    average worker, so it receives traffic and its predictor warms up.
    """
    pred = ask.predicted[rows]
    warm = cluster.predictor.warm[rows]
    if not warm.all():
        pred[~warm] = pred[warm].mean() if warm.any() else 0.0
    return np.maximum(pred, 0.0)


class PredictedLatency(Scorer):
    """Algorithm 1's first term: predicted service latency on the worker."""

    name = "predicted-latency"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        return predicted_ms(ask, cluster, rows)


class Interference(Scorer):
    """The latency a request adds to the jobs already on the worker (continuous batching).

    Every decode step reads the KV of the whole batch, so a request slows each job it joins.
    Greedy routing on its own latency alone piles work onto the fastest GPU until its jobs are
    as slow as the slowest GPU's; pricing the slowdown it imposes on the others (the predictor's
    load term, times the jobs in flight) routes by the cluster's total latency instead.
    """

    name = "interference"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        outstanding = cluster.outstanding[rows]
        if not outstanding.any():
            return np.zeros(len(rows))
        # The request's own load, in each worker's weight units, times what a unit of load costs a
        # job of this length there: the prediction with it minus the prediction without it.
        added_load = ask.kv_tokens / cluster.load_unit[rows]
        return outstanding * cluster.predictor.load_sensitivity(ask.max_tokens)[rows] * added_load


class QueueWait(Scorer):
    """Algorithm 1's second term: time until the worker can start the request.

    A worker runs ``slots`` sequences at once, fewer when its KV cache holds fewer requests of
    this size; jobs beyond that wait for a slot, each slot freeing after about one service time.
    """

    name = "queue-wait"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        kv_slots = cluster.kv_capacity[rows] // max(ask.kv_tokens, 1)
        slots = np.maximum(np.minimum(cluster.slots[rows], kv_slots), 1)
        ahead = np.maximum(cluster.outstanding[rows] + 1 - slots, 0)
        service = cluster.service_ms[rows]
        if (service == 0).any():
            service = np.where(service == 0, predicted_ms(ask, cluster, rows), service)
        return ahead * service / slots


class KvHeadroom(Scorer):
    """Soft penalty as a worker's KV headroom shrinks past 80% reserved.

    Near-full workers preempt and thrash when estimates are off; the penalty grows to half the
    predicted latency at 100%, steering work elsewhere before the hard admission limit bites.
    """

    name = "kv-headroom"
    START = 0.8

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        capacity = np.maximum(cluster.kv_capacity[rows], 1)
        usage = (cluster.reserved_kv[rows] + ask.kv_tokens) / capacity
        over = np.clip((usage - self.START) / (1 - self.START), 0.0, 1.0)
        return 0.5 * over * predicted_ms(ask, cluster, rows)


class DeadlineFeasibility(Scorer):
    """Penalty for a worker whose predicted finish misses the request's deadline."""

    name = "deadline"

    def __init__(self) -> None:
        self.wait = QueueWait()

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        deadline = ask.deadline_at
        if deadline is None:
            return np.zeros(len(rows))
        finish_ms = predicted_ms(ask, cluster, rows) + self.wait.cost(ask, cluster, rows, now)
        remaining_ms = (deadline - now) * 1000.0
        return np.where(finish_ms > remaining_ms, INFEASIBLE_MS, 0.0)


class ProtectsDeadlines(Scorer):
    """Penalty for a worker where the request's load would push a job already there past its deadline.

    Larger than ``DeadlineFeasibility``'s: a request that will be late anyway goes where it harms
    nobody rather than spoiling a job that would have made it (see ``dio.dispatcher.deadlines``).
    """

    name = "protects-deadlines"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        return np.where(would_breach(ask.loads[rows], cluster.ceiling[rows]), BREACH_MS, 0.0)


class Outstanding(Scorer):
    """Least-loaded: the number of jobs sent to the worker and not yet ended."""

    name = "outstanding"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        return cluster.outstanding[rows].astype(float)


class QueueAndKv(Scorer):
    """The Kubernetes inference gateway's default: queue depth and KV utilisation, each in [0, 1].

    Both are normalised across the candidates like the gateway's scorers (score 1 − x/max), and
    summed with equal weights; it is load-aware but blind to how fast each GPU is.
    """

    name = "queue-kv"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        queue = np.maximum(cluster.outstanding[rows] - cluster.running[rows], cluster.waiting[rows])
        queue_norm = queue / max(queue.max(), 1)
        return queue_norm + cluster.kv_usage[rows]
