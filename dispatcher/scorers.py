"""Scorers: the cost, in milliseconds, of sending a request to each candidate worker."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.deadlines import would_breach
from dio.dispatcher.policy import Ask, Scorer
from dio.dispatcher.prior import BANDWIDTH_EFFICIENCY
from dio.protocol.models import WorkerInfo

INFEASIBLE_MS = 1e5  # added to a worker that would miss the request's own deadline
BREACH_MS = 1e6  # added to a worker where the request would make a job already there miss its deadline


def _cold_as_mean(values: np.ndarray, warm: np.ndarray) -> np.ndarray:
    """Price a cold worker (nothing learned, no prior) like the average warm one.

    A cold worker is then neither shunned nor flooded: it receives traffic and its predictor warms up.
    """
    if warm.all():
        return values
    out = values.copy()
    out[~warm] = values[warm].mean() if warm.any() else 0.0
    return out


def predicted_ms(ask: Ask, cluster: Cluster, rows: np.ndarray) -> np.ndarray:
    """The NLMS latency of the request on each row; cold rows get the warm rows' mean."""
    return np.maximum(_cold_as_mean(ask.predicted[rows], cluster.predictor.warm[rows]), 0.0)


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


class SloHeadroom(Scorer):
    """Route by the request's SLO: predicted TTFT and TPOT on each worker against its limits.

    A worker predicted to miss a limit (beyond ``safety`` of it) costs ``INFEASIBLE_MS`` per limit
    missed, so it is chosen only when every worker misses. Among the rest the cost is the SLO
    headroom the request would use there, u = max(TTFT / TTFT left, TPOT / TPOT limit, prefill
    stall / its jobs' TPOT slack): ``fit="most-headroom"`` prefers the lowest u, ``fit="best"`` the
    highest (the slowest GPU that still serves it in time). Predictions are cautious: scaled up by
    how far each worker's measurements run above them. Requests without an SLO cost nothing here
    (the end-to-end scorers price them).
    """

    name = "slo-headroom"
    SCALE_MS = 1000.0  # one unit of headroom, in the scorers' common currency

    def __init__(self, fit: str = "most-headroom", safety: float = 1.0) -> None:
        if fit not in ("best", "most-headroom"):
            raise ValueError(f"fit must be 'best' or 'most-headroom', not {fit!r}")
        self.fit = fit
        self.safety = safety

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        if not ask.has_slo:
            return np.zeros(len(rows))
        warm = cluster.tokens.warm[rows]
        # Cautious predictions: scaled up by how far each worker's measurements run above them.
        ttft = _cold_as_mean(ask.ttft[rows], warm) * cluster.tokens.ttft.caution()[rows]
        tpot = _cold_as_mean(ask.tpot[rows], warm) * cluster.tokens.tpot.caution()[rows]
        stall = self._stall_use(ask, cluster, rows, tpot) if ask.tpot_slo_ms is not None else np.zeros(len(rows))
        use = np.maximum(ask.slo_use(ttft, tpot), stall)
        misses = use > self.safety
        if misses.all():
            # It misses wherever it goes now: put it where it harms the jobs already there least
            # (the live-state scorer spreads the rest), not on the fastest GPU, which it would
            # overload — but never where it would miss even on an idle GPU.
            hopeless = self._idle_use(ask, cluster, rows) > self.safety
            return INFEASIBLE_MS * (1.0 + hopeless) + np.minimum(stall, 10.0) * self.SCALE_MS
        fit = (1.0 - use) if self.fit == "best" else use
        return np.where(misses, INFEASIBLE_MS + use * self.SCALE_MS, fit * self.SCALE_MS)


    @staticmethod
    def _idle_use(ask: Ask, cluster: Cluster, rows: np.ndarray) -> np.ndarray:
        """The share of the request's SLO it would use on each worker if the worker were idle."""
        zeros = np.zeros(len(cluster))
        idle_ttft = cluster.tokens.predict_ttft(ask.uncached_by_worker, zeros)[rows]
        return ask.slo_use(idle_ttft, cluster.tokens.predict_tpot(zeros, zeros)[rows])

    @staticmethod
    def _stall_use(ask: Ask, cluster: Cluster, rows: np.ndarray, tpot: np.ndarray) -> np.ndarray:
        """How much of its jobs' TPOT slack the request's prefill would use on each busy worker.

        Chunked prefill computes the prompt inside the decode steps of every job already there:
        each waits the prompt's prefill time, spread over its output — a short answer (a low
        quantile of the outputs seen) beside a long prompt misses its TPOT on a slow GPU.
        """
        slack_ms = (ask.tpot_slo_ms or 0.0) - tpot
        budget_ms = np.maximum(slack_ms, 1e-3) * max(ask.short_output_tokens - 1, 1)
        stall = ask.prefill_ms[rows] / budget_ms
        return np.where(cluster.outstanding[rows] > 0, stall, 0.0)


class WithoutSlo(Scorer):
    """Apply ``inner`` only to requests without a TTFT/TPOT SLO (``SloHeadroom`` prices the others)."""

    applies_with_slo = False

    def __init__(self, inner: Scorer) -> None:
        self.inner = inner
        self.name = inner.name

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        if ask.has_slo != self.applies_with_slo:
            return np.zeros(len(rows))
        return self.inner.cost(ask, cluster, rows, now)


