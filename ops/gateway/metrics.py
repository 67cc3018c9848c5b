"""The gateway's Prometheus metrics: a ``GatewayHooks`` that counts requests, statuses, latencies and tokens.

Its registry is served on the gateway's ``/metrics`` (or a port of its own). Label values come
from the gateway's routes and its model catalog; each label keeps at most ``MAX_LABEL_VALUES``
distinct values (later ones count as ``other``), so a client sending odd paths or model names
cannot grow the series without bound.
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dio.ops.gateway.hooks import GatewayHooks
from dio.protocol.metrics import LATENCY_BUCKETS_S

MAX_LABEL_VALUES = 64
OTHER = "other"


class BoundedLabel:
    """Pass the first ``limit`` distinct values through; map every later one to ``other``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        with self._lock:
            if len(self._seen) >= self.limit:
                return OTHER
            self._seen.add(value)
        return value


class GatewayMetrics(GatewayHooks):
    """The gateway's metrics, in a registry of its own (``registry``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self._endpoint = BoundedLabel()
        self._model = BoundedLabel()
        self.requests = Counter("dio_gateway_requests_total", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.seconds = Histogram("dio_gateway_request_seconds", "Time from a request's arrival to its answer (a "
                                 "stream's last event), by endpoint", ["endpoint"], buckets=LATENCY_BUCKETS_S,
                                 registry=r)
        # Not by endpoint: a request starts before its route is known (its raw path could be anything).
        self.in_progress = Gauge("dio_gateway_requests_in_progress", "Requests being answered now", registry=r)
        self.jobs = Counter("dio_gateway_jobs_submitted_total", "DIO jobs submitted (choices x prompts), by endpoint "
                            "and model", ["endpoint", "model"], registry=r)
        self.ttft = Histogram("dio_gateway_ttft_seconds", "Time from a streaming request's arrival to its first "
                              "text, by endpoint and model", ["endpoint", "model"], buckets=LATENCY_BUCKETS_S,
                              registry=r)
        self.tokens_total = Counter("dio_gateway_tokens_total", "Usage of the requests answered, by endpoint, model "
                                    "and kind (prompt, completion)", ["endpoint", "model", "kind"], registry=r)
        self.disconnects = Counter("dio_gateway_client_disconnects_total", "Clients that went away before their "
                                   "answer, by endpoint", ["endpoint"], registry=r)
        self.cancelled = Counter("dio_gateway_jobs_cancelled_total", "Unfinished jobs cancelled because their "
                                 "client went away, by endpoint", ["endpoint"], registry=r)

    def request_started(self, route: str) -> None:
        self.in_progress.inc()

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        endpoint = self._endpoint(route)
        self.in_progress.dec()
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.seconds.labels(endpoint=endpoint).observe(max(seconds, 0.0))

    def jobs_submitted(self, route: str, model: str, count: int) -> None:
        self.jobs.labels(endpoint=self._endpoint(route), model=self._model(model)).inc(count)

    def first_token(self, route: str, model: str, seconds: float) -> None:
        self.ttft.labels(endpoint=self._endpoint(route), model=self._model(model)).observe(max(seconds, 0.0))

    def tokens(self, route: str, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        endpoint, name = self._endpoint(route), self._model(model)
        self.tokens_total.labels(endpoint=endpoint, model=name, kind="prompt").inc(prompt_tokens)
        self.tokens_total.labels(endpoint=endpoint, model=name, kind="completion").inc(completion_tokens)

    def client_disconnected(self, route: str, jobs_cancelled: int) -> None:
        endpoint = self._endpoint(route)
        self.disconnects.labels(endpoint=endpoint).inc()
        self.cancelled.labels(endpoint=endpoint).inc(jobs_cancelled)
