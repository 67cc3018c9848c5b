"""``dio bench replay``: a real trace through the whole system, for every policy, at several loads.

For each load and policy a fresh local cluster (real Redis, one dispatcher process, the simulated
GPUs in one worker process) serves the trace open loop at ``load × capacity``. Capacity is the
roofline estimate, or with ``--calibrate`` the rate a short saturation run measured. Every figure
is in simulated time; the time scale is chosen so the arrivals take about ``target_wall_s``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policies import POLICIES
from dio.ops.bench import plots, report
from dio.ops.bench.calibrate import measure_capacity
from dio.ops.bench.cluster_run import DEFAULT_PREDICTOR, RunConfig, run_trace
from dio.ops.bench.metrics import gpu_shares, latency_cdf, summarize_run
from dio.ops.bench.peer_run import parse_peer, run_peer
from dio.ops.bench.virtual import record as virtual_record
from dio.ops.bench.virtual import replay_virtual
from dio.ops.bench.workload import (
    TRACE_ARRIVALS,
    at_rate,
    auto_time_scale,
    capacity_rps,
    deadlines_ms,
    engine_capacity_rps,
    load_workload,
    span_s,
    trace_name,
)
from dio.ops.local_cluster import parse_workers
from dio.ops.redis_server import ensure_redis
from dio.ops.traces import Trace, trace_stats
from dio.protocol.connection import connect
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.settings import CommonSettings

DEFAULT_CLUSTER = "H100:1,A100-40GB:2,L4:2,T4:3"
HEADLINE_KEYS = ("p50_ms", "p99_ms", "slo_attainment", "goodput_tok_s", "completed", "rejected", "failed", "lost")
TABLE_KEYS = ("p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "slo_attainment", "goodput_tok_s",
              "completed", "rejected", "failed", "lost", "predictor_error_ms")
MIN_DRAIN_WALL_S = 10.0
CAPACITY_SOURCES = {
    "engine": "each GPU's saturation throughput on the trace, its scheduler run alone, summed (ideal routing)",
    "roofline": "dio.gpu_worker.sim.roofline.estimate_capacity_rps per GPU, summed",
    "calibrate": "a saturation run through the whole system with the dio policy (dio.ops.bench.calibrate)",
}


@dataclass
class ReplayConfig:
    """Options of ``dio bench replay`` (times in simulated seconds unless named wall)."""

    trace: str
    cluster: str = DEFAULT_CLUSTER
    model: str = DEFAULT_MODEL
    loads: list[float] = field(default_factory=lambda: [0.7, 0.9])
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    peers: list[str] = field(default_factory=list)  # ROUTER:POLICY, e.g. vllm-router:round_robin (dio.ops.bench.peers)
    slo_k: float = 5.0
    time_scale: float | None = None  # None: chosen so the arrivals at the lowest load take target_wall_s
    target_wall_s: float = 12.0
    drain_wall_s: float = 25.0  # after the last arrival, wait at most this long for the last results
    max_requests: int | None = 3000
    duration_s: float | None = None  # offer each load for this long (simulated s) instead of max_requests
    arrivals: str = TRACE_ARRIVALS
    predictor: str = DEFAULT_PREDICTOR
    deadlines: bool = True  # send each request's SLO as its deadline_ms (DIO routes by it and sheds late ones)
    max_wait_s: float = 60.0
    capacity: str = "engine"  # engine | roofline | calibrate (see CAPACITY_SOURCES)
    seed: int = 0
    out_dir: Path | None = None
    name: str | None = None  # result file stem; default replay-<trace>
    benchmark: str = "replay"
    virtual: bool = False  # simulated time in one process (dio.ops.bench.virtual), no Redis, no processes


@dataclass
class Plan:
    """What a benchmark will run: the trace, the SLOs, the capacity and the time scale."""

    trace: Trace
    deadlines: list[float]
    capacity_rps: float
    capacity: dict[str, Any]
    time_scale: float
    drain_wall_s: float


def validate(config: ReplayConfig) -> None:
    """Refuse unknown policies and empty or non-positive loads before anything starts."""
    if config.capacity not in CAPACITY_SOURCES:
        raise ValueError(f"unknown capacity source {config.capacity!r}; choose from {', '.join(CAPACITY_SOURCES)}")
    unknown = [p for p in config.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if not config.loads or min(config.loads) <= 0:
        raise ValueError(f"loads must be positive fractions of capacity, got {config.loads}")
    gpus = sum(spec.count for spec in parse_workers(config.cluster))
    for peer in config.peers:
        parse_peer(peer, gpus)
    if not config.policies and not config.peers:
        raise ValueError("nothing to run: give --policies or --peers")
    if config.virtual and config.peers:
        raise ValueError("--virtual runs DIO's policies only; peers need the HTTP servers of a full replay")


def plan(config: ReplayConfig, redis_url: str, progress: Any = None) -> Plan:
    """Load the trace, cost its SLOs, estimate (or measure) capacity and pick the time scale."""
    specs = parse_workers(config.cluster)
    trace = load_workload(config.trace, arrivals=config.arrivals, max_requests=config.max_requests, seed=config.seed)
    if len(trace) < 2:
        raise ValueError(f"the trace {config.trace!r} has {len(trace)} requests; a replay needs at least 2")
    deadlines = deadlines_ms(specs, config.model, trace, config.slo_k)
    capacity: dict[str, Any] = {"source": config.capacity,
                                "roofline_rps": round(capacity_rps(specs, config.model, trace), 3),
                                "engine_rps": round(engine_capacity_rps(specs, config.model, trace), 3)}
    rps = capacity["roofline_rps"] if config.capacity == "roofline" else capacity["engine_rps"]
    scale = config.time_scale or _auto_scale(config, trace, rps)
    if config.capacity == "calibrate":
        measured = measure_capacity(redis_url, _run_config(config, "dio", scale, 60.0), trace, rps,
                                    progress=progress)
        if measured is None:
            raise RuntimeError("the calibration run completed too few requests to measure capacity")
        rps = capacity["calibrated_rps"] = round(measured, 3)
        scale = config.time_scale or _auto_scale(config, trace, rps)
    drain = max(config.drain_wall_s, MIN_DRAIN_WALL_S, 1.2 * max(deadlines) / 1000.0 / scale)
    return Plan(trace, deadlines, rps, capacity, scale, drain)


def _auto_scale(config: ReplayConfig, trace: Trace, capacity_rps: float) -> float:
    """Return the time scale at which the arrivals at the lowest load take ``target_wall_s``."""
    span = config.duration_s or span_s(at_rate(trace, min(config.loads) * capacity_rps))
    return auto_time_scale(span, config.target_wall_s)


def offered(the_plan: Plan, load: float, duration_s: float | None) -> tuple[Trace, list[float]]:
    """Return the requests offered at ``load`` (the first ``duration_s`` of arrivals, if given) and their SLOs."""
    trace = at_rate(the_plan.trace, load * the_plan.capacity_rps)
    if duration_s is not None:
        trace = [r for r in trace if r.arrival_s < duration_s]
    return trace, the_plan.deadlines[:len(trace)]


def virtual_settings(config: ReplayConfig, policy: str) -> DispatcherSettings:
    """The dispatcher settings a full run's dispatcher would have: the replay's options over DIO_* variables."""
    return DispatcherSettings(policy=policy, predictor=config.predictor or DEFAULT_PREDICTOR, seed=config.seed,
                              max_wait_s=config.max_wait_s)


def _run_config(config: ReplayConfig, policy: str, time_scale: float, drain_wall_s: float) -> RunConfig:
    return RunConfig(workers=parse_workers(config.cluster), model=config.model, policy=policy,
                     predictor=config.predictor, time_scale=time_scale, drain_wall_s=drain_wall_s,
                     max_wait_s=config.max_wait_s, seed=config.seed)


def run_grid(config: ReplayConfig, the_plan: Plan, redis_url: str) -> tuple[dict, dict]:
    """Run every policy at every load; return figures[policy][load] and CDFs[policy] at the top load."""
    runs: dict[str, dict[str, dict[str, Any]]] = {p: {} for p in [*config.policies, *config.peers]}
    cdfs: dict[str, dict[str, Any]] = {}
    top = max(config.loads)
    with report.progress() as bar:
        overall = bar.add_task(f"{config.benchmark} {trace_name(config.trace)}",
                               total=len(config.loads) * (len(config.policies) + len(config.peers)))
        for load in config.loads:
            trace, deadlines = offered(the_plan, load, config.duration_s)
            for policy in config.policies:
                bar.update(overall, description=f"{trace_name(config.trace)} {policy} @ {load:g}")
                sent = deadlines if config.deadlines else None
                if config.virtual:
                    outcomes, cluster = replay_virtual(trace, config.cluster, config.model,
                                                       virtual_settings(config, policy), sent)
                    record = virtual_record(cluster, outcomes, trace)
                    figures = summarize_run(record, deadlines, 1.0)
                else:
                    run = _run_config(config, policy, the_plan.time_scale, the_plan.drain_wall_s)
                    record = run_trace(redis_url, run, trace, sent, bar)
                    figures = summarize_run(record, deadlines, the_plan.time_scale)
                figures["offered_rps"] = round(load * the_plan.capacity_rps, 3)
                figures["offered_span_s"] = round(span_s(trace), 2)
                runs[policy][f"{load:g}"] = figures
                if load == top:
                    cdfs[policy] = latency_cdf(record.outcomes)
                bar.advance(overall)
            for peer in config.peers:
                bar.update(overall, description=f"{trace_name(config.trace)} {peer} @ {load:g}")
                record, workers = run_peer(peer, config.cluster, config.model, trace, the_plan.time_scale,
                                           the_plan.drain_wall_s)
                figures = summarize_run(record, deadlines, the_plan.time_scale)
                figures.update(workers=workers, gpu_share=gpu_shares(workers), predictor_error_ms=None,
                               offered_rps=round(load * the_plan.capacity_rps, 3),
                               offered_span_s=round(span_s(trace), 2))
                runs[peer][f"{load:g}"] = figures
                if load == top:
                    cdfs[peer] = latency_cdf(record.outcomes)
                bar.advance(overall)
    return runs, cdfs


def headline(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per load: DIO, the best baseline and the best peer (highest SLO attainment, then lowest p99), round-robin."""
    out = {}
    loads = sorted({load for by_load in runs.values() for load in by_load}, key=float)
    for load in loads:
        at = {p: runs[p][load] for p in runs if load in runs[p]}
        baselines = [p for p in at if p != "dio" and ":" not in p]
        peers = [p for p in at if ":" in p]  # ROUTER:POLICY
        entry: dict[str, Any] = {}
        if "dio" in at:
            entry["dio"] = _brief(at["dio"])
        for key, names in (("best_baseline", baselines), ("best_peer", peers)):
            if names:
                best = max(names, key=lambda p: (at[p]["slo_attainment"] or 0.0, -(at[p]["p99_ms"] or float("inf"))))
                entry[key] = {"policy": best, **_brief(at[best])}
        if "round-robin" in at:
            entry["round-robin"] = _brief(at["round-robin"])
        if "dio" in at and "round-robin" in at and at["dio"]["p99_ms"] and at["round-robin"]["p99_ms"]:
            entry["rr_over_dio_p99"] = round(at["round-robin"]["p99_ms"] / at["dio"]["p99_ms"], 2)
        out[load] = entry
    return out


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: figures[k] for k in ("p99_ms", "slo_attainment", "failed", "lost", "goodput_tok_s")}


