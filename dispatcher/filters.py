"""Filters: which workers may take a request (see ``dio.dispatcher.policy``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policy import Ask, Filter
from dio.dispatcher.prior import COMPUTE_EFFICIENCY
from dio.dispatcher.scorers import PerWorker
from dio.protocol.models import WorkerInfo


class ServesModel(Filter):
    """Workers registered for the request's model (alive or not). Permanent."""

    name = "serves-model"
    permanent = True

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return cluster.model == ask.model

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        served = sorted(set(cluster.model.tolist()))
        return f"no worker serves model {ask.model!r} (served: {', '.join(served) or 'none'})"


class FitsWhenIdle(Filter):
    """KV admission, the hard part: the request's whole KV must fit the worker when idle.

    KV tokens needed = prompt tokens + max_tokens (the most the request can ever hold); a worker
    whose KV cache or context length is smaller would fail it with an OOM or refuse it. Permanent.
    """

    name = "fits-when-idle"
    permanent = True

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        need = ask.max_kv_tokens
        return (cluster.kv_capacity >= need) & (cluster.max_model_len >= need)

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        same_model = cluster.model == ask.model
        largest = int(np.minimum(cluster.kv_capacity, cluster.max_model_len)[same_model].max(initial=0))
        return (f"too large for every worker: needs {ask.max_kv_tokens} KV tokens "
                f"(prompt {ask.prompt_tokens} + max_tokens {ask.max_tokens}); "
                f"the largest worker for {ask.model!r} holds {largest}")


class Alive(Filter):
    """Workers whose heartbeat is fresh and that are not draining. Transient."""

    name = "alive"

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return cluster.alive & ~cluster.draining

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        return f"no live worker for model {ask.model!r}"


class KvAdmission(Filter):
    """KV admission, now: the request's KV fits what DIO has not yet reserved. Transient.

    Reservations are the KV of every job DIO sent to the worker that has not ended. A job reserves
    its prompt plus ``Ask.kv_tokens``' output: its whole ``max_tokens`` (then the engine's cache
    never overflows), or, for a policy that learns outputs, a high quantile of what earlier
    requests produced — most requests stop far below their cap, so reserving the cap would leave
    most of the cache idle; the engine's preemption is the safety net for the few that run longer.
    """

    name = "kv-admission"

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return cluster.reserved_kv + ask.kv_tokens <= cluster.kv_capacity

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        return f"no worker has {ask.kv_tokens} free KV tokens now (all reserved by running jobs)"


class QueueBound(Filter):
    """Keep each worker's queue shallow: at most its engine's slots plus a small prefetch.

    Late binding: work beyond that stays in the dispatcher's backlog, where it is routed on fresh
    information when a slot opens. Transient.
    """

    name = "queue-bound"

    def __init__(self, prefetch: int = 2) -> None:
        self.prefetch = prefetch

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return cluster.outstanding < cluster.slots + self.prefetch

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        return "every worker's queue is full"


class ColdStartProbe(Filter):
    """A worker whose predictor has learned nothing yet takes at most ``probes`` jobs. Transient.

    Until its first completion comes back, DIO cannot tell a T4 from an H100; a burst routed
    blind would pile hundreds of requests onto a slow GPU. A few probes teach the predictor within
    one service time, then the worker is priced like any other.
    """

    name = "cold-start-probe"

    def __init__(self, probes: int = 2) -> None:
        self.probes = probes

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return cluster.predictor.warm | (cluster.outstanding < self.probes)

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        return "waiting for the first completions of new workers"


def prefill_rate_tokens_s(info: WorkerInfo) -> float:
    """A worker's peak prefill throughput (prompt tokens/s) from its datasheet; 0 if it gave none.

    The roofline: 2 × params FLOPs per prompt token (params = weight bytes / 2 at bf16), at
    ``COMPUTE_EFFICIENCY`` of the GPU's peak FLOP/s. In the engine's own time (a simulated GPU's
    seconds), like the SLOs it is compared with.
    """
    if info.peak_flops <= 0 or info.weight_bytes <= 0:
        return 0.0
    params = info.weight_bytes / 2.0
    return info.peak_flops * COMPUTE_EFFICIENCY / (2.0 * params)


class PrefixAffinity(Filter):
    """Sticky until saturated: keep the workers holding the longest cached prefix of the request. Transient.

    llm-d's default routing (the llm-d inference scheduler's prefix-cache scorer with its
    load-aware scorer, the "precise prefix cache aware" well-lit path): send a request where its
    prefix is cached, until that worker is saturated. A worker is saturated once its in-flight
    uncached prefill (``Cluster.prompt_in_flight``) exceeds τ = its peak prefill throughput
    (``prefill_rate_tokens_s``) × ``ttft_penalty_s``, the largest TTFT penalty a cache hit may cost:
    past it, the queued prefill would delay the request more than the cache saves. A worker
    without a datasheet is never saturated (τ = ∞).

    Among the workers that pass ``among`` (the filters before it: a policy hands each filter every
    worker) and are not saturated, it keeps those with the most cached prefix tokens
    (``Cluster.cached_tokens``); when none of them holds any, it keeps every worker, and the
    scorers decide.
    """

    name = "prefix-affinity"

    def __init__(self, ttft_penalty_s: float = 1.0, among: Sequence[Filter] = ()) -> None:
        self.ttft_penalty_s = ttft_penalty_s
        self.among = list(among)
        self._tau = PerWorker(self._threshold)

    def _threshold(self, info: WorkerInfo) -> float:
        rate = prefill_rate_tokens_s(info)
        return rate * self.ttft_penalty_s if rate > 0 else np.inf

    def thresholds(self, cluster: Cluster) -> np.ndarray:
        """τ of every worker row: the in-flight uncached prefill tokens past which it is saturated."""
        return self._tau.of(cluster)

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        everyone = np.ones(len(cluster), dtype=bool)
        if not ask.prefix_hashes:
            return everyone
        sticky = cluster.prompt_in_flight <= self.thresholds(cluster)
        for f in self.among:
            sticky &= f.mask(ask, cluster, now)
        cached = ask.cached
        sticky &= cached > 0
        if not sticky.any():
            return everyone
        return sticky & (cached == cached[sticky].max())
