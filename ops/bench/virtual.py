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

Output lengths: by default each request is sent with ``max_tokens`` = its true output length (an
oracle: the router knows where it ends). With ``max_tokens=CAP`` every request carries that cap,
as a client that cannot know its output sends it, and the true length stays inside the simulated
engine (``SimRequest.eos_tokens``: the model "stops at EOS"). Besides the outcomes, a run counts
what the engines and the router did (``VirtualCluster.counters``): preemptions per request and per
GPU, the route decisions that waited because KV admission found no room, and each GPU's KV cache
use (and DIO's reservations) averaged over time.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dio.dispatcher.backlog import Pending
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policy import Ask, Filter
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
KV_ADMISSION = "kv-admission"  # the name of the filter whose holds are counted (dio.dispatcher.filters)


@dataclass
class _Job:
    index: int  # position in the trace
    request: Request
    arrival: float  # simulated s
    eos_tokens: int | None = None  # where the simulated model stops (None: at max_tokens)
    worker: int | None = None
    started: float = 0.0
    first_token: float | None = None


@dataclass
class RunCounters:
    """What the engines and the router did during one run, besides each request's outcome.

    Per request (trace order): ``preemptions`` (times its engine preempted it) and ``kv_held``
    (whether a route decision ever left it waiting because KV admission found no room on any
    worker). Per worker row: ``gpu_preemptions``, and ``kv_used`` / ``kv_reserved``, the
    time-averaged share of its KV cache in use (the engine's own count) and reserved by the
    router (``Cluster.reserved_kv``), from the first arrival to the last event.
    """

    preemptions: list[int]
    kv_held: list[bool]
    kv_hold_decisions: int = 0
    gpu_preemptions: list[int] = field(default_factory=list)
    kv_used: list[float] = field(default_factory=list)
    kv_reserved: list[float] = field(default_factory=list)


class _CountHolds(Filter):
    """A filter that behaves as ``inner`` and records each request it leaves with no worker."""

    def __init__(self, inner: Filter, held: set[str], counter: list[int]) -> None:
        self.inner, self.held, self.counter = inner, held, counter
        self.name, self.permanent = inner.name, inner.permanent

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        return self.inner.mask(ask, cluster, now)

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        # The policy asks for the reason only when this filter removed every remaining worker.
        self.held.add(ask.request.id)
        self.counter[0] += 1
        return self.inner.explain(ask, cluster)


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
        self._held: set[str] = set()  # request ids KV admission left waiting at least once
        self._hold_decisions = [0]
        self.router.policy.filters = [_CountHolds(f, self._held, self._hold_decisions) if f.name == KV_ADMISSION
                                      else f for f in self.router.policy.filters]
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

    def run(self, trace: Trace, deadlines_ms: list[float] | None = None, *, max_tokens: int | None = None,
            ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> list[Outcome]:
        """Replay ``trace`` (arrivals in simulated s); return one outcome per request, in trace order.

        Args:
            deadlines_ms: each request's ``deadline_ms`` (None: no deadlines).
            max_tokens: the cap every request is sent with, its true output length kept inside the
                engine (where the model stops); None: each request's true length (an oracle).
            ttft_slo_ms, tpot_slo_ms: the SLO every request carries (``Request.ttft_slo_ms``, ...).
        """
        self._outcomes: list[Outcome | None] = [None] * len(trace)
        self._jobs: dict[str, _Job] = {}
        self._shape = (max_tokens, ttft_slo_ms, tpot_slo_ms)
        self.counters = RunCounters(preemptions=[0] * len(trace), kv_held=[False] * len(trace),
                                    gpu_preemptions=[0] * len(self.gpus), kv_used=[0.0] * len(self.gpus),
                                    kv_reserved=[0.0] * len(self.gpus))
        self._held.clear()
        self._hold_decisions[0] = 0
        self._kv_area = np.zeros((2, len(self.gpus)))  # ∫ used share dt, ∫ reserved share dt
        self._kv_last: tuple[float, np.ndarray] | None = None
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
            self._refresh_telemetry(now)
            self._carry_out(self.router.route(EPOCH_S + now), now)
        self._finish_counters(trace)
        return [o if o is not None else Outcome(status=LOST) for o in self._outcomes]

    def _finish_counters(self, trace: Trace) -> None:
        counters = self.counters
        counters.kv_hold_decisions = self._hold_decisions[0]
        for rid in self._held:
            counters.kv_held[int(rid[1:])] = True
        counters.gpu_preemptions = [gpu.stats().preemptions for gpu in self.gpus]
        span = self.last_event_s - trace[0].arrival_s if trace else 0.0
        if span > 0:
            counters.kv_used, counters.kv_reserved = (self._kv_area / span).round(4).tolist()

    def _arrive(self, i: int, trace: Trace, deadlines_ms: list[float] | None) -> None:
        r = trace[i]
        cap, ttft_slo, tpot_slo = self._shape
        request = Request(id=f"r{i}", model=self.model, prompt="x", num_prompt_tokens=r.prompt_tokens,
                          max_tokens=r.output_tokens if cap is None else cap, submitted_at=EPOCH_S + r.arrival_s,
                          deadline_ms=deadlines_ms[i] if deadlines_ms else None,
                          ttft_slo_ms=ttft_slo, tpot_slo_ms=tpot_slo,
                          prefix_hashes=r.prefix_hashes or None)
        self._jobs[request.id] = _Job(i, request, r.arrival_s, eos_tokens=None if cap is None else r.output_tokens)
        shed = self.router.accept(Pending(entry_id=request.id, request=request, request_json="",
                                          received_at=EPOCH_S + r.arrival_s))
        if shed is not None:
            self._carry_out([shed], r.arrival_s)

    def _refresh_telemetry(self, now: float) -> None:
        used = np.zeros(len(self.gpus))
        for row, gpu in enumerate(self.gpus):
            stats = gpu.stats()
            used[row] = stats.kv_usage
            self.router.cluster.set_telemetry(row, WorkerTelemetry(running=stats.running, waiting=stats.waiting,
                                                                   kv_usage=stats.kv_usage), alive=True)
        cluster = self.router.cluster
        shares = np.stack([used, cluster.reserved_kv / np.maximum(cluster.kv_capacity, 1)])
        if self._kv_last is not None:  # trapezoids between events
            then, before = self._kv_last
            self._kv_area += (now - then) * (before + shares) / 2.0
        self._kv_last = (now, shares)

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
                                          eos_tokens=job.eos_tokens, prefix_hashes=request.prefix_hashes), now)
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
        self.counters.preemptions[job.index] = event.preemptions
        worker = self.ids[row]
        completed = event.kind is not EventKind.failed
        error = self.router.ended(Completion(
            job=event.request_id, worker=worker, status=JobStatus.completed if completed else JobStatus.failed,
            prompt_tokens=job.request.prompt_tokens, output_tokens=event.output_tokens,
            cached_tokens=event.cached_tokens, service_ms=(event.time - job.started) * 1000.0,
            ttft_ms=None if job.first_token is None else (job.first_token - job.started) * 1000.0))
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
                   deadlines_ms: list[float] | None = None, *, max_tokens: int | None = None,
                   ttft_slo_ms: float | None = None,
                   tpot_slo_ms: float | None = None) -> tuple[list[Outcome], VirtualCluster]:
    """Replay ``trace`` on a fresh virtual cluster routed as ``settings`` say; return outcomes and the cluster.

    ``max_tokens``, ``ttft_slo_ms``, ``tpot_slo_ms``: see ``VirtualCluster.run``.
    """
    virtual = VirtualCluster(cluster, model, settings)
    outcomes = virtual.run(trace, deadlines_ms, max_tokens=max_tokens, ttft_slo_ms=ttft_slo_ms,
                           tpot_slo_ms=tpot_slo_ms)
    return outcomes, virtual
