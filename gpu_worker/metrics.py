"""A worker process's Prometheus metrics: each job's latencies, and its engine's live state.

One ``WorkerMetrics`` per process, shared by the daemons it hosts (``dio worker --count``,
``--cluster``): every series has a ``worker`` label. The daemon calls ``job_ended`` when a job
ends and ``telemetry`` at each heartbeat (with what it read from the engine anyway); a scrape
reads only those numbers, never the engine or Redis.

Latencies are measured the way a client sees them, from ``Request.submitted_at`` (the client's
clock: across hosts, clock skew shifts them; negative values are clamped to 0).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dio.protocol.metrics import LATENCY_BUCKETS_S, TOKEN_BUCKETS_S, SampledCounter
from dio.protocol.models import JobResult, JobStatus, Request, WorkerInfo, WorkerTelemetry
from dio.protocol.retry import Outage

Samples = list[tuple[tuple[str, ...], float]]


class WorkerMetrics:
    """The metrics of the workers one process hosts, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.served = False  # set once /metrics is served: the daemons then also read their queue's length
        w = ["worker"]
        self.info = Gauge("dio_worker_info", "1 per worker this process hosts, with its GPU type, engine and "
                          "model", ["worker", "gpu", "engine", "model"], registry=r)
        self.jobs = Counter("dio_worker_jobs_total", "Jobs this worker ended, by terminal status",
                            ["worker", "status"], registry=r)
        self.tokens = Counter("dio_worker_tokens_total", "Tokens of the jobs this worker ended, by kind (prompt, "
                              "output)", ["worker", "kind"], registry=r)
        self.ttft = Histogram("dio_worker_ttft_seconds", "Time to first token, from submission", w,
                              buckets=LATENCY_BUCKETS_S, registry=r)
        self.tpot = Histogram("dio_worker_tpot_seconds", "Time per output token after the first", w,
                              buckets=TOKEN_BUCKETS_S, registry=r)
        self.e2e = Histogram("dio_worker_e2e_seconds", "End-to-end latency of a completed job, submission to end",
                             w, buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_wait = Histogram("dio_worker_queue_wait_seconds", "Submission to start on this worker (the "
                                    "backlog, the hand-off and the worker's queue)", w, buckets=LATENCY_BUCKETS_S,
                                    registry=r)
        self.kv_usage = Gauge("dio_worker_kv_usage_ratio", "Fraction of the KV cache in use (0..1)", w, registry=r)
        self.kv_used = Gauge("dio_worker_kv_used_tokens", "KV cache tokens in use", w, registry=r)
        self.kv_capacity = Gauge("dio_worker_kv_capacity_tokens", "KV cache tokens the engine holds", w, registry=r)
        self.running = Gauge("dio_worker_running_sequences", "Sequences the engine runs now", w, registry=r)
        self.waiting = Gauge("dio_worker_waiting_sequences", "Sequences waiting inside the engine", w, registry=r)
        self.in_flight = Gauge("dio_worker_in_flight_jobs", "Jobs the daemon started and has not ended", w,
                               registry=r)
        self.queue = Gauge("dio_worker_queue_entries", "Entries on the worker's queue stream (XLEN): jobs handed "
                           "to it, not yet ended", w, registry=r)
        self.draining = Gauge("dio_worker_draining", "1 while the worker drains (SIGTERM), else 0", w, registry=r)
        self._preemptions: dict[str, int] = {}
        self._outages: dict[str, Outage] = {}
        SampledCounter("dio_worker_preemptions_total", "Sequences the engine preempted (recomputed) since it started",
                       w, lambda: [((wid,), n) for wid, n in list(self._preemptions.items())], registry=r)
        SampledCounter("dio_worker_redis_reconnects_total", "Redis outages this worker rode out", w,
                       lambda: self._outage_counts("recoveries"), registry=r)
        SampledCounter("dio_worker_redis_errors_total", "Redis calls of this worker that failed", w,
                       lambda: self._outage_counts("errors"), registry=r)

    def _outage_counts(self, attribute: str) -> Samples:
        return [((wid,), getattr(outage, attribute)) for wid, outage in list(self._outages.items())]

    def add_worker(self, info: WorkerInfo, outage: Outage) -> None:
        """A daemon registered: label its series, and count its Redis reconnects."""
        self.info.labels(worker=info.id, gpu=info.gpu, engine=info.engine, model=info.model).set(1)
        self.kv_capacity.labels(worker=info.id).set(info.kv_capacity_tokens)
        self._outages[info.id] = outage

    def telemetry(self, worker_id: str, telemetry: WorkerTelemetry) -> None:
        """Set the live gauges from one heartbeat's telemetry."""
        self.kv_usage.labels(worker=worker_id).set(telemetry.kv_usage)
        self.kv_used.labels(worker=worker_id).set(telemetry.kv_used_tokens)
        self.running.labels(worker=worker_id).set(telemetry.running)
        self.waiting.labels(worker=worker_id).set(telemetry.waiting)
        self.in_flight.labels(worker=worker_id).set(telemetry.in_flight)
        self.draining.labels(worker=worker_id).set(1 if telemetry.draining else 0)
        self._preemptions[worker_id] = telemetry.preemptions

    def queue_entries(self, worker_id: str, entries: int) -> None:
        self.queue.labels(worker=worker_id).set(entries)

    def job_ended(self, worker_id: str, request: Request, result: JobResult, started_at: float) -> None:
        """Count one job's end, with its latencies when it completed."""
        self.jobs.labels(worker=worker_id, status=result.status.value).inc()
        self.tokens.labels(worker=worker_id, kind="prompt").inc(result.prompt_tokens or 0)
        self.tokens.labels(worker=worker_id, kind="output").inc(result.output_tokens or 0)
        self.queue_wait.labels(worker=worker_id).observe(max(started_at - request.submitted_at, 0.0))
        if result.status != JobStatus.completed or result.finished_at is None:
            return
        self.e2e.labels(worker=worker_id).observe(max(result.finished_at - request.submitted_at, 0.0))
        first = result.first_token_at
        if first is None:
            return
        self.ttft.labels(worker=worker_id).observe(max(first - request.submitted_at, 0.0))
        output_tokens = result.output_tokens or 0
        if output_tokens > 1:
            tpot = (result.finished_at - first) / (output_tokens - 1)
            self.tpot.labels(worker=worker_id).observe(max(tpot, 0.0))
