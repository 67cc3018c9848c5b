"""``dio bench convergence``: how fast each predictor learns a GPU's latency, cold and after drift.

Pure and deterministic: each GPU's scheduler (``dio.gpu_worker.sim.scheduler``, the simulated
engine's core) is driven directly in simulated time, no Redis, no processes. Requests from a trace
arrive open loop (Poisson) at ``load`` × the GPU's saturation throughput; every completion's
latency (from the worker starting the job to its end, as the worker daemon reports it) is fed to
a fresh row of each predictor — ``seed``, ``vector``, ``rls`` — exactly as the dispatcher feeds it,
with the KV in flight when the request was sent (in units of the model's weights) as the load
feature. The error recorded is the
one the dispatcher records: |ŷ − y| of the prediction made just before learning the completion.

After ``completions`` completions the GPU suddenly slows down (its compute and bandwidth divided
by ``slowdown``; arrivals slow by the same factor, so utilisation stays the same) and the curve
continues: drift. Each curve is the median (and p90) over ``repeats`` runs with different seeds
and trace windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from dio.dispatcher.predictors import PREDICTORS, make_predictor
from dio.dispatcher.prior import roofline_prior
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SimRequest
from dio.ops.bench import plots, report
from dio.ops.bench.workload import engine_saturation_rps, load_workload, trace_name
from dio.ops.traces import Trace, poisson_arrivals, sample
from dio.protocol.defaults import DEFAULT_MODEL

PHASES = ("cold", "drift")
PRIMED = "vector+prior"  # the vector predictor started from the roofline prior


@dataclass
class ConvergenceConfig:
    """Options of ``dio bench convergence``."""

    trace: str = "azure-conv"
    gpus: list[str] = field(default_factory=lambda: ["H100", "A100-40GB", "L4", "T4"])
    predictors: list[str] = field(default_factory=lambda: [*PREDICTORS, PRIMED])
    model: str = DEFAULT_MODEL
    load: float = 0.5  # arrivals as a fraction of the GPU's saturation throughput
    completions: int = 200  # per phase
    slowdown: float = 2.0
    repeats: int = 20
    threshold_ms: float = 50.0
    relative_threshold: float = 0.1  # also: completions until the median |error| / latency stays under this
    window: int = 5  # completions averaged into one point of the curve
    hold: int = 10  # the curve must stay under the threshold this many points to count as converged
    seed: int = 0
    out_dir: Path | None = None
    name: str = "convergence"


@dataclass
class Job:
    """One request of the simulation, with what the dispatcher would know when sending it."""

    prompt: int
    output: int
    arrival: float
    load: float  # KV in flight on the worker with this request, in units of the weights (the load feature)


def workload(trace: Trace, count: int, rate_rps: float, seed: int) -> list[tuple[int, int, float]]:
    """Return ``count`` (prompt, output, arrival) from a random window of the trace, Poisson arrivals."""
    window = sample(trace, count, seed)
    times = poisson_arrivals(len(window), rate_rps, seed)
    return [(r.prompt_tokens, r.output_tokens, t) for r, t in zip(window, times, strict=True)]


def simulate(profile: str, model: str, trace: Trace, config: ConvergenceConfig, seed: int) -> list[tuple[Job, float]]:
    """Run one GPU through both phases; return (job, latency in simulated ms) in completion order."""
    gpu, shape = get_profile(profile), get_model(model)
    scheduler = BatchScheduler(gpu, shape)
    load_unit = shape.weight_bytes / shape.kv_bytes_per_token  # KV tokens as heavy as the weights
    fits = [r for r in trace if r.prompt_tokens + r.output_tokens <= scheduler.max_model_len]
    rate = config.load * engine_saturation_rps(profile, model, fits)
    count = 2 * config.completions
    arrivals = workload(fits, count * 2, rate, seed)  # twice as many: the drift phase arrives slower
    jobs: dict[str, Job] = {}
    in_flight_kv = 0
    done: list[tuple[Job, float]] = []
    drift_at: float | None = None
    i = 0
    while len(done) < count and i <= len(arrivals):
        arrival = _next_arrival(arrivals, i, drift_at, config.slowdown)
        next_event = scheduler.next_event_time()
        if arrival is not None and (next_event is None or arrival <= next_event):
            prompt, output, _ = arrivals[i]
            in_flight_kv += prompt + output
            jobs[str(i)] = Job(prompt, output, arrival, in_flight_kv / load_unit)
            scheduler.add(SimRequest(str(i), prompt, output), arrival)
            i += 1
            continue
        if next_event is None:
            break
        for event in scheduler.advance_to(next_event):
            if event.kind is EventKind.first_token:
                continue
            job = jobs.pop(event.request_id)
            in_flight_kv -= job.prompt + job.output
            if event.kind is EventKind.finished:
                done.append((job, (event.time - job.arrival) * 1000.0))
        if drift_at is None and len(done) >= config.completions:
            drift_at = scheduler.now
            scheduler.gpu = replace(gpu, peak_flops=gpu.peak_flops / config.slowdown,
                                    mem_bandwidth_bytes_s=gpu.mem_bandwidth_bytes_s / config.slowdown)
    return done[:count]


def _next_arrival(arrivals: list[tuple[int, int, float]], i: int, drift_at: float | None,
                  slowdown: float) -> float | None:
    """Return request i's arrival time; after the drift, gaps stretch by ``slowdown``."""
    if i >= len(arrivals):
        return None
    t = arrivals[i][2]
    if drift_at is None or t <= drift_at:
        return t
    return drift_at + (t - drift_at) * slowdown


