"""Filters: which workers may take a request (see ``dio.dispatcher.policy``)."""

from __future__ import annotations

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policy import Ask, Filter


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
        need = ask.kv_tokens
        return (cluster.kv_capacity >= need) & (cluster.max_model_len >= need)

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        same_model = cluster.model == ask.model
        largest = int(np.minimum(cluster.kv_capacity, cluster.max_model_len)[same_model].max(initial=0))
        return (f"too large for every worker: needs {ask.kv_tokens} KV tokens "
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

    Reservations are the KV of every job DIO sent to the worker that has not ended, so the
    engine's cache never overflows even if every running request grows to its max_tokens.
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
