"""``dio bench convergence``: how fast the predictors learn a GPU's latency, cold and after drift.

Two parts (``--part``), pure and deterministic, in simulated time (no Redis, no processes):

**predictors** (``run_convergence``, ``convergence.json``): the end-to-end predictors, one GPU at
a time. Each GPU's scheduler (``dio.gpu_worker.sim.scheduler``, the simulated engine's core) is
driven directly. Requests from a trace arrive open loop (Poisson) at ``load`` × the GPU's
saturation throughput; every completion's latency (from the worker starting the job to its end,
as the worker daemon reports it) is fed to a fresh row of each predictor — ``seed``, ``vector``,
``rls`` — exactly as the dispatcher feeds it, with the KV in flight when the request was sent (in
units of the model's weights) as the load feature. The error recorded is the one the dispatcher
records: |ŷ − y| of the prediction made just before learning the completion. After
``completions`` completions the GPU suddenly slows down (its compute and bandwidth divided by
``slowdown``; arrivals slow by the same factor, so utilisation stays the same) and the curve
continues: drift. Each curve is the median (and p90) over ``repeats`` runs with different seeds
and trace windows.

**tokens** (``run_token_convergence``, ``convergence-tokens.json``): DIO's per-worker TTFT and
TPOT predictors (``dio.dispatcher.token_latency``) where they work — inside DIO's routing core,
routing a trace over a heterogeneous cluster in the virtual replay — against the issue's target:
median absolute percentage error (MAPE) of TTFT and of TPOT ≤ 10% after 20 completions per
worker, from a cold start and again after a worker slows down. See the section below.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policy import Ask, Decision
from dio.dispatcher.predictors import PREDICTORS, make_predictor
from dio.dispatcher.prior import roofline_prior
from dio.dispatcher.router import Action
from dio.dispatcher.token_latency import TokenLatency, tpot_features, ttft_features
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SimRequest
from dio.ops.bench import plots, report
from dio.ops.bench.virtual import EPOCH_S, VirtualCluster
from dio.ops.bench.workload import at_rate, engine_saturation_rps, load_workload, trace_name
from dio.ops.openloop import Outcome
from dio.ops.traces import Trace, poisson_arrivals, sample
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.models import Completion, JobStatus, Request

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


# --- TTFT and TPOT: DIO's per-worker token predictors, inside the routing core ---------------------
#
# ``run_token_convergence``: the predictors the dio policy routes SLO requests by
# (``dio.dispatcher.token_latency``) are measured where they live: DIO's routing core
# (``dio.dispatcher.router.Router``, driven by the virtual replay, ``dio.ops.bench.virtual``) routes a
# trace over a heterogeneous simulated cluster, every request carrying the same ``max_tokens`` cap and
# the SLO, its true output length kept inside the engine. For every completion the benchmark keeps the
# TTFT and TPOT the router predicted for it on the worker it chose, when it chose it, and the TTFT and
# TPOT the worker measured (from the hand-off, as the router learns them). Halfway through the
# arrivals one worker slows down (``slow_down``). Errors are grouped per worker in windows of the
# completions that worker had learned when the prediction was made (0–19, 20–39, ...), from the cold
# start and again from the slowdown, with the roofline prior (``dio.dispatcher.prior.token_priors``)
# and without it.

TOKEN_VARIANTS = ("prior", "no-prior")
TOKEN_METRICS = ("ttft", "tpot")
OUTPUT_BANDS = (("2-99", 2, 100), ("100-299", 100, 300), ("300+", 300, 1 << 30))  # output tokens


@dataclass
class TokenConfig:
    """Options of the TTFT/TPOT part of ``dio bench convergence``."""

    trace: str = "azure-conv"
    cluster: str = "H100:1,A100-40GB:2,L4:2,T4:3"
    model: str = DEFAULT_MODEL
    rate_rps: float = 40.0  # arrivals, requests per simulated second (the trace's bursts kept)
    requests: int = 16_000  # per run; the slowdown comes at the arrival of the middle one
    drift_worker: str = "H100-1"  # the worker that slows down (ids are PROFILE-N, as in --cluster)
    slowdown: float = 2.0  # its compute and memory bandwidth are divided by this
    window: int = 20  # completions learned per window
    windows: int = 5  # windows shown per phase; predictions made later are pooled into one more
    target: float = 0.10  # the MAPE target, for every window after the first
    min_samples: int = 5  # a window with fewer predictions is shown but not judged
    repeats: int = 3  # runs per variant (trace windows and seeds); the windows pool them
    variants: list[str] = field(default_factory=lambda: list(TOKEN_VARIANTS))
    slo: str | None = None  # a goodput SLO preset or TTFT_MS:TPOT_MS (None: the trace's preset)
    max_tokens: str = "auto"  # the cap every request carries: auto (goodput's rule) or N
    records: bool = False  # also write every completion's record (<name>.records.jsonl.gz)
    seed: int = 0
    out_dir: Path | None = None
    name: str = "convergence-tokens"


@dataclass(slots=True)
class TokenRecord:
    """One completion: the TTFT and TPOT the router predicted at dispatch, the measured ones, the features."""

    worker: str
    sent_s: float  # hand-off, simulated s
    done_s: float
    phase: str | None  # cold, drift, or None: sent before the slowdown and ended after it (in neither)
    learned: int  # completions its worker had learned in its phase when the prediction was made
    warm: bool  # the worker's TTFT/TPOT predictors predicted anything then (a prior, or a completion learned)
    ttft_pred_ms: float  # Ask.ttft[row]: what the policy routed on (before its caution factor)
    tpot_pred_ms: float  # Ask.tpot[row]
    ttft_ms: float  # measured from the hand-off, as the worker reports it and the router learns it
    tpot_ms: float | None  # (service − TTFT) / (output − 1); None: a one-token output
    uncached: int  # the router's features at dispatch: uncached prompt tokens,
    queue: float  # queued prefill (10k tokens, Cluster.queued_prefill),
    load: float  # KV load with the job (weight units),
    share: float  # prefill share with its own prompt (what Ask.tpot uses),
    share_held: float  # prefill share without it (what Held keeps and the predictor learns with),
    tpot_pred_held_ms: float  # the TPOT the same weights give with share_held (the learning features)
    running: int  # the engine's telemetry at dispatch
    waiting: int
    kv_usage: float
    outstanding: int  # jobs the router had sent there, not yet ended
    output_tokens: int = 0
    order: int = 0  # its place among its worker's completions in its phase (1: the first); 0: no phase
    seed: int = 0  # the run's
    # An oracle, for a floor only: the uncached prompt tokens sent to its worker while it decoded, per
    # second (in 10k tokens): the prefill it decoded beside, which no router knows at dispatch.
    future_prefill: float = 0.0


def slow_down(scheduler: BatchScheduler, factor: float) -> None:
    """Test-only hook of this benchmark: divide a simulated GPU's compute and memory bandwidth by ``factor``.

    The drift: a GPU that becomes slower while serving (clocks throttled, a noisy neighbour), its
    registration unchanged, so only the predictors can notice. A step already started ends at the old
    speed; the step planned at the scheduler's clock is planned again at the new one (as
    ``BatchScheduler.add`` drops it when a request arrives).
    """
    gpu = scheduler.gpu
    scheduler.gpu = replace(gpu, peak_flops=gpu.peak_flops / factor,
                            mem_bandwidth_bytes_s=gpu.mem_bandwidth_bytes_s / factor)
    scheduler._plan = None  # planned with the old speed


def forget_priors(cluster: Cluster) -> None:
    """Start every worker's predictors from nothing, as for workers that register no datasheet."""
    cluster.tokens = TokenLatency()
    cluster.predictor = make_predictor(cluster.predictor_kind)
    for _ in range(len(cluster)):
        cluster.tokens.add_row()
        cluster.predictor.add_row()