class WithSlo(WithoutSlo):
    """Apply ``inner`` only to requests with a TTFT/TPOT SLO."""

    applies_with_slo = True


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


class PerWorker:
    """A number per worker row computed from its registration, recomputed only when one changes."""

    def __init__(self, compute: Callable[[WorkerInfo], float]) -> None:
        self.compute = compute
        self._infos: list[WorkerInfo] = []
        self._values = np.zeros(0)

    def of(self, cluster: Cluster) -> np.ndarray:
        infos = cluster.infos
        if len(infos) != len(self._infos) or any(a is not b for a, b in zip(infos, self._infos, strict=True)):
            self._infos = list(infos)
            self._values = np.array([self.compute(info) for info in infos], dtype=float)
        return self._values


def capacity_weight(info: WorkerInfo, weights: Mapping[str, float]) -> float:
    """A worker's capacity weight: configured by its id or GPU name, else estimated from its datasheet.

    The estimate is a roofline decode rate: tokens/s of one sequence whose every decode step reads
    the weights at ``BANDWIDTH_EFFICIENCY`` of the GPU's peak memory bandwidth (× a simulated
    engine's time scale, so it is per wall second) — how fast the GPU gets through decode work, the
    figure an operator reads off a datasheet. A worker with no datasheet weighs 1.0. Estimates are
    in tokens/s, hand-set weights in whatever unit the operator chose: configure every GPU type or none.
    """
    # The GPU's short name works too: "H100" for an "H100-80GB" (and for every H100 card).
    for key in (info.id, info.gpu, info.gpu.partition("-")[0]):
        if key in weights:
            return float(weights[key])
    if info.mem_bandwidth > 0 and info.weight_bytes > 0:
        scale = info.time_scale if info.time_scale > 0 else 1.0
        return BANDWIDTH_EFFICIENCY * info.mem_bandwidth / info.weight_bytes * scale
    return 1.0


class WeightedConnections(Scorer):
    """Weighted least connections: (jobs outstanding + 1) / the worker's capacity weight.

    The classic load balancer's rule with capacity weights, what an expert operator configures by
    hand (``DIO_POLICY_WEIGHTS``, keyed by GPU name or worker id; see ``capacity_weight``). The
    ``+ 1`` counts the request itself, so an idle fast worker beats an idle slow one.
    """

    name = "weighted-connections"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.weights = dict(weights or {})
        self._weight = PerWorker(lambda info: capacity_weight(info, self.weights))

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        return (cluster.outstanding[rows] + 1.0) / self._weight.of(cluster)[rows]


class CapacityShare(Scorer):
    """Weighted least connections normalised across the candidates: in (0, 1], 1 for the most loaded.

    (Outstanding + 1) / capacity weight, over its largest value among the candidates, so it adds to
    the gateway's normalised queue/KV scores on one scale. DIO uses the datasheet weights (no
    hand-set weights, no profiling): the share of the pool's decode speed each GPU is given.
    """

    name = "capacity-share"

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        self.connections = WeightedConnections(weights)

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        cost = self.connections.cost(ask, cluster, rows, now)
        return cost / max(float(cost.max()), 1e-9)


def uncached_prompt(ask: Ask, rows: np.ndarray) -> np.ndarray:
    """Prompt tokens each row must prefill: the prompt net of what its prefix cache probably holds."""
    if not ask.prefix_hashes:
        return np.full(len(rows), float(ask.prompt_tokens))
    return (ask.prompt_tokens - ask.cached[rows]).astype(float)


class TokenLoad(Scorer):
    """Token load: the worker's KV tokens in flight (``Cluster.reserved_kv``) plus the request's uncached prompt.

    llm-d's load-aware half of "sticky until saturated" (after ``filters.PrefixAffinity``); in tokens.
    """

    name = "token-load"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        return cluster.reserved_kv[rows] + uncached_prompt(ask, rows)


class KvBlockCost(Scorer):
    """NVIDIA Dynamo's KV router cost: overlap weight × prefill blocks + active decode blocks.

    In Dynamo's blocks of ``block_tokens`` (16), not DIO's prefix-hash blocks: prefill blocks are
    the prompt tokens the worker does not hold (the prefix index's overlap, in whole blocks) / 16;
    active decode blocks ≈ the worker's KV tokens in flight (``Cluster.reserved_kv``) / 16. With
    Dynamo's default router temperature 0, the lowest cost wins (``pickers.MinCost``).
    """

    name = "kv-block-cost"

    def __init__(self, block_tokens: int = 16, overlap_weight: float = 1.0) -> None:
        self.block_tokens = block_tokens
        self.overlap_weight = overlap_weight

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        block = self.block_tokens
        overlap = np.zeros(len(rows)) if not ask.prefix_hashes else ask.cached[rows] // block
        prefill_blocks = (ask.prompt_tokens - overlap * block) / block
        decode_blocks = cluster.reserved_kv[rows] / block
        return self.overlap_weight * prefill_blocks + decode_blocks