def print_tables(title: str, runs: dict[str, dict[str, dict[str, Any]]], keys: tuple[str, ...] = TABLE_KEYS) -> None:
    """Print one table per load: a row per policy (simulated ms)."""
    loads = sorted({load for by_load in runs.values() for load in by_load}, key=float)
    for load in loads:
        rows = [[policy, *(runs[policy][load].get(k) for k in keys)] for policy in runs if load in runs[policy]]
        report.console.print(report.table(f"{title} at load {load} (latencies in simulated ms)",
                                          ["policy", *keys], rows))


def run_benchmark(config: ReplayConfig, extra: Callable[[dict], dict] | None = None,
                  table_keys: tuple[str, ...] = TABLE_KEYS, panels: tuple | None = None) -> tuple[Plan, dict]:
    """Plan and run every policy at every load; print tables, write the JSON and the plot.

    Args:
        extra: returns more result-file figures from the runs (the overload benchmark's headline).
        panels: what to plot against load (``plots.load_lines``); None: p99 and SLO attainment.
    """
    validate(config)
    kind = "virtual-" if config.virtual else ""
    name = config.name or f"{config.benchmark}-{kind}{trace_name(config.trace)}"
    with ensure_redis(CommonSettings().redis_url) as server:
        with report.progress() as bar:
            the_plan = plan(config, server.url, bar)
        report.status.print(f"{trace_name(config.trace)}: {len(the_plan.trace)} requests, capacity "
                            f"{the_plan.capacity_rps:.2f} req/s ({the_plan.capacity['source']}), time scale "
                            f"{the_plan.time_scale:g}")
        runs, cdfs = run_grid(config, the_plan, server.url)
        figures = result_figures(config, the_plan, runs) | (extra(runs) if extra else {})
        data = report.payload(config.benchmark, figures, connect(CommonSettings(redis_url=server.url)))
    out_dir = Path(config.out_dir or report.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = (f"{config.benchmark}: {trace_name(config.trace)} on {config.cluster} ({config.model}), "
             f"SLO {config.slo_k:g}x unloaded, capacity {the_plan.capacity_rps:.1f} req/s ({config.capacity})")
    png = plots.load_lines(runs, title, out_dir / f"{name}.png", cdfs, **({"panels": panels} if panels else {}))
    data["figures_png"] = [png.name]
    data["cdf_at_top_load"] = cdfs
    path = report.save(name, data, out_dir)
    print_tables(title, runs, table_keys)
    report.status.print(f"wrote {path} and {png}")
    return the_plan, runs


def run_replay(config: ReplayConfig) -> dict[str, Any]:
    """Run the replay benchmark; return the --json summary (per policy and load)."""
    the_plan, runs = run_benchmark(config)
    return {"trace": trace_name(config.trace), "time_scale": the_plan.time_scale,
            "capacity_rps": round(the_plan.capacity_rps, 3), "capacity_source": the_plan.capacity["source"],
            "latency_unit": "simulated ms",
            "policies": {p: {load: {k: f[k] for k in HEADLINE_KEYS} for load, f in by.items()}
                         for p, by in runs.items()}}


def result_figures(config: ReplayConfig, the_plan: Plan, runs: dict[str, dict[str, dict[str, Any]]]) -> dict:
    """Return the result file's body: the setup, the headline and every run's figures."""
    stats = trace_stats(the_plan.trace)
    return {
        "trace": trace_name(config.trace), "trace_file": str(config.trace), "arrivals": config.arrivals,
        "requests": len(the_plan.trace), "duration_s": config.duration_s, "cluster": config.cluster,
        "model": config.model,
        "loads": config.loads, "policies": config.policies, "peers": config.peers, "predictor": config.predictor,
        "slo_k": config.slo_k,
        "deadlines_sent": config.deadlines, "max_wait_s": config.max_wait_s, "virtual": config.virtual,
        "capacity": {**the_plan.capacity, "used_rps": round(the_plan.capacity_rps, 3),
                     "meaning": CAPACITY_SOURCES[config.capacity]},
        "time_scale": the_plan.time_scale, "drain_wall_s": round(the_plan.drain_wall_s, 1),
        "latency_unit": "simulated ms" + ("" if config.virtual else " (wall ms x time_scale)"),
        "trace_stats": {k: v for k, v in stats.__dict__.items() if k not in ("duration_s", "mean_rps")},
        "headline": headline(runs),
        "runs": runs,
    }