class TokenProbe:
    """Observe DIO's routing core in a virtual replay: each job's predicted TTFT and TPOT, and the measured ones.

    Test-only hooks of this benchmark, on one ``VirtualCluster``'s router instance, not in the product:

    * ``policy.decide`` is wrapped. It is pure (it reads the cluster, changes nothing), so an ``Ask``
      built again right after it, on the same cluster state, holds the very numbers the policy routed
      on: ``Ask.ttft[row]`` and ``Ask.tpot[row]`` for the row it chose. The decision is returned as is.
    * ``ended`` is wrapped to pair each completion with its prediction (the router learns it as usual).
    * ``route`` is wrapped to apply the drift: at the first routing step at or after ``drift_at_s``
      (simulated s), ``slow_down`` the GPU of ``drift_row``.
    """

    def __init__(self, virtual: VirtualCluster, drift_row: int | None, drift_at_s: float, slowdown: float) -> None:
        self.virtual = virtual
        router = virtual.router
        self.policy = router.policy
        self._decide, self._ended, self._route = router.policy.decide, router.ended, router.route
        router.policy.decide = self.decide  # type: ignore[method-assign]
        router.ended = self.ended  # type: ignore[method-assign]
        router.route = self.route  # type: ignore[method-assign]
        self.drift_row, self.drift_at_s, self.slowdown = drift_row, drift_at_s, slowdown
        self.completions = [0] * len(virtual.ids)  # completions each worker's predictors learned
        self.at_drift: list[int] | None = None  # the same counts when the slowdown came
        self.pending: dict[str, TokenRecord] = {}
        self.records: list[TokenRecord] = []

    def decide(self, request: Request, cluster: Cluster, now: float) -> Decision:
        decision = self._decide(request, cluster, now)
        row = decision.row
        if row is None:
            return decision
        ask = Ask(request, cluster, now, self.policy.learn_outputs)
        uncached = int(np.broadcast_to(np.asarray(ask.uncached), (len(cluster),))[row])
        load = float(ask.loads[row])
        share_held = float(cluster.prefill_shares(now)[row])
        held = tpot_features(np.array([load]), np.array([share_held]))[0]
        learned = self.completions[row] - (self.at_drift[row] if self.at_drift is not None else 0)
        self.pending[request.id] = TokenRecord(
            worker=cluster.ids[row], sent_s=now - EPOCH_S, done_s=0.0,
            phase="cold" if self.at_drift is None else "drift", learned=learned,
            warm=bool(cluster.tokens.warm[row]), ttft_pred_ms=float(ask.ttft[row]), tpot_pred_ms=float(ask.tpot[row]),
            ttft_ms=0.0, tpot_ms=None, uncached=uncached, queue=float(cluster.queued_prefill(now)[row]), load=load,
            share=float(cluster.prefill_shares(now, ask.uncached)[row]), share_held=share_held,
            tpot_pred_held_ms=max(float(cluster.tokens.tpot.weights[row] @ held), 0.0),
            running=int(cluster.running[row]), waiting=int(cluster.waiting[row]),
            kv_usage=float(cluster.kv_usage[row]), outstanding=int(cluster.outstanding[row]))
        return decision

    def ended(self, done: Completion) -> float | None:
        error = self._ended(done)
        record = self.pending.pop(done.job, None)
        row = self.virtual.cluster.index.get(done.worker)
        if record is None or row is None or done.status != JobStatus.completed or done.ttft_ms is None:
            return error
        self.completions[row] += 1
        if record.phase == "cold" and self.at_drift is not None:
            record.phase = None  # sent before the slowdown, ended after it
        elif record.phase is not None:
            record.order = self.completions[row] - (self.at_drift[row] if self.at_drift is not None else 0)
        record.done_s = record.sent_s + done.service_ms / 1000.0
        record.ttft_ms = done.ttft_ms
        record.output_tokens = done.output_tokens
        if done.output_tokens > 1:
            record.tpot_ms = max(done.service_ms - done.ttft_ms, 0.0) / (done.output_tokens - 1)
        self.records.append(record)
        return error

    def route(self, now: float) -> list[Action]:
        if self.at_drift is None and now - EPOCH_S >= self.drift_at_s:
            self.at_drift = list(self.completions)
            if self.drift_row is not None:
                slow_down(self.virtual.gpus[self.drift_row], self.slowdown)
        return self._route(now)


