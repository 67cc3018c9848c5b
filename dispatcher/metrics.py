"""The dispatcher's Prometheus metrics: what it decided, how long deciding took, what waits, what it reserved.

The service (``dio.dispatcher.service``) calls these at a few points of its loop; a scrape reads
only what they recorded (gauges are set by ``sample``, once a second, from the dispatcher's own
memory and one XLEN), so it never does Redis I/O or touches the routing state while the loop
changes it. Every name is listed in the README's metrics section and graphed in
``ops/grafana/dio-dashboard.json``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policy import Decision, Policy
from dio.protocol.metrics import SampledCounter
from dio.protocol.models import Completion, JobStatus, Request
from dio.protocol.retry import Outage

# One decision costs tens of microseconds to a few milliseconds (1,000 workers).
DECISION_BUCKETS_S = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
# A prediction error: a TPOT's is milliseconds, an end-to-end latency's can be a minute.
ERROR_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A rejection's reason, in words for its client, as one of a few classes (a label must not be free text).
REASON_CLASSES = (
    ("overloaded:", "overloaded"),  # the backlog's bounds, or it would not drain before the deadline
    ("no capacity before its deadline", "expired"),  # waited in the backlog past its deadline / max wait
    ("cannot finish before its deadline", "predicted_late"),  # sheddable, predicted late everywhere
    ("cannot meet its SLO", "predicted_late"),
    ("too large for every worker", "too_large"),
    ("no worker serves model", "unknown_model"),
)


def reason_class(reason: str | None) -> str:
    """Return the class of a rejection reason (``other`` for one not listed in REASON_CLASSES)."""
    for prefix, label in REASON_CLASSES:
        if reason and reason.startswith(prefix):
            return label
    return "other"


class DispatcherMetrics:
    """The metrics of one dispatcher, in a registry of its own (``registry``, served by ``serve_metrics``)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("dio_dispatcher_requests_total", "Requests the dispatcher handed to a worker or "
                                "ended, by outcome (dispatched, rejected, invalid, deadlettered) and reason class",
                                ["outcome", "reason"], registry=r)
        self.decisions = Counter("dio_dispatcher_routing_decisions_total", "Requests routed to a worker, by policy "
                                 "and the chosen worker's GPU type", ["policy", "gpu"], registry=r)
        self.decision_seconds = Histogram("dio_dispatcher_decision_seconds", "Time to route one request (filters, "
                                          "scorers, picker), including decisions to wait", ["policy"],
                                          buckets=DECISION_BUCKETS_S, registry=r)
        self.completions = Counter("dio_dispatcher_completions_total", "Job ends the dispatcher learned from, by "
                                   "status", ["status"], registry=r)
        self.predictor_error = Histogram("dio_dispatcher_predictor_error_seconds", "Absolute error of the "
                                         "predictions for a completed job, by target (e2e: service time, ttft, "
                                         "tpot) and GPU type", ["target", "gpu"], buckets=ERROR_BUCKETS_S, registry=r)
        self.intake = Gauge("dio_dispatcher_intake_entries", "Entries on the intake stream (XLEN), the backlog's "
                            "included", registry=r)
        self.backlog = Gauge("dio_dispatcher_backlog_requests", "Requests waiting in the backlog for a worker",
                             registry=r)
        self.backlog_bytes = Gauge("dio_dispatcher_backlog_bytes", "Bytes of request JSON the backlog holds",
                                   registry=r)
        self.reserved = Gauge("dio_dispatcher_reserved_kv_tokens", "KV tokens reserved for unfinished jobs, per "
                              "worker", ["worker", "gpu"], registry=r)
        self.outstanding = Gauge("dio_dispatcher_outstanding_jobs", "Jobs handed to a worker and not ended (its "
                                 "queue and its engine), per worker", ["worker", "gpu"], registry=r)
        self.workers = Gauge("dio_dispatcher_workers", "Workers the dispatcher routes to, by state (alive, "
                             "draining, dead: heartbeat lapsed, not yet taken back)", ["state"], registry=r)
        self.active = Gauge("dio_dispatcher_active", "1 while this dispatcher holds the lease (routes), else 0",
                            registry=r)
        self._requeued = 0
        self._outage: Outage | None = None
        SampledCounter("dio_dispatcher_requeued_jobs_total", "Jobs taken back from dead workers and put back on "
                       "the intake", [], lambda: [((), self._requeued)], registry=r)
        SampledCounter("dio_dispatcher_redis_reconnects_total", "Redis outages this dispatcher rode out (lost, "
                       "then answered again)", [], self._reconnects, registry=r)
        SampledCounter("dio_dispatcher_redis_errors_total", "Redis calls that failed", [], self._errors, registry=r)
        self._shown: set[tuple[str, str]] = set()  # (worker, gpu) label pairs of the per-worker gauges

    # --- wiring ---------------------------------------------------------------------------------

    def watch(self, outage: Outage) -> None:
        """Count the reconnects and errors of this dispatcher's Redis connection."""
        self._outage = outage

    def _reconnects(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), self._outage.recoveries if self._outage else 0)]

    def _errors(self) -> list[tuple[tuple[str, ...], float]]:
        return [((), self._outage.errors if self._outage else 0)]

    def time_decisions(self, policy: Policy) -> None:
        """Observe every ``policy.decide`` call's duration in ``dio_dispatcher_decision_seconds``.

        The routing core is pure and takes no clock; the timing wraps its policy from outside
        (an instance attribute shadowing the method), so the virtual replay's routing is untouched.
        """
        decide = policy.decide
        observe = self.decision_seconds.labels(policy=policy.name).observe

        def timed(request: Request, cluster: Cluster, now: float) -> Decision:
            start = time.perf_counter()
            try:
                return decide(request, cluster, now)
            finally:
                observe(time.perf_counter() - start)

        setattr(policy, "decide", timed)  # noqa: B010 - mypy refuses an assignment to a method

    # --- events ---------------------------------------------------------------------------------

    def dispatched(self, policy: str, gpu: str) -> None:
        self.requests.labels(outcome="dispatched", reason="").inc()
        self.decisions.labels(policy=policy, gpu=gpu).inc()

    def rejected(self, reason: str | None) -> None:
        self.requests.labels(outcome="rejected", reason=reason_class(reason)).inc()

    def invalid(self, deadlettered: bool) -> None:
        """An intake entry failed validation: rejected with the message, or dead-lettered (it named no job)."""
        outcome = "deadlettered" if deadlettered else "invalid"
        self.requests.labels(outcome=outcome, reason="validation").inc()

    def completed(self, done: Completion, gpu: str, errors_ms: dict[str, float | None]) -> None:
        """A job ended on a worker; ``errors_ms`` holds its prediction errors by target (None: not predicted)."""
        self.completions.labels(status=done.status.value).inc()
        if done.status != JobStatus.completed:
            return
        for target, error_ms in errors_ms.items():
            if error_ms is not None:
                self.predictor_error.labels(target=target, gpu=gpu).observe(abs(error_ms) / 1000.0)

    # --- gauges, once a second ------------------------------------------------------------------

    def sample(self, cluster: Cluster, backlog: int, backlog_bytes: int, intake: int | None, active: bool,
               requeued: int) -> None:
        """Set the gauges from the dispatcher's memory (the loop's thread: nothing changes meanwhile)."""
        self.active.set(1 if active else 0)
        self.backlog.set(backlog)
        self.backlog_bytes.set(backlog_bytes)
        if intake is not None:
            self.intake.set(intake)
        self._requeued = requeued
        shown = set()
        for row, worker_id in enumerate(cluster.ids):
            labels = (worker_id, cluster.infos[row].gpu)
            shown.add(labels)
            self.reserved.labels(*labels).set(int(cluster.reserved_kv[row]))
            self.outstanding.labels(*labels).set(int(cluster.outstanding[row]))
        for gone in self._shown - shown:  # a worker that left: its series end instead of freezing
            self.reserved.remove(*gone)
            self.outstanding.remove(*gone)
        self._shown = shown
        alive = cluster.alive & ~cluster.draining
        self.workers.labels(state="alive").set(int(alive.sum()))
        self.workers.labels(state="draining").set(int((cluster.alive & cluster.draining).sum()))
        self.workers.labels(state="dead").set(int((~cluster.alive).sum()))
