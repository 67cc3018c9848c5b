"""One benchmark run: a fresh local cluster, a trace replayed open loop, what the client saw.

Every run starts its own dispatcher and simulated workers under a private key prefix (deleted
afterwards), so runs never share a warm predictor, a queue or a reservation. Settings that are
wall-clock durations in DIO (heartbeats, telemetry refresh, how long a request may wait) are
scaled by the time scale, so the cluster behaves the same in simulated time at any time scale.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from rich.progress import Progress

from dio.client import Client
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.predictor_store import read_states
from dio.ops.bench.cpu import CpuMeter
from dio.ops.local_cluster import LocalCluster, WorkerSpec, worker_ids
from dio.ops.openloop import Outcome, collect, request_fields, submit_on_schedule, to_outcome
from dio.ops.traces import Trace, TraceRequest
from dio.protocol.connection import connect, delete_keys
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.settings import CommonSettings

DEFAULT_PREDICTOR = DispatcherSettings.model_fields["predictor"].default  # what `dio dispatcher` uses
HEARTBEAT_SIM_S = 0.5  # a worker's telemetry is this old at most, in simulated seconds (DIO's default)
MIN_HEARTBEAT_WALL_S = 0.05  # ...but a heartbeat never runs more often than this (CPU)
WORKER_DRAIN_WALL_S = 2.0  # at the end of a run, workers stop after this long, finished or not


@dataclass
class RunConfig:
    """How one run is set up (durations in simulated seconds unless named wall)."""

    workers: list[WorkerSpec]
    model: str = DEFAULT_MODEL
    policy: str = "dio"
    predictor: str = DEFAULT_PREDICTOR
    time_scale: float = 10.0
    drain_wall_s: float = 60.0  # after the last submission, wait this long for the last results
    max_wait_s: float = 60.0  # an interactive request without deadline waits at most this long
    one_worker_process: bool = True
    seed: int = 0
    max_tokens: int | None = None  # every request's cap (true length to the simulated engine); None: the true length
    ttft_slo_ms: float | None = None  # every request's SLO, simulated ms (sent in wall ms: / time_scale)
    tpot_slo_ms: float | None = None

    def env(self) -> dict[str, str]:
        """Return the environment that scales DIO's wall-clock settings to simulated time."""
        beat = max(HEARTBEAT_SIM_S / self.time_scale, MIN_HEARTBEAT_WALL_S)
        return {"DIO_MAX_WAIT_S": repr(self.max_wait_s / self.time_scale), "DIO_HEARTBEAT_INTERVAL_S": repr(beat),
                "DIO_WORKER_REFRESH_S": repr(beat), "DIO_DRAIN_TIMEOUT_S": repr(WORKER_DRAIN_WALL_S),
                "DIO_SEED": str(self.seed)}


@dataclass
class RunRecord:
    """What one run produced: one Outcome per request, in trace order, and the run's context."""

    outcomes: list[Outcome]
    wall_s: float  # first submission → last result (or the end of the drain window)
    predictors: dict[str, dict[str, Any]] = field(default_factory=dict)  # the {prefix}predictor hash
    cpu: dict[str, float | None] = field(default_factory=dict)
    worker_gpus: dict[str, str] = field(default_factory=dict)  # worker id → GPU profile
    overhead_s: dict[str, float] = field(default_factory=dict)  # wall seconds to start and stop the cluster


def run_trace(redis_url: str, config: RunConfig, trace: Trace, deadlines_ms: list[float] | None = None,
              progress: Progress | None = None) -> RunRecord:
    """Replay ``trace`` on a fresh cluster; ``deadlines_ms`` (simulated) are sent as request deadlines."""
    prefix = f"{{dio-bench-{uuid.uuid4().hex[:8]}}}:"
    cluster = LocalCluster(redis_url, config.workers, key_prefix=prefix, policy=config.policy,
                           predictor=config.predictor, model=config.model, time_scale=config.time_scale,
                           extra_env=config.env(), one_worker_process=config.one_worker_process)
    record: RunRecord | None = None
    began = time.monotonic()
    try:
        cluster.start()
        setup_s = time.monotonic() - began
        record = _replay(redis_url, prefix, cluster, config, trace, deadlines_ms, progress)
    finally:
        ending = time.monotonic()
        cluster.stop()
        if record is not None:
            record.predictors = read_predictors(redis_url, prefix)  # persisted by the dispatcher as it stopped
        delete_prefix(redis_url, prefix)
    record.overhead_s = {"start": round(setup_s, 2), "stop": round(time.monotonic() - ending, 2)}
    return record


def _replay(redis_url: str, prefix: str, cluster: LocalCluster, config: RunConfig, trace: Trace,
            deadlines_ms: list[float] | None, progress: Progress | None) -> RunRecord:
    def fields(i: int, request: TraceRequest) -> dict:
        deadline = None if deadlines_ms is None else deadlines_ms[i] / config.time_scale
        out = request_fields(request, i, config.model, deadline, max_tokens=config.max_tokens)
        for key in ("ttft_slo_ms", "tpot_slo_ms"):
            if (slo := getattr(config, key)) is not None:
                out[key] = slo / config.time_scale
        return out

    task = progress.add_task(f"{config.policy}: submitting", total=len(trace)) if progress else None
    meter = CpuMeter(_pids(cluster), connect(CommonSettings(redis_url=redis_url)))
    meter.start()
    started = time.monotonic()
    with Client(redis_url=redis_url, key_prefix=prefix) as client:
        handles = submit_on_schedule(client, trace, config.time_scale, fields,
                                     on_submit=lambda n: progress.advance(task, n) if progress else None)
        if progress:
            progress.reset(task, total=len(trace), description=f"{config.policy}: results")
        results = collect(client, handles, config.drain_wall_s,
                          on_result=lambda: progress.advance(task) if progress else None)
    wall_s = time.monotonic() - started
    cpu = meter.stop()
    if progress:
        progress.remove_task(task)
    outcomes = [to_outcome(r, config.time_scale) for r in results]
    return RunRecord(outcomes, wall_s, cpu=cpu, worker_gpus={wid: gpu for gpu, wid in worker_ids(config.workers)})


def _pids(cluster: LocalCluster) -> dict[str, int]:
    pids = {"dispatcher": cluster.dispatcher_pid} if cluster.dispatcher_pid else {}
    for i, pid in enumerate(cluster.worker_pids):
        pids["workers" if len(cluster.worker_pids) == 1 else f"worker-{i + 1}"] = pid
    return pids


def read_predictors(redis_url: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Return the dispatcher's persisted predictor state per worker (``{prefix}predictor``)."""
    settings = CommonSettings(redis_url=redis_url, key_prefix=prefix)
    return read_states(connect(settings), settings.keys)


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key under ``prefix``; return how many."""
    settings = CommonSettings(redis_url=redis_url, key_prefix=prefix)
    return delete_keys(connect(settings), settings.keys)