def token_workload(trace: Trace, count: int, rate_rps: float, seed: int) -> Trace:
    """``count`` requests at ``rate_rps`` (bursts kept): a random contiguous window, the trace repeated if short."""
    rows = list(trace)
    if not rows:
        raise ValueError("the trace has no requests")
    span = rows[-1].arrival_s - rows[0].arrival_s
    gap = span / max(len(trace) - 1, 1)
    while len(rows) < count:
        shift = rows[-1].arrival_s - trace[0].arrival_s + gap
        rows += [replace(r, arrival_s=r.arrival_s + shift) for r in trace]
    return at_rate(sample(rows, count, seed), rate_rps)


def token_run(window: Trace, config: TokenConfig, variant: str, seed: int, cap: int | None,
              slo: Any) -> tuple[TokenProbe, list[Outcome]]:
    """Route one window with DIO in the virtual cluster, one worker slowing down halfway; return the probe."""
    virtual = VirtualCluster(config.cluster, config.model, DispatcherSettings(policy="dio", seed=seed))
    if variant == "no-prior":
        forget_priors(virtual.cluster)
    elif variant != "prior":
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(TOKEN_VARIANTS)}")
    drift_row = virtual.ids.index(config.drift_worker) if config.drift_worker else None
    probe = TokenProbe(virtual, drift_row, window[len(window) // 2].arrival_s, config.slowdown)
    outcomes = virtual.run(window, max_tokens=cap, ttft_slo_ms=slo.ttft_ms, tpot_slo_ms=slo.tpot_ms)
    for record in probe.records:
        record.seed = seed
    note_future_prefill(probe.records)
    return probe, outcomes


def note_future_prefill(records: list[TokenRecord]) -> None:
    """Set each record's ``future_prefill``: the prompts sent to its worker between its first token and its end."""
    by_worker: dict[str, list[TokenRecord]] = {}
    for r in records:
        by_worker.setdefault(r.worker, []).append(r)
    for mine in by_worker.values():
        mine.sort(key=lambda r: r.sent_s)
        sent = np.array([r.sent_s for r in mine])
        tokens = np.concatenate([[0.0], np.cumsum([r.uncached for r in mine], dtype=float)])
        for r in mine:
            start, end = r.sent_s + r.ttft_ms / 1000.0, r.done_s
            if end > start:
                i, j = np.searchsorted(sent, start, side="right"), np.searchsorted(sent, end, side="right")
                r.future_prefill = float(tokens[j] - tokens[i]) / (end - start) / 1e4


# --- the metric -------------------------------------------------------------------------------------


def mape(predicted: Any, measured: Any) -> float | None:
    """Median absolute percentage error (a fraction) over the pairs with a positive measurement; None if none."""
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    keep = m > 0
    return float(np.median(np.abs(p[keep] - m[keep]) / m[keep])) if keep.any() else None


def window_labels(width: int, count: int, key: str = "learned") -> list[str]:
    """Labels of ``count`` windows and the pooled rest: by completions learned (0–19, ...) or by order (1–20, ...)."""
    first = 0 if key == "learned" else 1
    return [f"{first + k * width}–{first + (k + 1) * width - 1}" for k in range(count)] + [f"{first + count * width}+"]


def windows_of(records: list[TokenRecord], width: int, count: int, key: str = "learned",
               pred: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """MAPE of TTFT and TPOT per window of one worker's records in one phase (warm predictions only).

    ``key`` ``learned``: window k holds the predictions made when the worker had learned
    k·width … (k+1)·width − 1 completions in the phase; ``order``: the completions k·width + 1 …
    (k+1)·width in the order they ended. The last window pools everything later. ``pred`` names the
    record fields predicted (default ``ttft_pred_ms``, ``tpot_pred_ms``).
    """
    pred = pred or {"ttft": "ttft_pred_ms", "tpot": "tpot_pred_ms"}
    groups: list[list[TokenRecord]] = [[] for _ in range(count + 1)]
    for r in records:
        if r.warm:
            index = r.learned if key == "learned" else r.order - 1
            groups[min(index // width, count)].append(r)
    out = []
    for label, group in zip(window_labels(width, count, key), groups, strict=True):
        tpot = [r for r in group if r.tpot_ms is not None]
        out.append({"window": label, "n": len(group), "n_tpot": len(tpot),
                    "ttft": _round4(mape([getattr(r, pred["ttft"]) for r in group], [r.ttft_ms for r in group])),
                    "tpot": _round4(mape([getattr(r, pred["tpot"]) for r in tpot], [r.tpot_ms for r in tpot]))})
    return out


def verdict(windows: list[dict[str, Any]], target: float, min_samples: int) -> dict[str, bool | None]:
    """Per metric: whether every window after the first (after ``width`` completions) has MAPE ≤ ``target``.

    Windows with fewer than ``min_samples`` predictions are not judged; None: no window judged.
    """
    out: dict[str, bool | None] = {}
    for metric, n in (("ttft", "n"), ("tpot", "n_tpot")):
        judged = [w[metric] for w in windows[1:] if w[n] >= min_samples and w[metric] is not None]
        out[metric] = all(v <= target for v in judged) if judged else None
    return out


def relative_floor(x: np.ndarray, y: np.ndarray, iterations: int = 30) -> float | None:
    """The MAPE of the best linear fit of ``y`` on ``x`` in relative terms, in sample (None: too few samples).

    The fit minimises Σ |ŷ − y| / y (least absolute relative deviations, by iteratively reweighted
    least squares): no linear predictor on these features, online or not, does much better on
    these samples, so it is the error the features cannot explain.
    """
    keep = y > 0
    a, b = x[keep] / y[keep, None], np.ones(int(keep.sum()))
    if len(b) < 2 * x.shape[1]:
        return None
    weights, *_ = np.linalg.lstsq(a, b, rcond=None)
    for _ in range(iterations):
        scale = 1.0 / np.sqrt(np.maximum(np.abs(a @ weights - b), 1e-4))
        weights, *_ = np.linalg.lstsq(a * scale[:, None], b * scale, rcond=None)
    return _round4(float(np.median(np.abs(a @ weights - b))))


def floors_of(records: list[TokenRecord]) -> dict[str, float | None]:
    """The relative least-squares floors of one worker's phase: TTFT and TPOT on the router's own features."""
    if not records:
        return {"ttft": None, "tpot": None, "tpot_decision": None, "tpot_with_future_prefill": None}
    x = ttft_features(np.array([r.uncached for r in records]), np.array([r.queue for r in records]))
    tpot = [r for r in records if r.tpot_ms is not None]
    y = np.array([r.tpot_ms for r in tpot], dtype=float)
    return {"ttft": relative_floor(x, np.array([r.ttft_ms for r in records])),
            "tpot": relative_floor(tpot_features(np.array([r.load for r in tpot]),
                                                 np.array([r.share_held for r in tpot])), y) if tpot else None,
            "tpot_decision": relative_floor(tpot_features(np.array([r.load for r in tpot]),
                                                          np.array([r.share for r in tpot])), y) if tpot else None,
            "tpot_with_future_prefill": relative_floor(np.column_stack([
                tpot_features(np.array([r.load for r in tpot]), np.array([r.share_held for r in tpot])),
                [r.future_prefill for r in tpot]]), y) if tpot else None}


def _round4(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def analyse_tokens(records: list[TokenRecord], workers: list[str], config: TokenConfig) -> dict[str, Any]:
    """Per worker and phase: the windows (by learned and by order), the verdict, floors and typical values."""
    out: dict[str, Any] = {}
    for worker in workers:
        out[worker] = {}
        for phase in PHASES:
            mine = [r for r in records if r.worker == worker and r.phase == phase]
            windows = windows_of(mine, config.window, config.windows)
            after = [r for r in mine if r.warm and r.learned >= config.window]
            after_tpot = [r for r in after if r.tpot_ms is not None]
            tpot = [r.tpot_ms for r in mine if r.tpot_ms is not None]
            out[worker][phase] = {
                "completions": len(mine), "unpredicted": sum(not r.warm for r in mine),
                "windows": windows, "met": verdict(windows, config.target, config.min_samples),
                "after_window": {"n": len(after),
                                 "ttft": _round4(mape([r.ttft_pred_ms for r in after], [r.ttft_ms for r in after])),
                                 "tpot": _round4(mape([r.tpot_pred_ms for r in after_tpot],
                                                      [r.tpot_ms for r in after_tpot]))},
                "windows_by_order": windows_of(mine, config.window, config.windows, key="order"),
                "windows_tpot_held": [w["tpot"] for w in windows_of(
                    mine, config.window, config.windows, pred={"ttft": "ttft_pred_ms", "tpot": "tpot_pred_held_ms"})],
                "floor": floors_of([r for r in mine if r.warm]),
                "tpot_after_window_by_output": {
                    label: _round4(mape([r.tpot_pred_ms for r in after_tpot if lo <= r.output_tokens < hi],
                                        [r.tpot_ms for r in after_tpot if lo <= r.output_tokens < hi]))
                    for label, lo, hi in OUTPUT_BANDS},
                "ttft_p50_ms": round(float(np.median([r.ttft_ms for r in mine])), 2) if mine else None,
                "tpot_p50_ms": round(float(np.median(tpot)), 3) if tpot else None}
    return out


def token_headline(analysis: dict[str, dict[str, Any]], drift_worker: str) -> dict[str, Any]:
    """Per variant and phase: whether the target holds on every worker judged, and which workers miss it."""
    out: dict[str, Any] = {}
    for variant, by_worker in analysis.items():
        out[variant] = {}
        for phase in PHASES:
            entry: dict[str, Any] = {}
            for metric in TOKEN_METRICS:
                verdicts = {w: by_worker[w][phase]["met"][metric] for w in by_worker}
                judged = [v for v in verdicts.values() if v is not None]
                entry[f"{metric}_met"] = all(judged) if judged else None
                entry[f"{metric}_missed"] = [w for w, v in verdicts.items() if v is False]
                entry[f"{metric}_not_judged"] = [w for w, v in verdicts.items() if v is None]
                entry[f"{metric}_after_window"] = {w: by_worker[w][phase]["after_window"][metric] for w in by_worker}
            if phase == "drift":
                entry["drift_worker"] = drift_worker
            out[variant][phase] = entry
    return out


def run_token_convergence(config: TokenConfig) -> dict[str, Any]:
    """Run the TTFT/TPOT part, print its tables, write its JSON and plot; return the --json summary."""
    from dio.ops.bench.goodput import parse_max_tokens, parse_slo

    if config.requests < 4 or config.rate_rps <= 0 or config.window < 1 or config.windows < 1 or config.slowdown <= 0:
        raise ValueError("--requests must be at least 4, --rate, --window, --windows and --slowdown positive")
    for variant in config.variants:
        if variant not in TOKEN_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(TOKEN_VARIANTS)}")
    whole = load_workload(config.trace, seed=config.seed)
    cap = parse_max_tokens(config.max_tokens, [r.output_tokens for r in whole])
    slo = parse_slo(config.slo, config.trace)
    workers = VirtualCluster(config.cluster, config.model, DispatcherSettings(policy="dio")).ids
    if config.drift_worker and config.drift_worker not in workers:
        raise ValueError(f"--drift-worker {config.drift_worker!r} is not one of {', '.join(workers)}")
    analysis: dict[str, Any] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    kept: dict[str, list[TokenRecord]] = {}
    with report.progress() as bar:
        task = bar.add_task("convergence: TTFT/TPOT", total=len(config.variants) * config.repeats)
        for variant in config.variants:
            records: list[TokenRecord] = []
            runs[variant] = []
            for r in range(config.repeats):
                seed = config.seed + r
                window = token_workload(whole, config.requests, config.rate_rps, seed)
                probe, outcomes = token_run(window, config, variant, seed, cap, slo)
                records += probe.records
                runs[variant].append(_run_brief(probe, outcomes, window, seed))
                bar.advance(task)
            analysis[variant] = analyse_tokens(records, workers, config)
            kept[variant] = records
    summary = token_headline(analysis, config.drift_worker)
    out_dir = Path(config.out_dir or report.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_tokens(analysis, config, workers, out_dir / f"{config.name}.png")
    figures = {"trace": trace_name(config.trace), "cluster": config.cluster, "model": config.model,
               "rate_rps": config.rate_rps, "requests_per_run": config.requests, "repeats": config.repeats,
               "max_tokens": cap, "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "name": slo.name},
               "drift_worker": config.drift_worker, "slowdown": config.slowdown, "window": config.window,
               "windows": config.windows, "target_mape": config.target, "min_samples": config.min_samples,
               "latency_unit": "simulated ms", "window_rule": (
                   "a prediction is in window k of its phase when its worker had learned k*window ... "
                   "(k+1)*window-1 completions in the phase when it was made (the last window pools the "
                   "rest); cold: sent and ended before the slowdown; drift: sent after it; MAPE = median "
                   "|predicted - measured| / measured over warm predictions, pooled over the runs; met: every "
                   "window after the first with at least min_samples predictions has MAPE <= target"),
               "summary": summary, "workers": analysis, "runs": runs, "figures_png": [png.name]}
    path = report.save(config.name, report.payload("convergence-tokens", figures), out_dir)
    if config.records:
        _save_records(kept, out_dir / f"{config.name}.records.jsonl.gz")
    print_token_tables(analysis, config)
    report.status.print(f"wrote {path} and {png}")
    return {"target_mape": config.target, "window": config.window, "drift_worker": config.drift_worker,
            "variants": summary}


def _run_brief(probe: TokenProbe, outcomes: list[Outcome], window: Trace, seed: int) -> dict[str, Any]:
    """One run's counts: outcomes, completions per worker and phase, when the slowdown came."""
    per_worker: dict[str, dict[str, int]] = {}
    for r in probe.records:
        counts = per_worker.setdefault(r.worker, {"cold": 0, "drift": 0, "straddling": 0})
        counts[r.phase or "straddling"] += 1
    statuses: dict[str, int] = {}
    for o in outcomes:
        statuses[o.status] = statuses.get(o.status, 0) + 1
    return {"seed": seed, "requests": len(window), "drift_at_s": round(probe.drift_at_s, 3),
            "span_s": round(window[-1].arrival_s, 3), "outcomes": statuses, "completions": per_worker}


def _save_records(records: dict[str, list[TokenRecord]], path: Path) -> None:
    with gzip.open(path, "wt") as out:
        for variant, rows in records.items():
            for r in rows:
                out.write(json.dumps({"variant": variant, **asdict(r)}) + "\n")


def _cell(window: dict[str, Any]) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}"
    return f"{pct(window['ttft'])}/{pct(window['tpot'])}" if window["n"] else "-"


def print_token_tables(analysis: dict[str, dict[str, Any]], config: TokenConfig) -> None:
    """Print one table per variant and phase: a row per worker, TTFT / TPOT MAPE (%) per window."""
    labels = window_labels(config.window, config.windows)
    # Ten columns: wider than the 80 characters rich assumes when stdout is not a terminal.
    console = Console(file=report.console.file, width=max(report.console.width, 120))
    for variant, by_worker in analysis.items():
        for phase in PHASES:
            rows = []
            for worker, phases in by_worker.items():
                entry = phases[phase]
                met = entry["met"]
                floor = entry["floor"]
                rows.append([worker + ("*" if phase == "drift" and worker == config.drift_worker else ""),
                             entry["completions"], *[_cell(w) for w in entry["windows"]],
                             _cell({"n": 1, "ttft": floor["ttft"], "tpot": floor["tpot"]}),
                             f"{_yes(met['ttft'])}/{_yes(met['tpot'])}"])
            title = (f"TTFT/TPOT MAPE % by completions learned, {variant}, {phase}"
                     + (f" (*: {config.slowdown:g}x slower)" if phase == "drift" else ""))
            console.print(report.table(title, ["worker", "completions", *labels, "floor", f"≤{config.target:.0%}"],
                                       rows))


def _yes(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def plot_tokens(analysis: dict[str, dict[str, Any]], config: TokenConfig, workers: list[str], path: Path) -> Path:
    """A panel per worker and metric: MAPE against the completions learned, per variant and phase."""
    plt = plots.plt
    fig, axes = plt.subplots(2, len(workers), figsize=(3.0 * len(workers), 6.0), sharey=True, squeeze=False)
    xs = [config.window * (k + 0.5) for k in range(config.windows + 1)]
    for col, worker in enumerate(workers):
        for row, metric in enumerate(TOKEN_METRICS):
            ax = axes[row][col]
            for variant, by_worker in analysis.items():
                for phase, style in zip(PHASES, ("-", "--"), strict=True):
                    ys = [100 * w[metric] if w[metric] is not None else np.nan
                          for w in by_worker[worker][phase]["windows"]]
                    ax.plot(xs, ys, style, marker=".", label=f"{variant}, {phase}")
            ax.axhline(100 * config.target, color="grey", linestyle=":", linewidth=1)
            ax.set_yscale("log")
            slowed = " (slowed)" if worker == config.drift_worker else ""
            ax.set_title(f"{worker}{slowed}: {metric.upper()}", fontsize=9)
            if row == 1:
                ax.set_xlabel("completions learned")
            if col == 0:
                ax.set_ylabel("MAPE (%)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"DIO's TTFT/TPOT predictors: MAPE by completions learned ({trace_name(config.trace)}, "
                 f"{config.rate_rps:g} req/s, {config.repeats} runs; drift: {config.drift_worker} "
                 f"{config.slowdown:g}x slower)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plt.close(fig)
    return path
