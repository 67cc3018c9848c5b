"""A replay in simulated time, in one process: the dispatcher's routing core against simulated GPUs.

``dio bench replay`` runs the whole system (Redis, dispatcher and worker processes) in wall time;
a 3,000-request trace takes minutes per policy. This module drives the dispatcher's own routing
core — ``dio.dispatcher.router.Router``: the backlog rules, the policy, the ``Cluster`` with its
predictors, reservations and prefix records, configured by the same ``DispatcherSettings`` (so
``DIO_SHED_LATE``, ``DIO_MAX_BACKLOG``, ... mean the same here) — against the same
``dio.gpu_worker.sim.scheduler`` models, but on a discrete-event clock: no Redis, no processes, no
sleeping. A run takes seconds, so a policy change can be tried on every trace and load before the
full benchmark confirms it.

What it leaves out, on purpose: network and Redis delays (a few ms), heartbeat staleness (the
telemetry is read fresh at each event) and the worker's own slot limit (the engine queues).
Numbers from it are labelled ``virtual`` and never mixed with the full replay's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dio.dispatcher.backlog import Pending
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.router import Action, Dispatch, Router
from dio.gpu_worker.engine import RequestRejected
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SchedulerEvent, SimRequest
from dio.ops.bench.cluster_run import RunRecord
from dio.ops.local_cluster import parse_workers
from dio.ops.openloop import LOST, Outcome
from dio.ops.traces import Trace
from dio.protocol.models import Completion, JobStatus, Request, WorkerTelemetry

EPOCH_S = 1_000_000.0  # simulated time 0 as a positive timestamp, so submitted_at validates


@dataclass
class _Job:
    index: int  # position in the trace
    request: Request
    arrival: float  # simulated s
    worker: int | None = None
    started: float = 0.0
    first_token: float | None = None


class VirtualCluster:
    """Simulated GPUs (one scheduler each) and one dispatcher's routing core, on one clock."""

    def __init__(self, cluster: str, model: str, settings: DispatcherSettings) -> None:
        self.model = model
        self.router = Router(settings)
        self.gpus: list[BatchScheduler] = []
        self.ids: list[str] = []
        self.profiles: list[str] = []  # the GPU profile name of each worker, as --cluster spells it
        self.errors: dict[str, list[float]] = {}  # |prediction error| (ms) per worker
        self.last_event_s = 0.0
        for spec in parse_workers(cluster):
            for n in range(1, spec.count + 1):
                engine = SimEngine(spec.profile, model)  # not started: its scheduler is driven here
                worker_id = f"{spec.profile}-{n}"
                self.router.cluster.upsert(engine.capacity().worker_info(worker_id, engine.name))
                self.gpus.append(engine.scheduler)
                self.ids.append(worker_id)
                self.profiles.append(spec.profile)

    @property
    def cluster(self) -> Cluster:
        return self.router.cluster

    def run(self, trace: Trace, deadlines_ms: list[float] | None = None) -> list[Outcome]:
        """Replay ``trace`` (arrivals in simulated s); return one outcome per request, in trace order."""
        self._outcomes: list[Outcome | None] = [None] * len(trace)
        self._jobs: dict[str, _Job] = {}
        arrivals = deque(range(len(trace)))
        now = 0.0
        while arrivals or len(self.router.backlog) or self._jobs:
            next_gpu = min((t for g in self.gpus if (t := g.next_event_time()) is not None), default=None)
            next_arrival = trace[arrivals[0]].arrival_s if arrivals else None
            candidates = [t for t in (next_gpu, next_arrival) if t is not None]
            if not candidates:
                # Only backlog left and nothing running: route once more, then give up on the rest.
                self._carry_out(self.router.route(EPOCH_S + now), now)
                self._carry_out(self.router.give_up(), now)
                break
            now = self.last_event_s = min(candidates)
            for row, gpu in enumerate(self.gpus):
                for event in gpu.advance_to(now):
                    self._on_event(row, event)
            while arrivals and trace[arrivals[0]].arrival_s <= now:
                i = arrivals.popleft()
                self._arrive(i, trace, deadlines_ms)
            self._refresh_telemetry()
            self._carry_out(self.router.route(EPOCH_S + now), now)
        return [o if o is not None else Outcome(status=LOST) for o in self._outcomes]

    def _arrive(self, i: int, trace: Trace, deadlines_ms: list[float] | None) -> None:
        r = trace[i]
        request = Request(id=f"r{i}", model=self.model, prompt="x", num_prompt_tokens=r.prompt_tokens,
                          max_tokens=r.output_tokens, submitted_at=EPOCH_S + r.arrival_s,
                          deadline_ms=deadlines_ms[i] if deadlines_ms else None,
                          prefix_hashes=r.prefix_hashes or None)
        self._jobs[request.id] = _Job(i, request, r.arrival_s)
        shed = self.router.accept(Pending(entry_id=request.id, request=request, request_json="",
                                          received_at=EPOCH_S + r.arrival_s))
        if shed is not None:
            self._carry_out([shed], r.arrival_s)

    def _refresh_telemetry(self) -> None:
        for row, gpu in enumerate(self.gpus):
            stats = gpu.stats()
            self.router.cluster.set_telemetry(row, WorkerTelemetry(running=stats.running, waiting=stats.waiting,
                                                                   kv_usage=stats.kv_usage), alive=True)

    def _carry_out(self, actions: Sequence[Action], now: float) -> None:
        for action in actions:
            if isinstance(action, Dispatch):
                self._dispatch(action, now)
            else:
                job = self._jobs.pop(action.item.request.id)
                self._outcomes[job.index] = Outcome(status="rejected", reason=action.reason,
                                                    retry_after_s=action.retry_after_s)

    def _dispatch(self, dispatch: Dispatch, now: float) -> None:
        request, row = dispatch.item.request, dispatch.row
        job = self._jobs[request.id]
        try:
            self.gpus[row].add(SimRequest(request.id, request.prompt_tokens, request.max_tokens,
                                          prefix_hashes=request.prefix_hashes), now)
        except RequestRejected as exc:  # the worker refuses it, as vLLM would (too long)
            self._jobs.pop(request.id)
            self.router.ended(Completion(job=request.id, worker=dispatch.worker_id, status=JobStatus.rejected))
            self._outcomes[job.index] = Outcome(status="rejected", worker=dispatch.worker_id, reason=str(exc))
            return
        job.worker, job.started = row, now

    def _on_event(self, row: int, event: SchedulerEvent) -> None:
        job = self._jobs.get(event.request_id)
        if job is None:
            return
        if event.kind is EventKind.first_token:
            job.first_token = event.time
            return
        del self._jobs[event.request_id]
        worker = self.ids[row]
        completed = event.kind is not EventKind.failed
        error = self.router.ended(Completion(
            job=event.request_id, worker=worker, status=JobStatus.completed if completed else JobStatus.failed,
            prompt_tokens=job.request.prompt_tokens, output_tokens=event.output_tokens,
            cached_tokens=event.cached_tokens, service_ms=(event.time - job.started) * 1000.0))
        if not completed:
            self._outcomes[job.index] = Outcome(status="failed", worker=worker, reason=event.error)
            return
        if error is not None:
            self.errors.setdefault(worker, []).append(abs(error))
        ttft = None if job.first_token is None else (job.first_token - job.arrival) * 1000.0
        self._outcomes[job.index] = Outcome(status="completed", worker=worker,
                                            latency_ms=(event.time - job.arrival) * 1000.0, ttft_ms=ttft,
                                            output_tokens=event.output_tokens)


def record(virtual: VirtualCluster, outcomes: list[Outcome], trace: Trace) -> RunRecord:
    """The run as ``dio.ops.bench.metrics.summarize_run`` reads it (simulated seconds, time scale 1)."""
    seen = virtual.cluster.predictor.seen
    predictors = {wid: {"error_p50_ms": float(np.median(virtual.errors[wid])) if virtual.errors.get(wid) else None,
                        "seen": int(seen[row])} for row, wid in enumerate(virtual.ids)}
    return RunRecord(outcomes=outcomes, wall_s=max(virtual.last_event_s - trace[0].arrival_s, 1e-9),
                     predictors=predictors, worker_gpus=dict(zip(virtual.ids, virtual.profiles, strict=True)))


def replay_virtual(trace: Trace, cluster: str, model: str, settings: DispatcherSettings,
                   deadlines_ms: list[float] | None = None) -> tuple[list[Outcome], VirtualCluster]:
    """Replay ``trace`` on a fresh virtual cluster routed as ``settings`` say; return outcomes and the cluster."""
    virtual = VirtualCluster(cluster, model, settings)
    return virtual.run(trace, deadlines_ms), virtual
