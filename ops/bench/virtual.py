"""A replay in simulated time, in one process: the real routing code against the simulated GPUs' schedulers.

``dio bench replay`` runs the whole system (Redis, dispatcher and worker processes) in wall time;
a 3,000-request trace takes minutes per policy. This module runs the same pieces that decide
where requests go — ``dio.dispatcher.policies`` over a ``dio.dispatcher.cluster.Cluster`` with its
predictors, reservations and backlog rules — against the same ``dio.gpu_worker.sim.scheduler``
models, but on a discrete-event clock: no Redis, no processes, no sleeping. A run takes seconds,
so a policy change can be tried on every trace and load before the full benchmark confirms it.

What it leaves out, on purpose: network and Redis delays (a few ms), heartbeat staleness (the
telemetry is read fresh at each event) and the worker's own slot limit (the engine queues).
Numbers from it are labelled ``virtual`` and never mixed with the full replay's.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from dio.dispatcher.backlog import MAX_WAITS_PER_ROUTE, expired
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policies import make_policy
from dio.dispatcher.scheduling import Decision
from dio.dispatcher.scheduling import Scheduler as Policy
from dio.gpu_worker.engine import RequestRejected
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.scheduler import EventKind, Scheduler, SimRequest
from dio.ops.bench.cluster_run import RunRecord
from dio.ops.local_cluster import parse_workers
from dio.ops.openloop import LOST, Outcome
from dio.ops.traces import Trace
from dio.protocol.models import Request, WorkerTelemetry


@dataclass
class _Job:
    index: int
    request: Request
    arrival: float
    worker: int | None = None
    started: float = 0.0
    first_token: float | None = None


class VirtualCluster:
    """Simulated GPUs (one scheduler each) and one dispatcher's routing state, on one clock."""

    def __init__(self, cluster: str, model: str, policy: str, predictor: str = "vector", seed: int = 0,
                 max_wait_s: float = 60.0, **policy_options: object) -> None:
        self.model = model
        self.gpus: list[Scheduler] = []
        self.ids: list[str] = []
        self.profiles: list[str] = []  # the GPU profile name of each worker, as --cluster spells it
        self.cluster = Cluster(predictor_kind=predictor)
        self.policy: Policy = make_policy(policy, seed=seed, **policy_options)
        self.max_wait_s = max_wait_s
        self.errors: dict[str, list[float]] = {}  # |prediction error| (ms) per worker
        self.last_event_s = 0.0
        for spec in parse_workers(cluster):
            for n in range(1, spec.count + 1):
                engine = SimEngine(spec.profile, model)  # not started: its scheduler is driven here
                worker_id = f"{spec.profile}-{n}"
                self.cluster.upsert(engine.capacity().worker_info(worker_id, engine.name))
                self.gpus.append(engine.scheduler)
                self.ids.append(worker_id)
                self.profiles.append(spec.profile)

    def run(self, trace: Trace, deadlines_ms: list[float] | None = None) -> list[Outcome]:
        """Replay ``trace`` (arrivals in simulated s); return one outcome per request, in trace order."""
        outcomes: list[Outcome | None] = [None] * len(trace)
        jobs: dict[str, _Job] = {}
        backlog: deque[_Job] = deque()
        arrivals = deque(range(len(trace)))
        t0 = 1_000_000.0  # a positive "epoch" so submitted_at validates
        now = 0.0
        while arrivals or backlog or jobs:
            next_gpu = min((t for g in self.gpus if (t := g.next_event_time()) is not None), default=None)
            next_arrival = trace[arrivals[0]].arrival_s if arrivals else None
            candidates = [t for t in (next_gpu, next_arrival) if t is not None]
            if not candidates:
                # Only backlog left and nothing running: route once more, then give up on the rest.
                self._route(backlog, jobs, outcomes, now, t0, final=True)
                break
            now = self.last_event_s = min(candidates)
            for row, gpu in enumerate(self.gpus):
                for event in gpu.advance_to(now):
                    self._on_event(row, event, jobs, outcomes)
            while arrivals and trace[arrivals[0]].arrival_s <= now:
                i = arrivals.popleft()
                backlog.append(self._job(i, trace, deadlines_ms, t0))
            self._refresh_telemetry()
            self._route(backlog, jobs, outcomes, now, t0)
        return [o if o is not None else Outcome(status=LOST) for o in outcomes]

    def _job(self, i: int, trace: Trace, deadlines_ms: list[float] | None, t0: float) -> _Job:
        r = trace[i]
        request = Request(id=f"r{i}", model=self.model, prompt="x", num_prompt_tokens=r.prompt_tokens,
                          max_tokens=r.output_tokens, submitted_at=t0 + r.arrival_s,
                          deadline_ms=deadlines_ms[i] if deadlines_ms else None,
                          prefix_hashes=r.prefix_hashes or None)
        return _Job(i, request, r.arrival_s)

    def _refresh_telemetry(self) -> None:
        for row, gpu in enumerate(self.gpus):
            stats = gpu.stats()
            self.cluster.set_telemetry(row, WorkerTelemetry(running=stats.running, waiting=stats.waiting,
                                                            kv_usage=stats.kv_usage), alive=True)

    def _route(self, backlog: deque[_Job], jobs: dict[str, _Job], outcomes: list, now: float, t0: float,
               final: bool = False) -> None:
        keep: deque[_Job] = deque()
        waits = 0
        while backlog:
            job = backlog.popleft()
            if waits >= MAX_WAITS_PER_ROUTE and not final:
                keep.append(job)
                continue
            decision = self.policy.decide(job.request, self.cluster, t0 + now)
            if decision.row is not None:
                waits = 0
                self._dispatch(job, decision, jobs, outcomes, now)
            elif decision.reject or final:
                outcomes[job.index] = Outcome(status="rejected", reason=decision.reason,
                                              retry_after_s=decision.retry_after_s)
            elif expired(job.request, t0 + job.arrival, t0 + now, self.max_wait_s):
                outcomes[job.index] = Outcome(status="rejected", reason=f"no capacity: {decision.reason}")
            else:
                waits += 1
                keep.append(job)
        backlog.extend(keep)

    def _dispatch(self, job: _Job, decision: Decision, jobs: dict[str, _Job], outcomes: list, now: float) -> None:
        request, row = job.request, decision.row
        assert row is not None
        try:
            self.gpus[row].add(SimRequest(request.id, request.prompt_tokens, request.max_tokens,
                                          prefix_hashes=request.prefix_hashes), now)
        except RequestRejected as exc:  # the worker refuses it, as vLLM would (too long)
            outcomes[job.index] = Outcome(status="rejected", worker=self.ids[row], reason=str(exc))
            return
        self.cluster.reserve(row, request.id, request.kv_tokens, decision.ceiling, decision.prompt_tokens)
        self.cluster.prefix.record(request.prefix_hashes, self.ids[row])
        job.worker, job.started = row, now
        jobs[request.id] = job

    def _on_event(self, row: int, event, jobs: dict[str, _Job], outcomes: list) -> None:
        job = jobs.get(event.request_id)
        if job is None:
            return
        if event.kind is EventKind.first_token:
            job.first_token = event.time
            return
        del jobs[event.request_id]
        worker = self.ids[row]
        if event.kind is EventKind.failed:
            self.cluster.release(row, event.request_id)
            outcomes[job.index] = Outcome(status="failed", worker=worker, reason=event.error)
            return
        error = self.cluster.complete(row, event.request_id, job.request.prompt_tokens, event.cached_tokens,
                                      event.output_tokens, (event.time - job.started) * 1000.0)
        self.errors.setdefault(worker, []).append(abs(error))
        ttft = None if job.first_token is None else (job.first_token - job.arrival) * 1000.0
        outcomes[job.index] = Outcome(status="completed", worker=worker, latency_ms=(event.time - job.arrival) * 1000.0,
                                      ttft_ms=ttft, output_tokens=event.output_tokens)