def gpu_prior(gpu: str, model: str) -> np.ndarray | None:
    """The roofline prior (``dio.dispatcher.prior``) of a simulated GPU, from what its worker registers."""
    engine = SimEngine(gpu, model)  # not started: only its registration is read
    return roofline_prior(engine.capacity().worker_info("w", engine.name))


def errors(done: list[tuple[Job, float]], kind: str, prior: np.ndarray | None = None) -> np.ndarray:
    """Return |error| (ms) of a fresh predictor row over the completions, in order.

    ``kind`` ``vector+prior`` is the vector predictor started from ``prior``, as the dispatcher
    starts a worker that registered its datasheet.
    """
    base, _, primed = kind.partition("+")
    predictor = make_predictor(base)
    row = predictor.add_row()
    if primed and prior is not None:
        predictor.prime(row, prior)
    return np.asarray([abs(predictor.update(row, job.prompt, job.output, latency, job.load))
                       for job, latency in done])


def features(done: list[tuple[Job, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Return the vector predictors' feature rows and the latencies of the completions."""
    from dio.dispatcher.predictors import VectorNLMS

    rows = VectorNLMS()
    x = np.asarray([rows.features(job.prompt, job.output, job.load) for job, _ in done])
    return x, np.asarray([latency for _, latency in done])


def floor_ms(done: list[tuple[Job, float]]) -> float:
    """Return the median |residual| of an offline least-squares fit on the same features (in sample).

    No linear predictor on these features, online or not, does much better: it is the noise the
    features cannot explain (batch composition, queueing inside the engine).
    """
    x, y = features(done)
    weights, *_ = np.linalg.lstsq(x, y, rcond=None)
    return float(np.median(np.abs(x @ weights - y)))


def curve(samples: np.ndarray, q: float, window: int) -> np.ndarray:
    """Return the q-th percentile across runs of the error averaged over ``window`` completions."""
    kernel = np.ones(window) / window
    smoothed = np.asarray([np.convolve(run, kernel, mode="valid") for run in samples])
    return np.percentile(smoothed, q, axis=0)


def completions_to(median: np.ndarray, threshold: float, hold: int) -> int | None:
    """Return the completions seen before the curve stays under ``threshold`` for ``hold`` points."""
    below = median < threshold
    for k in range(len(below) - hold + 1):
        if below[k:k + hold].all():
            return k
    return None


def analyse(samples: np.ndarray, latencies: np.ndarray, config: ConvergenceConfig) -> dict[str, Any]:
    """Return the curves and convergence counts of one GPU and predictor (arrays: runs × completions)."""
    n = config.completions
    out: dict[str, Any] = {}
    for phase, part in (("cold", slice(0, n)), ("drift", slice(n, None))):
        errors_ms, relative = samples[:, part], samples[:, part] / latencies[:, part]
        median = curve(errors_ms, 50, config.window)
        median_relative = curve(relative, 50, config.window)
        out[phase] = {"completions_to_threshold": completions_to(median, config.threshold_ms, config.hold),
                      "completions_to_relative": completions_to(median_relative, config.relative_threshold,
                                                                config.hold),
                      "median_ms": _rounded(median), "p90_ms": _rounded(curve(errors_ms, 90, config.window)),
                      "median_relative": _rounded(median_relative, 4),
                      "final_median_ms": round(float(np.median(errors_ms[:, -config.window * 4:])), 1),
                      "final_median_relative": round(float(np.median(relative[:, -config.window * 4:])), 4),
                      "latency_p50_ms": round(float(np.median(latencies[:, part])), 1)}
    return out


def _rounded(values: np.ndarray, digits: int = 1) -> list[float]:
    return [round(float(v), digits) for v in values]


def run_convergence(config: ConvergenceConfig) -> dict[str, Any]:
    """Run the benchmark, print its table, write its JSON and plot; return the --json summary."""
    trace = load_workload(config.trace, seed=config.seed)
    results: dict[str, dict[str, Any]] = {kind: {} for kind in config.predictors}
    floors: dict[str, dict[str, float]] = {}
    with report.progress() as bar:
        task = bar.add_task("convergence", total=len(config.gpus) * config.repeats)
        for gpu in config.gpus:
            runs = []
            for r in range(config.repeats):
                runs.append(simulate(gpu, config.model, trace, config, config.seed + r))
                bar.advance(task)
            count = min(len(done) for done in runs)
            latencies = np.asarray([[y for _, y in done[:count]] for done in runs])
            floors[gpu] = {phase: round(float(np.median([floor_ms(done[part]) for done in runs])), 1)
                           for phase, part in (("cold", slice(0, config.completions)),
                                               ("drift", slice(config.completions, count)))}
            prior = gpu_prior(gpu, config.model)
            for kind in config.predictors:
                samples = np.asarray([errors(done[:count], kind, prior) for done in runs])
                results[kind][gpu] = analyse(samples, latencies, config)
    summary = headline(results, config)
    out_dir = Path(config.out_dir or report.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot(results, config, out_dir / f"{config.name}.png")
    figures = {"trace": trace_name(config.trace), "model": config.model, "gpus": config.gpus, "load": config.load,
               "completions_per_phase": config.completions, "slowdown": config.slowdown, "repeats": config.repeats,
               "threshold_ms": config.threshold_ms, "window": config.window, "hold": config.hold,
               "latency_unit": "simulated ms", "predictors": summary, "least_squares_floor_ms": floors,
               "curves": results, "figures_png": [png.name]}
    path = report.save(config.name, report.payload("convergence", figures), out_dir)
    print_table(summary, floors, config)
    report.status.print(f"wrote {path} and {png}")
    return {"threshold_ms": config.threshold_ms, "latency_unit": "simulated ms",
            "predictors": {kind: {k: v for k, v in entry.items() if k != "by_gpu"} for kind, entry in summary.items()},
            "least_squares_floor_ms": floors}


def headline(results: dict[str, dict[str, Any]], config: ConvergenceConfig) -> dict[str, Any]:
    """Per predictor: completions to the threshold, cold and after drift (worst GPU; None: never), per GPU."""
    out = {}
    for kind, by_gpu in results.items():
        per_gpu = {gpu: {phase: r[phase]["completions_to_threshold"] for phase in PHASES} |
                   {f"{phase}_relative": r[phase]["completions_to_relative"] for phase in PHASES} |
                   {f"{phase}_final_median_ms": r[phase]["final_median_ms"] for phase in PHASES} |
                   {f"{phase}_final_median_relative": r[phase]["final_median_relative"] for phase in PHASES}
                   for gpu, r in by_gpu.items()}
        worst = {phase: _worst([g[phase] for g in per_gpu.values()]) for phase in PHASES}
        worst_relative = {phase: _worst([g[f"{phase}_relative"] for g in per_gpu.values()]) for phase in PHASES}
        out[kind] = {"completions_to_50ms" if config.threshold_ms == 50 else "completions_to_threshold": worst,
                     f"completions_to_{config.relative_threshold:.0%}".replace("%", "pct"): worst_relative,
                     "by_gpu": per_gpu}
    return out


def _worst(counts: list[int | None]) -> int | None:
    return None if any(c is None for c in counts) else max(counts)


def print_table(summary: dict[str, Any], floors: dict[str, dict[str, float]], config: ConvergenceConfig) -> None:
    """Print one row per predictor and GPU: completions to the threshold and final error, per phase."""
    rows = []
    for kind, entry in summary.items():
        for gpu, figures in entry["by_gpu"].items():
            rows.append([kind, gpu, figures["cold"], figures["cold_relative"], figures["cold_final_median_ms"],
                         floors[gpu]["cold"], figures["drift"], figures["drift_relative"],
                         figures["drift_final_median_ms"], floors[gpu]["drift"]])
    threshold, relative = f"{config.threshold_ms:g} ms", f"{config.relative_threshold:.0%}"
    columns = ["predictor", "GPU", f"cold: to {threshold}", f"cold: to {relative}", "cold: final median",
               "cold: LS floor", f"drift: to {threshold}", f"drift: to {relative}", "drift: final median",
               "drift: LS floor"]
    report.console.print(report.table("predictor convergence (median |error| over runs, simulated ms; "
                                      "- = never)", columns, rows))


def plot(results: dict[str, dict[str, Any]], config: ConvergenceConfig, path: Path) -> Path:
    """One panel per GPU: median |error| against completions, both phases end to end."""
    grid, titles = [], []
    for gpu in config.gpus:
        series = {}
        for kind in config.predictors:
            phases = results[kind][gpu]
            ys = phases["cold"]["median_ms"] + phases["drift"]["median_ms"]
            series[kind] = (list(range(1, len(ys) + 1)), ys)
        grid.append(series)
        titles.append(f"{gpu} (slows {config.slowdown:g}x after point {len(phases['cold']['median_ms'])})")
    return plots.panels(grid, titles, f"predictor |error| (median of {config.repeats} runs, {config.window}-completion "
                        f"mean) on {trace_name(config.trace)} at {config.load:g} load", "completions seen",
                        "|error| (simulated ms)", path, hline=config.threshold_ms)