def record(virtual: VirtualCluster, outcomes: list[Outcome], trace: Trace) -> RunRecord:
    """The run as ``dio.ops.bench.metrics.summarize_run`` reads it (simulated seconds, time scale 1)."""
    seen = virtual.cluster.predictor.seen
    predictors = {wid: {"error_p50_ms": float(np.median(virtual.errors[wid])) if virtual.errors.get(wid) else None,
                        "seen": int(seen[row])} for row, wid in enumerate(virtual.ids)}
    return RunRecord(outcomes=outcomes, wall_s=max(virtual.last_event_s - trace[0].arrival_s, 1e-9),
                     predictors=predictors, worker_gpus=dict(zip(virtual.ids, virtual.profiles, strict=True)))


def replay_virtual(trace: Trace, cluster: str, model: str, policy: str, deadlines_ms: list[float] | None = None,
                   predictor: str = "vector", seed: int = 0, max_wait_s: float = 60.0, **policy_options: object,
                   ) -> tuple[list[Outcome], VirtualCluster]:
    """Replay ``trace`` on a fresh virtual cluster with ``policy``; return outcomes and the cluster."""
    virtual = VirtualCluster(cluster, model, policy, predictor=predictor, seed=seed, max_wait_s=max_wait_s,
                             **policy_options)
    return virtual.run(trace, deadlines_ms), virtual

