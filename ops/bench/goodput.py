"""``dio bench goodput``: the highest request rate each policy serves within a TTFT and TPOT SLO.

A request meets its SLO when its time to first token is within the TTFT limit and its mean time
per output token after the first (TPOT) within the TPOT limit; rejected, failed, cancelled and
unfinished requests miss. Goodput (DistServe's) is the highest offered rate, in requests per
simulated second, at which at least 90% of the requests meet it — there and at every lower rate
tried. It is located per policy and seed: a sweep from the trace's own rate, ×1.5 a step, past the
knee of every policy (at most 1.5 × the cluster's saturation throughput), then bisection between
the last rate that passed and the first that failed until they are within 2%.

What keeps it honest:
* **No oracle.** Every request is sent with the same ``max_tokens`` cap — the smallest power of
  two at or above the trace's 99th-percentile output length, at least 256 — and its true output
  length stays inside the simulated engine, which stops there as a model stops at EOS.
  ``--max-tokens oracle`` sends each request's true length instead, for comparison only.
* **Seeds.** Each seed replays another window of the trace (``--max-requests`` consecutive
  requests from a seed-dependent offset; for a length-only trace, with Poisson arrivals drawn
  with the seed) and seeds the policy's random choices. Goodput is reported per seed, with the
  median and the range.
* **Feasibility.** Each standard SLO preset must be met by ≥ 95% of the requests that fit a GPU
  type when they run alone on an idle GPU of that type; the table is printed and saved, so a
  goodput is never measured against an SLO some GPU could not meet even when idle.
* **The ceiling.** The cluster's saturation throughput (``capacity_rps``: each GPU's scheduler run
  alone with the trace's requests queued, summed) is reported beside the goodput.

Runs are virtual by default (``dio.ops.bench.virtual``: the dispatcher's routing core against the
simulated GPUs on a discrete-event clock); ``--full`` replays through the whole system (Redis,
dispatcher and worker processes) and, at ``--rates``, beside the virtual runs at the same points.
``--peers`` replays the same windows over HTTP through real peer routers (vllm-router,
sglang-router) in front of the same simulated GPUs (``dio.ops.bench.peer_run``), with the same cap,
true lengths inside the engine and SLO: at ``--rates``, or else at ``PEER_RATE_FACTORS`` × DIO's
median virtual goodput. Every run's per-request records are saved, compressed, beside the result
file (``load_records``), so any figure can be recomputed.
"""

from __future__ import annotations

import gzip
import json
import math
import multiprocessing
import os
import statistics
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from rich.progress import Progress

from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.policies import POLICIES
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SimRequest
from dio.ops.bench import report
from dio.ops.bench.cluster_run import DEFAULT_PREDICTOR, RunConfig, run_trace
from dio.ops.bench.metrics import STATUSES, counts, gpu_shares
from dio.ops.bench.peer_run import parse_peer, run_peer
from dio.ops.bench.peers import cluster_profiles
from dio.ops.bench.virtual import replay_virtual
from dio.ops.bench.workload import (
    at_rate,
    auto_time_scale,
    engine_capacity_rps,
    engine_saturation_rps,
    load_workload,
    span_s,
    trace_name,
    trace_path,
)
from dio.ops.local_cluster import parse_workers
from dio.ops.openloop import Outcome
from dio.ops.slo import CAP_PERCENTILE, MIN_CAP_TOKENS, Slo, max_tokens_cap, meets, preset_for
from dio.ops.slo import parse_slo as slo_named
from dio.ops.slo import tpot_ms as request_tpot_ms
from dio.ops.stats import percentile, reason_key
from dio.ops.traces import Trace, detect_format, mean_rate, with_arrivals
from dio.protocol import defaults as d

ATTAINMENT_TARGET = 0.9  # goodput: the share of requests that must meet the SLO
RATE_STEP = 1.5  # the sweep multiplies the rate by this
RATE_TOLERANCE = 0.02  # bisection stops when the passing and failing rates are this close (relative)
CEILING_OVER_CAPACITY = 1.5  # the sweep's highest rate, as a multiple of capacity_rps
DOWN_STEPS = 6  # below the start rate, the sweep divides by RATE_STEP at most this often
START_OVER_CAPACITY = 1 / 50  # a length-only trace has no rate of its own: start at capacity / 50
FEASIBLE_SHARE = 0.95  # a standard preset must be met idle by this share of the requests that fit a GPU
FEASIBILITY_SAMPLE = 500  # requests simulated alone per GPU type (an even sample of the window)
CONTROL_PLANE_WALL_MS = 5.0  # --full: DIO's own delay per request, wall ms (dio bench pipeline, low load)
MAX_CONTROL_SHARE = 0.05  # --full: the time scale keeps that delay within this share of the TTFT limit
MIN_DRAIN_WALL_S = 10.0
PEER_RATE_FACTORS = (0.8, 1.0)  # --peers without --rates: these multiples of the anchor's median virtual goodput
PEER_ANCHOR = "dio"  # ...the anchor (else the policy with the highest median goodput)
PEER_TARGET_WALL_S = 120.0  # --peers: real time (scale 1) unless a run's arrivals would take longer (wall s)
LOAD_POLL_WALL_S = 30.0  # vllm-router 0.1.17 and sglang-router 0.3.2: power_of_two polls /get_load this often
# (measured: the sim-servers' dio_sim:get_load_requests_total; their other policies count in-flight requests
# themselves and poll nothing), so its view is LOAD_POLL_WALL_S x time scale simulated seconds old at most
FULL = "@full"  # records: a --full run beside a virtual one of the same point
VIRTUAL = "@virtual"  # records: the virtual run beside a --full --rates one
CONFIRM_TOLERANCE = 0.1  # --full --rates: full attainment within this share of the virtual one confirms it
DEFAULT_CLUSTER = "H100:1,A100-40GB:2,L4:2,T4:3"
DEFAULT_MAX_REQUESTS = 2000
DEFAULT_SEEDS = 3
ORACLE = "oracle"
AUTO = "auto"
STATUS_CODES = {status: code for code, status in enumerate(STATUSES)}  # per-request records store these
RECORD_COLUMNS = ("status", "worker", "ttft_ms", "latency_ms", "output_tokens", "preemptions", "kv_held")

K = TypeVar("K", bound=Hashable)


# --- SLOs ------------------------------------------------------------------------------------------


def default_preset(trace: str) -> str:
    """Return the preset a trace is measured against: by its name (``preset_for``), or long-context for a
    file in Mooncake's format whatever its name."""
    preset = preset_for(trace_name(trace))
    if preset == "chat" and detect_format(trace_path(trace)) == "mooncake":
        return "long-context"
    return preset


def parse_slo(text: str | None, trace: str) -> Slo:
    """Return the SLO of ``--slo``: a preset name, ``TTFT_MS:TPOT_MS``, or None for the trace's preset."""
    return slo_named(text or default_preset(trace))


def tpot_ms(outcome: Outcome) -> float | None:
    """Return a completed request's mean time per output token after the first (None: one token or unknown)."""
    if outcome.status != "completed" or outcome.latency_ms is None or outcome.ttft_ms is None:
        return None
    return request_tpot_ms(outcome.ttft_ms, outcome.latency_ms, outcome.output_tokens)


def meets_slo(outcome: Outcome, slo: Slo) -> bool:
    """Return whether a request met its SLO: completed, TTFT and TPOT within the limits."""
    return outcome.status == "completed" and meets(slo, outcome.ttft_ms, outcome.latency_ms, outcome.output_tokens)


def attainment(outcomes: Sequence[Outcome], slo: Slo) -> float:
    """Return the share of requests that met the SLO (every request counts, whatever its end)."""
    return sum(meets_slo(o, slo) for o in outcomes) / len(outcomes) if outcomes else 0.0


# --- max_tokens -----------------------------------------------------------------------------------


def parse_max_tokens(text: str, output_tokens: Sequence[int]) -> int | None:
    """Return the cap of ``--max-tokens``: ``auto`` (the trace's rule), a number, or None for ``oracle``."""
    text = text.strip().lower()
    if text == ORACLE:
        return None
    if text == AUTO:
        return max_tokens_cap(output_tokens)
    try:
        cap = int(text)
    except ValueError:
        cap = 0
    if not 1 <= cap <= d.MAX_OUTPUT_TOKENS:
        raise ValueError(f"--max-tokens takes auto, oracle or 1..{d.MAX_OUTPUT_TOKENS}, got {text!r}")
    return cap


# --- feasibility: each GPU type alone -------------------------------------------------------------


def alone(profile: str, model: str, prompt_tokens: int, output_tokens: int, cap: int | None) -> tuple[float, float]:
    """Return (TTFT ms, TPOT ms) of one request alone on an idle GPU (a fresh scheduler, no cached prefix)."""
    scheduler = BatchScheduler(get_profile(profile), get_model(model))
    scheduler.add(SimRequest("alone", prompt_tokens, cap or output_tokens,
                             eos_tokens=None if cap is None else output_tokens), 0.0)
    first = finish = 0.0
    produced = 1
    while (t := scheduler.next_event_time()) is not None:
        for event in scheduler.advance_to(t):
            if event.kind is EventKind.first_token:
                first = event.time
            else:
                finish, produced = event.time, event.output_tokens
    tpot = (finish - first) / (produced - 1) if produced > 1 else 0.0
    return first * 1000.0, tpot * 1000.0


def even_sample(trace: Trace, n: int) -> Trace:
    """Return at most ``n`` requests spread evenly over the trace (all of them if it is that short)."""
    if len(trace) <= n:
        return list(trace)
    return [trace[int(i)] for i in np.linspace(0, len(trace) - 1, n).round()]


def feasibility(cluster: str, model: str, trace: Trace, cap: int | None, slo: Slo,
                sample: int = FEASIBILITY_SAMPLE) -> dict[str, dict[str, Any]]:
    """Per GPU type of the cluster: how many requests fit it, and the share meeting the SLO alone on it.

    A request fits when prompt + max_tokens ≤ the GPU's max_model_len (vLLM refuses the rest).
    """
    out = {}
    for spec in parse_workers(cluster):
        if spec.profile in out:
            continue
        limit = BatchScheduler(get_profile(spec.profile), get_model(model)).max_model_len
        fits = [r for r in trace if r.prompt_tokens + (cap or r.output_tokens) <= limit]
        timings = [alone(spec.profile, model, r.prompt_tokens, r.output_tokens, cap) for r in even_sample(fits, sample)]
        ttfts, tpots = [t for t, _ in timings], [p for _, p in timings]
        met = [t <= slo.ttft_ms and p <= slo.tpot_ms for t, p in timings]
        share = sum(met) / len(met) if met else None
        out[spec.profile] = {
            "profile": get_profile(spec.profile).name, "requests": len(trace), "fit": len(fits),
            "simulated": len(timings), "ttft_p50_ms": _round(percentile(ttfts, 50)),
            "ttft_p99_ms": _round(percentile(ttfts, 99)), "tpot_p50_ms": _round(percentile(tpots, 50), 2),
            "tpot_p99_ms": _round(percentile(tpots, 99), 2), "meets_both": _round(share, 4),
            "feasible": share is not None and share >= FEASIBLE_SHARE,
        }
    return out


# --- the rate search (pure) -----------------------------------------------------------------------


def round_rate(rate: float) -> float:
    """Round a rate to 4 significant digits, so the rates tried are stable keys."""
    return float(f"{rate:.4g}")


def rate_key(rate: float) -> str:
    return f"{rate:g}"


def sweep_rates(start: float, ceiling: float, step: float = RATE_STEP) -> list[float]:
    """Return start, start × step, ... below ``ceiling``, then the ceiling (just ``start`` if it is above)."""
    rates, rate = [], start
    while rate < ceiling * (1 - 1e-9):
        rates.append(round_rate(rate))
        rate *= step
    return rates + [round_rate(ceiling)] if rates else [round_rate(start)]


@dataclass
class RateSearch:
    """Where one policy's goodput lies for one seed: the rates tried and whether each passed."""

    start: float
    step: float = RATE_STEP
    tolerance: float = RATE_TOLERANCE
    down_steps: int = DOWN_STEPS
    tried: dict[float, bool] = field(default_factory=dict)

    def bracket(self) -> tuple[float | None, float | None]:
        """Return (the highest rate that passed with every lower rate tried, the lowest rate that failed)."""
        lo = None
        for rate in sorted(self.tried):
            if not self.tried[rate]:
                return lo, rate
            lo = rate
        return lo, None

    def next_rate(self) -> float | None:
        """Return the next rate to try after the sweep (down from a failed start, or bisection); None: done."""
        lo, hi = self.bracket()
        if hi is None:
            return None  # passed at every rate up to the ceiling: goodput is at least that
        if lo is None:
            down = round_rate(hi / self.step)
            return down if down >= self.start / self.step ** self.down_steps * (1 - 1e-9) else None
        if hi <= lo * (1 + self.tolerance):
            return None
        mid = round_rate(math.sqrt(lo * hi))
        return None if mid in self.tried else mid

    @property
    def goodput(self) -> float:
        """The highest passing rate (0.0 when even the lowest rate tried failed)."""
        return self.bracket()[0] or 0.0


def locate_goodput(evaluate: Callable[[list[tuple[K, float]]], list[float]], keys: Sequence[K], start: float,
                   ceiling: float, target: float = ATTAINMENT_TARGET, step: float = RATE_STEP,
                   tolerance: float = RATE_TOLERANCE) -> dict[K, RateSearch]:
    """Find every key's goodput: a shared sweep until every key has failed once, then per-key bisection.

    Args:
        evaluate: returns the attainment of each (key, rate) asked, in order (one batch per call,
            so the caller can run them in parallel).
    """
    searches = {k: RateSearch(start, step, tolerance) for k in keys}

    def measure(points: list[tuple[K, float]]) -> None:
        for (k, rate), value in zip(points, evaluate(points), strict=True):
            searches[k].tried[rate] = value >= target

    for rate in sweep_rates(start, ceiling, step):
        measure([(k, rate) for k in keys])
        if all(s.bracket()[1] is not None for s in searches.values()):
            break
    while points := [(k, r) for k, s in searches.items() if (r := s.next_rate()) is not None]:
        measure(points)
    return searches


# --- one run ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One seed's requests: ``size`` consecutive requests of the trace from ``start``, arrivals from 0."""

    seed: int
    start: int
    requests: Trace


@dataclass(frozen=True)
class Setup:
    """What every run of one benchmark shares (sent once to each worker process)."""

    cluster: str
    model: str
    predictor: str
    cap: int | None  # max_tokens of every request; None: each request's true output length (oracle)
    slo: Slo
    weights: dict[str, float]  # per GPU profile: its saturation throughput (weighted policies)
    max_wait_s: float
    windows: dict[int, Window]


@dataclass
class RunResult:
    """One (policy, seed, rate) run: its figures and its per-request columns (``RECORD_COLUMNS``)."""

    policy: str
    seed: int
    rate: float
    figures: dict[str, Any]
    columns: dict[str, list | None]  # None: not known in this mode (preemptions and KV holds in --full)


def settings_for(setup: Setup, policy: str, seed: int) -> DispatcherSettings:
    """The dispatcher's settings for one run: the policy, the predictor, the seed, the GPUs' weights."""
    return DispatcherSettings(policy=policy, predictor=setup.predictor, seed=seed, max_wait_s=setup.max_wait_s,
                              policy_weights=setup.weights)


def run_virtual(setup: Setup, policy: str, seed: int, rate: float) -> RunResult:
    """Replay one seed's window at ``rate`` requests per simulated second in the virtual cluster."""
    trace = at_rate(setup.windows[seed].requests, rate)
    outcomes, virtual = replay_virtual(trace, setup.cluster, setup.model, settings_for(setup, policy, seed),
                                       max_tokens=setup.cap, ttft_slo_ms=setup.slo.ttft_ms,
                                       tpot_slo_ms=setup.slo.tpot_ms)
    c = virtual.counters
    kv = {"kv_used": dict(zip(virtual.ids, c.kv_used, strict=True)),
          "kv_reserved": dict(zip(virtual.ids, c.kv_reserved, strict=True)),
          "kv_used_by_gpu": by_gpu(c.kv_used, virtual.profiles),
          "kv_reserved_by_gpu": by_gpu(c.kv_reserved, virtual.profiles)}
    figures = run_figures(outcomes, setup.slo, c.preemptions, c.kv_held) | kv
    figures |= {"kv_hold_decisions": c.kv_hold_decisions, "makespan_s": round(virtual.last_event_s, 2),
                "gpu_preemptions": dict(zip(virtual.ids, c.gpu_preemptions, strict=True))}
    return RunResult(policy, seed, rate, figures, columns(outcomes, virtual.ids, c.preemptions, c.kv_held))


def by_gpu(values: Sequence[float], profiles: Sequence[str]) -> dict[str, float]:
    """Average per-worker values over the workers of each GPU type."""
    groups: dict[str, list[float]] = {}
    for value, profile in zip(values, profiles, strict=True):
        groups.setdefault(profile, []).append(value)
    return {p: round(float(np.mean(v)), 4) for p, v in groups.items()}


def run_figures(outcomes: Sequence[Outcome], slo: Slo, preemptions: Sequence[int] | None = None,
                kv_held: Sequence[bool] | None = None) -> dict[str, Any]:
    """Return one run's figures: outcome counts, SLO attainment (both, TTFT only, TPOT only), percentiles."""
    ttfts = [o.ttft_ms if o.status == "completed" else None for o in outcomes]
    tpots = [tpot_ms(o) for o in outcomes]
    n = max(len(outcomes), 1)
    figures: dict[str, Any] = {
        **counts(list(outcomes)),
        "attainment": round(attainment(outcomes, slo), 4),
        "ttft_attainment": round(sum(t is not None and t <= slo.ttft_ms for t in ttfts) / n, 4),
        "tpot_attainment": round(sum(o.status == "completed" and (p is None or p <= slo.tpot_ms)
                                     for o, p in zip(outcomes, tpots, strict=True)) / n, 4),
        "ttft_p50_ms": _round(percentile(ttfts, 50)), "ttft_p99_ms": _round(percentile(ttfts, 99)),
        "tpot_p50_ms": _round(percentile(tpots, 50), 2), "tpot_p99_ms": _round(percentile(tpots, 99), 2),
        "rejected_reasons": dict(Counter(reason_key(o.reason) for o in outcomes if o.status == "rejected")),
        "preemptions": None if preemptions is None else int(sum(preemptions)),
        "kv_held": None if kv_held is None else int(sum(kv_held)),
    }
    figures["kv_held_share"] = None if kv_held is None else round(figures["kv_held"] / n, 4)
    return figures


def columns(outcomes: Sequence[Outcome], worker_ids: Sequence[str], preemptions: Sequence[int] | None,
            kv_held: Sequence[bool] | None) -> dict[str, list | None]:
    """Return the per-request records of a run, one list per column (``RECORD_COLUMNS``)."""
    rows = {wid: i for i, wid in enumerate(worker_ids)}
    return {
        "status": [STATUS_CODES.get(o.status, STATUS_CODES["lost"]) for o in outcomes],
        "worker": [rows.get(o.worker, -1) if o.worker else -1 for o in outcomes],
        "ttft_ms": [_round(o.ttft_ms) for o in outcomes],
        "latency_ms": [_round(o.latency_ms) for o in outcomes],
        "output_tokens": [o.output_tokens for o in outcomes],
        "preemptions": list(preemptions) if preemptions is not None else None,
        "kv_held": [int(h) for h in kv_held] if kv_held is not None else None,
    }


def outcomes_of(cols: dict[str, Any], worker_ids: Sequence[str]) -> list[Outcome]:
    """Rebuild a run's outcomes from its saved columns (the inverse of ``columns``, without reasons)."""
    statuses = list(STATUS_CODES)
    return [Outcome(status=statuses[s], worker=worker_ids[w] if w >= 0 else None, latency_ms=lat, ttft_ms=ttft,
                    output_tokens=out)
            for s, w, ttft, lat, out in zip(cols["status"], cols["worker"], cols["ttft_ms"], cols["latency_ms"],
                                            cols["output_tokens"], strict=True)]


_SETUP: Setup | None = None  # a worker process's copy (ProcessPoolExecutor initializer)


def _init_worker(setup: Setup) -> None:
    global _SETUP
    _SETUP = setup


def _run_point(point: tuple[str, int, float]) -> RunResult:
    assert _SETUP is not None
    return run_virtual(_SETUP, *point)


class Runner:
    """Run (policy, seed, rate) points, in worker processes when ``jobs`` > 1; keep every result.

    Args:
        run: runs one point in this process instead (``--full``: one local cluster at a time).
        bar: the progress display to count runs on.
    """

    def __init__(self, setup: Setup, jobs: int, bar: Progress,
                 run: Callable[[tuple[str, int, float]], RunResult] | None = None) -> None:
        self.setup = setup
        self.results: dict[tuple[str, int, float], RunResult] = {}
        self._run = run
        self._pool: ProcessPoolExecutor | None = None
        if run is None and jobs > 1:
            self._pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_init_worker, initargs=(setup,))
        self._bar = bar
        self._task = bar.add_task("goodput", total=None)

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)

    def run(self, points: Sequence[tuple[str, int, float]], what: str = "") -> list[RunResult]:
        """Run the points not run yet; return every point's result, in order."""
        todo = [p for p in dict.fromkeys(points) if p not in self.results]
        self._bar.update(self._task, description=f"goodput: {what} {len(todo)} runs")
        if self._pool is not None:
            done: Iterator[RunResult] = self._pool.map(_run_point, todo)
        else:
            run = self._run or (lambda p: run_virtual(self.setup, *p))
            done = map(run, todo)
        for point, result in zip(todo, done, strict=True):
            self.results[point] = result
            self._bar.advance(self._task)
        return [self.results[p] for p in points]

    def attainments(self, points: list[tuple[tuple[str, int], float]]) -> list[float]:
        """The attainment of each ((policy, seed), rate): ``locate_goodput``'s evaluate."""
        results = self.run([(policy, seed, rate) for (policy, seed), rate in points], "searching:")
        return [r.figures["attainment"] for r in results]


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class GoodputConfig:
    """Options of ``dio bench goodput`` (rates in requests per simulated second)."""

    trace: str
    cluster: str = DEFAULT_CLUSTER
    model: str = d.DEFAULT_MODEL
    slo: str | None = None  # preset or TTFT_MS:TPOT_MS; None: the trace's preset
    max_tokens: str = AUTO  # auto | oracle | N
    policies: list[str] = field(default_factory=lambda: list(POLICIES))
    peers: list[str] = field(default_factory=list)
    full: bool = False  # through the whole system (Redis, processes) instead of the virtual replay
    rates: list[float] | None = None  # measure at these rates instead of searching
    seeds: int = DEFAULT_SEEDS
    seed: int = 0  # the first seed; the others follow
    max_requests: int = DEFAULT_MAX_REQUESTS
    predictor: str = DEFAULT_PREDICTOR
    jobs: int | None = None  # worker processes for virtual runs (default: the CPU count)
    max_wait_s: float = 60.0
    time_scale: float | None = None  # --full: simulated s per wall s (default: auto, SLO-bounded)
    peer_time_scale: float | None = None  # --peers: simulated s per wall s (default: 1, see peer_time_scale)
    target_wall_s: float = 12.0  # --full: wall seconds a run's arrivals take (auto time scale)
    drain_wall_s: float = 25.0  # --full: after the last arrival, wall seconds to wait for results
    out_dir: Path | None = None
    name: str | None = None


def validate(config: GoodputConfig) -> None:
    """Refuse what cannot run before anything starts."""
    unknown = [p for p in config.policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if not config.policies and not config.peers:
        raise ValueError("nothing to run: give --policies or --peers")
    if not config.policies and config.rates is None:
        raise ValueError("--peers without --policies needs --rates (their default rates come from DIO's goodput)")
    gpus = len(cluster_profiles(config.cluster))
    for peer in config.peers:
        parse_peer(peer, gpus)
    if len(set(config.peers)) < len(config.peers):
        raise ValueError(f"--peers lists a peer twice: {config.peers}")
    for scale in (config.time_scale, config.peer_time_scale):
        if scale is not None and scale <= 0:
            raise ValueError(f"a time scale must be positive, got {scale}")
    if config.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {config.seeds}")
    if config.max_requests < 2:
        raise ValueError(f"--max-requests must be at least 2, got {config.max_requests}")
    if config.rates is not None and (not config.rates or min(config.rates) <= 0):
        raise ValueError(f"--rates must be positive request rates, got {config.rates}")
    parse_workers(config.cluster)


def trace_windows(trace: str, size: int, seeds: Sequence[int]) -> tuple[dict[int, Window], Trace, bool]:
    """Return each seed's window, the whole trace (seed 0's arrivals) and whether the trace has timestamps.

    A window is ``size`` consecutive requests from an offset drawn with the seed (the whole trace if
    it is that short); a length-only trace gets Poisson arrivals drawn with the seed.
    """
    timed = detect_format(trace_path(trace)) != "lengths"
    whole = load_workload(trace, seed=seeds[0])
    windows = {}
    for seed in seeds:
        rows = whole if timed else load_workload(trace, seed=seed)
        start = int(np.random.default_rng(seed).integers(0, len(rows) - size + 1)) if len(rows) > size else 0
        part = rows[start:start + size]
        windows[seed] = Window(seed, start, with_arrivals(part, [r.arrival_s for r in part]))
    return windows, whole, timed


@dataclass
class Plan:
    """What the benchmark measures: the setup shared by every run, and the rates' anchors."""

    setup: Setup
    whole: Trace
    timed: bool
    capacity_rps: float
    capacity_seeds: dict[int, float]
    start_rps: float
    ceiling_rps: float
    feasibility: dict[str, dict[str, Any]]


def plan(config: GoodputConfig) -> Plan:
    """Load the windows, choose the cap and the SLO, measure capacity and feasibility, anchor the rates."""
    seeds = [config.seed + i for i in range(config.seeds)]
    windows, whole, timed = trace_windows(config.trace, config.max_requests, seeds)
    cap = parse_max_tokens(config.max_tokens, [r.output_tokens for r in whole])
    slo = parse_slo(config.slo, config.trace)
    specs = parse_workers(config.cluster)
    first = windows[seeds[0]].requests
    capacity_seeds = {s: round(engine_capacity_rps(specs, config.model, w.requests), 3) for s, w in windows.items()}
    capacity = float(np.median(list(capacity_seeds.values())))
    if capacity <= 0:
        raise RuntimeError(f"the cluster {config.cluster} serves none of the trace's requests")
    weights = {get_profile(s.profile).name: round(engine_saturation_rps(s.profile, config.model, first), 3)
               for s in specs}
    setup = Setup(config.cluster, config.model, config.predictor, cap, slo, weights, config.max_wait_s, windows)
    own = mean_rate(whole) if timed else None
    start = round_rate(own if own else capacity * START_OVER_CAPACITY)
    return Plan(setup, whole, timed, capacity, capacity_seeds, start, round_rate(CEILING_OVER_CAPACITY * capacity),
                feasibility(config.cluster, config.model, first, cap, slo))


def measure(config: GoodputConfig, the_plan: Plan, runner: Runner) -> dict[tuple[str, int], RateSearch]:
    """Search each policy's goodput per seed, or measure attainment at the given rates."""
    keys = [(p, s) for p in config.policies for s in the_plan.setup.windows]
    if config.rates is None:
        return locate_goodput(runner.attainments, keys, the_plan.start_rps, the_plan.ceiling_rps)
    rates = sorted(round_rate(r) for r in config.rates)
    searches = {k: RateSearch(rates[0]) for k in keys}
    for result in runner.run([(p, s, r) for p, s in keys for r in rates], "measuring:"):
        searches[(result.policy, result.seed)].tried[result.rate] = result.figures["attainment"] >= ATTAINMENT_TARGET
    return searches


def policy_summary(policy: str, seeds: Sequence[int], searches: dict[tuple[str, int], RateSearch],
                   results: dict[tuple[str, int, float], RunResult], capacity: float) -> dict[str, Any]:
    """Return one policy's figures: goodput per seed and its median, attainment per rate, at-goodput figures."""
    mine = {(s, r): res for (p, s, r), res in results.items() if p == policy}
    goodputs = [searches[(policy, s)].goodput for s in seeds]
    at_goodput = [mine.get((s, searches[(policy, s)].goodput)) for s in seeds]
    at_goodput_runs = [r for r in at_goodput if r is not None]
    median = float(statistics.median(goodputs))
    return {
        "goodput_rps": round(median, 3),
        "goodput_rps_seeds": goodputs,
        "goodput_range": [min(goodputs), max(goodputs)],
        "goodput_over_capacity": round(median / capacity, 4) if capacity else None,  # > 1: not a steady state
        "goodput_lower_bound": any(searches[(policy, s)].bracket()[1] is None for s in seeds),
        "attainment_at": _by_rate(mine, "attainment", _median),
        "attainment_at_seeds": {rate_key(r): {str(s): res.figures["attainment"] for (s, rr), res in mine.items()
                                              if rr == r} for r in sorted({r for _, r in mine})},
        "preemptions": _median_int([r.figures["preemptions"] for r in at_goodput_runs]),
        "preemptions_at": _by_rate(mine, "preemptions", _median_int),
        "rejected_below_goodput": sum(res.figures["rejected"] for (s, r), res in mine.items()
                                      if r <= searches[(policy, s)].goodput),
        "kv_held_at_goodput": _median([r.figures.get("kv_held_share") for r in at_goodput_runs]),
        "kv_used_at_goodput": _mean_maps([r.figures.get("kv_used_by_gpu") for r in at_goodput_runs]),
        "kv_reserved_at_goodput": _mean_maps([r.figures.get("kv_reserved_by_gpu") for r in at_goodput_runs]),
    }


def peer_summary(peer: str, seeds: Sequence[int], rates: Sequence[float],
                 results: dict[tuple[str, int, float], RunResult], capacity: float) -> dict[str, Any]:
    """Return one peer's figures at its rates: attainment per rate (``attainment_at``), outcome counts, the
    goodput on that grid (the highest rate passing with every lower one; a lower bound when the top passed),
    the time scale, and every run under ``runs``."""
    mine = {key: res for key, res in results.items() if key[0] == peer}
    searches = {(peer, s): RateSearch(rates[0] if rates else 1.0) for s in seeds}
    for (_, seed, rate), res in mine.items():
        searches[(peer, seed)].tried[rate] = res.figures["attainment"] >= ATTAINMENT_TARGET
    out = policy_summary(peer, seeds, searches, mine, capacity)
    for key in ("preemptions", "preemptions_at", "kv_held_at_goodput", "kv_used_at_goodput", "kv_reserved_at_goodput"):
        out.pop(key)  # the sim-servers count none of these per request
    by_seed = {(seed, rate): res for (_, seed, rate), res in mine.items()}
    scales = sorted({res.figures["time_scale"] for res in mine.values()})
    out |= {f"{k}_at": _by_rate(by_seed, k, _median_int) for k in ("completed", "rejected", "failed", "lost")}
    out |= {"rates": list(rates), "time_scale": scales[0] if len(scales) == 1 else scales,
            "load_poll_staleness_s": _max([res.figures["load_poll_staleness_s"] for res in mine.values()]),
            "eos_honoured": _median([res.figures.get("eos_honoured") for res in mine.values()]),
            "runs": {rate_key(r): {str(s): res.figures for (_, s, rr), res in sorted(mine.items()) if rr == r}
                     for r in rates}}
    return out


def full_vs_virtual(full: dict[tuple[str, int, float], RunResult],
                    virtual: dict[tuple[str, int, float], RunResult]) -> dict[str, dict[str, Any]]:
    """Per policy, the full and the virtual attainment of each point run both ways (``--full --rates``).

    A point ``confirms`` when the full attainment is within CONFIRM_TOLERANCE of the virtual one (relative)
    and both give the same verdict against the 90% target; ``full_confirms_virtual`` when every point does.
    """
    out: dict[str, dict[str, Any]] = {}
    for (policy, seed, rate), res in sorted(full.items()):
        if (other := virtual.get((policy, seed, rate))) is None:
            continue
        got, want = res.figures["attainment"], other.figures["attainment"]
        confirms = abs(got - want) <= CONFIRM_TOLERANCE * want + 1e-9 and (got >= ATTAINMENT_TARGET) == (
            want >= ATTAINMENT_TARGET)
        entry = out.setdefault(policy, {"full_vs_virtual": {}, "virtual_attainment_at_seeds": {}})
        entry["full_vs_virtual"].setdefault(rate_key(rate), {})[str(seed)] = {
            "full": got, "virtual": want, "diff": round(got - want, 4), "confirms": confirms}
        entry["virtual_attainment_at_seeds"].setdefault(rate_key(rate), {})[str(seed)] = want
    for entry in out.values():
        entry["virtual_attainment_at"] = {r: _median(list(v.values()))
                                          for r, v in entry["virtual_attainment_at_seeds"].items()}
        entry["full_confirms_virtual"] = all(c["confirms"] for v in entry["full_vs_virtual"].values()
                                             for c in v.values())
    return out


def _attainment_seeds(results: dict[tuple[str, int, float], RunResult], policy: str) -> dict[str, dict[str, float]]:
    """Rate → seed → attainment of one policy's runs."""
    out: dict[str, dict[str, float]] = {}
    for (p, seed, rate), res in sorted(results.items()):
        if p == policy:
            out.setdefault(rate_key(rate), {})[str(seed)] = res.figures["attainment"]
    return out


def _by_rate(runs: dict[tuple[int, float], RunResult], key: str, combine: Callable[[list], Any]) -> dict[str, Any]:
    rates = sorted({r for _, r in runs})
    out = {}
    for rate in rates:
        values = [res.figures[key] for (_, r), res in runs.items() if r == rate and res.figures[key] is not None]
        out[rate_key(rate)] = combine(values) if values else None
    return out


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return round(float(statistics.median(kept)), 4) if kept else None


def _max(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return max(kept) if kept else None


def _median_int(values: Sequence[int | None]) -> int | None:
    kept = [v for v in values if v is not None]
    return int(round(statistics.median(kept))) if kept else None


def _mean_maps(maps: Sequence[dict[str, float] | None]) -> dict[str, float] | None:
    kept = [m for m in maps if m]
    if not kept:
        return None
    return {k: round(float(np.mean([m[k] for m in kept if k in m])), 4) for k in kept[0]}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(float(value), digits)


# --- --full: through the whole system ---------------------------------------------------------------


def full_time_scale(config: GoodputConfig, trace: Trace, slo: Slo) -> float:
    """Return the time scale of a full run: arrivals in ~target_wall_s, DIO's delay ≤ 5% of the TTFT limit."""
    if config.time_scale:
        return config.time_scale
    bound = max(1.0, MAX_CONTROL_SHARE * slo.ttft_ms / CONTROL_PLANE_WALL_MS)
    return min(auto_time_scale(span_s(trace), config.target_wall_s), auto_time_scale(bound, 1.0))


def drain_wall_s(config: GoodputConfig, setup: Setup, trace: Trace, scale: float) -> float:
    """Return how long to wait after the last arrival: at least as long as a request arriving last could take
    and still meet its SLO (TTFT limit + TPOT limit x (cap - 1), x 1.2), however short ``--drain-wall-s``."""
    longest = setup.cap or max(r.output_tokens for r in trace)
    slo_s = (setup.slo.ttft_ms + setup.slo.tpot_ms * (longest - 1)) / 1000.0
    return max(config.drain_wall_s, MIN_DRAIN_WALL_S, 1.2 * slo_s / scale)


def run_full(config: GoodputConfig, setup: Setup, redis_url: str, point: tuple[str, int, float]) -> RunResult:
    """Replay one seed's window at ``rate`` through a fresh local cluster (Redis, dispatcher, workers)."""
    policy, seed, rate = point
    trace = at_rate(setup.windows[seed].requests, rate)
    scale = full_time_scale(config, trace, setup.slo)
    drain = drain_wall_s(config, setup, trace, scale)
    run = RunConfig(workers=parse_workers(setup.cluster), model=setup.model, policy=policy, predictor=setup.predictor,
                    time_scale=scale, drain_wall_s=drain, max_wait_s=setup.max_wait_s, seed=seed,
                    max_tokens=setup.cap, ttft_slo_ms=setup.slo.ttft_ms, tpot_slo_ms=setup.slo.tpot_ms)
    record = run_trace(redis_url, run, trace)
    figures = run_figures(record.outcomes, setup.slo) | {
        "time_scale": scale, "makespan_s": round(record.wall_s * scale, 2), "cpu_cores": record.cpu}
    if setup.cap is not None:
        figures["eos_honoured"] = eos_honoured(record.outcomes, trace, setup.cap)
    return RunResult(policy, seed, rate, figures, columns(record.outcomes, list(record.worker_gpus), None, None))


# --- --peers: real routers over HTTP ------------------------------------------------------------------


def peer_time_scale(config: GoodputConfig, trace: Trace, slo: Slo) -> float:
    """Return the time scale of a peer run: real time (1) unless its arrivals would take over PEER_TARGET_WALL_S.

    At 1 every wall-clock habit of a router is as deployed: power_of_two's loads, polled every
    ``LOAD_POLL_WALL_S``, are as stale as in production, and an HTTP hop's ~1 wall ms is ~1 simulated
    ms. Above 1 both grow by the scale, so it is capped as DIO's full runs are (``full_time_scale``).
    """
    if config.peer_time_scale:
        return config.peer_time_scale
    bound = max(1.0, MAX_CONTROL_SHARE * slo.ttft_ms / CONTROL_PLANE_WALL_MS)
    return min(auto_time_scale(span_s(trace), PEER_TARGET_WALL_S), bound)


def run_peer_point(config: GoodputConfig, setup: Setup, point: tuple[str, int, float]) -> RunResult:
    """Replay one seed's window at ``rate`` through peer router ``point[0]`` in front of the simulated GPUs.

    Every request carries the cap as ``max_tokens`` and its true length as ``dio_eos_tokens``, which
    the router forwards untouched and the sim-server's engine stops at; TTFT is the first streamed
    token, the output length the stream's usage, so TPOT and attainment are computed as for DIO.
    """
    peer, seed, rate = point
    trace = at_rate(setup.windows[seed].requests, rate)
    scale = peer_time_scale(config, trace, setup.slo)
    drain = drain_wall_s(config, setup, trace, scale)
    record, workers = run_peer(peer, setup.cluster, setup.model, trace, scale, drain, max_tokens=setup.cap, seed=seed)
    polls = [w["load_polls"] for w in workers.values() if w.get("load_polls") is not None]
    figures = run_figures(record.outcomes, setup.slo) | {
        "time_scale": scale, "load_poll_staleness_s": LOAD_POLL_WALL_S * scale if peer.endswith(":power_of_two")
        else None,
        "load_polls_per_worker": _median(polls), "makespan_s": round(record.wall_s * scale, 2),
        "cpu_cores": record.cpu, "overhead_wall_s": record.overhead_s, "workers": workers,
        "gpu_share": gpu_shares(workers)}
    if setup.cap is not None:
        figures["eos_honoured"] = eos_honoured(record.outcomes, trace, setup.cap)
    return RunResult(peer, seed, rate, figures, columns(record.outcomes, [], None, None))


def peer_rates(config: GoodputConfig, searches: dict[tuple[str, int], RateSearch], seeds: Sequence[int],
               fallback: float) -> tuple[list[float], str]:
    """Return the rates the peers run at and why: ``--rates``, else PEER_RATE_FACTORS x the anchor's goodput.

    The anchor is DIO's median virtual goodput over the seeds (the policy with the highest median
    if DIO is not run); ``fallback`` (the search's start) when that is 0.
    """
    if config.rates is not None:
        return sorted(round_rate(r) for r in config.rates), "--rates"
    medians = {p: float(statistics.median(searches[(p, s)].goodput for s in seeds)) for p in config.policies}
    anchor = PEER_ANCHOR if PEER_ANCHOR in medians else max(medians, key=lambda p: medians[p])
    base = medians[anchor] or fallback
    rates = sorted({round_rate(f * base) for f in PEER_RATE_FACTORS})
    return rates, (f"{' and '.join(f'{f:g}' for f in PEER_RATE_FACTORS)} x {anchor}'s median virtual goodput "
                   f"({base:g} req/s)" if medians[anchor] else f"the search's start ({base:g} req/s)")


def eos_honoured(outcomes: Sequence[Outcome], trace: Trace, cap: int) -> float | None:
    """Return the share of completed requests that stopped at their true length (not ran on to the cap)."""
    pairs = [(o.output_tokens, min(r.output_tokens, cap)) for o, r in zip(outcomes, trace, strict=True)
             if o.status == "completed" and r.output_tokens < cap]
    return round(sum(got == want for got, want in pairs) / len(pairs), 4) if pairs else None


# --- output -----------------------------------------------------------------------------------------


def result_name(config: GoodputConfig, slo: Slo) -> str:
    """Return the result file stem: goodput-[full-]<trace>-<slo>[-oracle]."""
    if config.name:
        return config.name
    slo_part = slo.name.replace(":", "-")
    oracle = "-oracle" if config.max_tokens.strip().lower() == ORACLE else ""
    return f"goodput-{'full-' if config.full else ''}{trace_name(config.trace)}-{slo_part}{oracle}"


def save_records(path: Path, the_plan: Plan, results: dict[tuple[str, int, float], RunResult],
                 worker_ids: Sequence[str]) -> Path:
    """Write every run's per-request records as gzipped JSON lines: a header, one line per window, one per run.

    A run's arrivals are its window's, rescaled to its rate (``dio.ops.bench.workload.at_rate``).
    """
    with gzip.open(path, "wt", encoding="utf-8") as out:
        header = {"kind": "header", "columns": RECORD_COLUMNS, "status_codes": STATUS_CODES,
                  "workers": list(worker_ids), "slo": the_plan.setup.slo.brief(), "max_tokens": the_plan.setup.cap,
                  "units": "simulated ms; worker: index into workers, -1 none"}
        out.write(json.dumps(header) + "\n")
        for w in the_plan.setup.windows.values():
            out.write(json.dumps({"kind": "window", "seed": w.seed, "start": w.start,
                                  "arrival_s": [round(r.arrival_s, 4) for r in w.requests],
                                  "prompt_tokens": [r.prompt_tokens for r in w.requests],
                                  "output_tokens": [r.output_tokens for r in w.requests]}) + "\n")
        for (policy, seed, rate), res in sorted(results.items()):
            out.write(json.dumps({"kind": "run", "policy": policy, "seed": seed, "rate": rate, **res.columns}) + "\n")
    return path


def load_records(path: Path) -> dict[str, Any]:
    """Read a records file: ``header``, ``windows`` (by seed) and ``runs`` ((policy, seed, rate) → columns)."""
    out: dict[str, Any] = {"windows": {}, "runs": {}}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            row = json.loads(line)
            kind = row.pop("kind")
            if kind == "header":
                out["header"] = row
            elif kind == "window":
                out["windows"][row["seed"]] = row
            else:
                out["runs"][(row.pop("policy"), row.pop("seed"), row.pop("rate"))] = row
    return out


def print_tables(title: str, the_plan: Plan, summaries: dict[str, dict[str, Any]], sweep: list[float]) -> None:
    """Print the feasibility, goodput, attainment and KV tables (shares in %)."""
    slo = the_plan.setup.slo
    rows: list[list[Any]] = [[gpu, f["profile"], f["fit"], f["ttft_p99_ms"], f["tpot_p99_ms"], _pct(f["meets_both"]),
                              "yes" if f["feasible"] else ("no" if slo.standard else "no (not required)")]
                             for gpu, f in the_plan.feasibility.items()]
    report.console.print(report.table(f"feasibility: {slo.name} (TTFT {slo.ttft_ms:g} ms, TPOT {slo.tpot_ms:g} ms) "
                                      "alone on an idle GPU", ["GPU", "profile", "fit", "TTFT p99", "TPOT p99",
                                                               "meet both %", "≥ 95%"], rows))
    rows = [[p, s["goodput_rps"], f"{s['goodput_range'][0]:.3g}–{s['goodput_range'][1]:.3g}"
             + ("+" if s["goodput_lower_bound"] else ""), _pct(s["goodput_over_capacity"]), s["preemptions"],
             _pct(s["kv_held_at_goodput"]), s["rejected_below_goodput"]] for p, s in summaries.items()]
    report.console.print(report.table(title, ["policy", "goodput req/s", "range", "of capacity %", "preempt.",
                                              "KV-held %", "rejected"], rows))
    rows = [[p, *(_pct(s["attainment_at"].get(rate_key(r))) for r in sweep)] for p, s in summaries.items()]
    report.console.print(report.table("SLO attainment % (median over seeds) at each swept rate (req/s)",
                                      ["policy", *(rate_key(r) for r in sweep)], rows))
    gpus = list(the_plan.feasibility)
    rows = [[p, *(_kv_cell(s, g) for g in gpus)] for p, s in summaries.items()]
    report.console.print(report.table("KV cache at goodput, % used / % reserved by the router (time average)",
                                      ["policy", *gpus], rows))


def print_comparisons(summaries: dict[str, dict[str, Any]], peer_summaries: dict[str, dict[str, Any]]) -> None:
    """Print full against virtual attainment (--full --rates) and the peers' attainment at their rates."""
    rows = [[p, rate, seed, _pct(c["virtual"]), _pct(c["full"]), f"{100 * c['diff']:+.1f}",
             "yes" if c["confirms"] else "no"]
            for p, s in summaries.items() for rate, by_seed in (s.get("full_vs_virtual") or {}).items()
            for seed, c in by_seed.items()]
    if rows:
        report.console.print(report.table(
            f"full against virtual: SLO attainment % at the same rate and seed (confirms: within "
            f"{CONFIRM_TOLERANCE:.0%} of virtual and the same verdict against {ATTAINMENT_TARGET:.0%})",
            ["policy", "rate", "seed", "virtual %", "full %", "full - virtual", "confirms"], rows))
    if not peer_summaries:
        return
    rates = sorted({float(r) for s in peer_summaries.values() for r in s["attainment_at"]})
    rows = [[peer, *(_pct(s["attainment_at"].get(rate_key(r))) for r in rates),
             f"{s['goodput_rps']:g}" + ("+" if s["goodput_lower_bound"] else ""), _cells(s, "failed"),
             _cells(s, "lost")] for peer, s in peer_summaries.items()]
    rows += [[p, *(_pct(s["attainment_at"].get(rate_key(r))) for r in rates), f"{s['goodput_rps']:g}", "-", "-"]
             for p, s in summaries.items()]
    scales = sorted({str(s["time_scale"]) for s in peer_summaries.values()})
    report.console.print(report.table(
        f"peers over HTTP (time scale {', '.join(scales)}): SLO attainment % (median over seeds) at each rate "
        "(req/s), beside DIO's policies; goodput on that grid (+: passed at the top)",
        ["peer / policy", *(rate_key(r) for r in rates), "goodput", "failed", "lost"], rows))


def _cells(summary: dict[str, Any], key: str) -> str:
    """A peer's count of ``key`` per rate (median over seeds), '/'-separated."""
    return " / ".join(str(v) for v in (summary.get(f"{key}_at") or {}).values()) or "-"


def _kv_cell(summary: dict[str, Any], gpu: str) -> str:
    used, reserved = summary.get("kv_used_at_goodput") or {}, summary.get("kv_reserved_at_goodput") or {}
    if gpu not in used:
        return "-"
    return f"{_pct(used[gpu])} / {_pct(reserved.get(gpu))}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def plot(summaries: dict[str, dict[str, Any]], title: str, capacity: float, seeds: int, path: Path) -> Path | None:
    """Plot attainment against rate: per policy the median over seeds and its min-max band (None: no matplotlib).

    The line and band go through the rates every seed ran (the sweep); the bisection's rates,
    each run by one seed, are dots; a dotted line marks the median goodput.
    """
    try:
        from dio.ops.bench import plots
    except ImportError:
        return None
    series = {}
    for policy, s in summaries.items():
        by_rate = {float(r): list(v.values()) for r, v in s["attainment_at_seeds"].items()}
        shared = [r for r, v in by_rate.items() if len(v) == seeds]
        series[policy] = {"rates": shared, "median": [float(np.median(by_rate[r])) for r in shared],
                          "low": [min(by_rate[r]) for r in shared], "high": [max(by_rate[r]) for r in shared],
                          "points": [(r, a) for r, v in by_rate.items() if len(v) < seeds for a in v],
                          "mark": s["goodput_rps"] or None}
    return plots.rate_bands(series, title.replace(", SLO", ",\nSLO"), "offered rate (requests per simulated s)",
                            "SLO attainment", path, hline=ATTAINMENT_TARGET, vline=capacity,
                            vline_label="capacity_rps")


def run_goodput(config: GoodputConfig) -> dict[str, Any]:
    """Run the goodput benchmark; print the tables, write the result, records and plot; return the --json line."""
    validate(config)
    the_plan = plan(config)
    setup = the_plan.setup
    name = result_name(config, setup.slo)
    report.status.print(f"{trace_name(config.trace)}: {len(setup.windows)} seed(s) x {config.max_requests} requests, "
                        f"max_tokens {setup.cap or ORACLE}, SLO {setup.slo.name}, capacity "
                        f"{the_plan.capacity_rps:.2f} req/s, rates from {the_plan.start_rps:g}")
    _warn_infeasible(the_plan)
    if config.seeds < DEFAULT_SEEDS:
        report.status.print(f"note: {config.seeds} seed(s): the goodput's spread needs at least {DEFAULT_SEEDS}")
    seeds = list(setup.windows)
    confirmed: dict[tuple[str, int, float], RunResult] = {}  # --full: at each virtual goodput point
    beside: dict[tuple[str, int, float], RunResult] = {}  # --full --rates: the virtual runs of the same points
    peer_results: dict[tuple[str, int, float], RunResult] = {}
    rates_for_peers: list[float] = []
    peer_rule = ""
    with ExitStack() as stack:
        jobs = config.jobs or os.cpu_count() or 1
        bar = stack.enter_context(report.progress())
        if config.full:
            from dio.ops.redis_server import ensure_redis
            from dio.protocol.settings import CommonSettings

            url = stack.enter_context(ensure_redis(CommonSettings().redis_url)).url
            full = stack.enter_context(Runner(setup, 1, bar, lambda point: run_full(config, setup, url, point)))
        if config.full and config.rates is not None:
            searches, results = measure(config, the_plan, full), full.results
            virtual = stack.enter_context(Runner(setup, jobs, bar))
            virtual.run(list(results), "the same points virtually:")
            beside = virtual.results
        else:
            virtual = stack.enter_context(Runner(setup, jobs, bar))
            searches, results = measure(config, the_plan, virtual), virtual.results
            if config.full:  # the whole system at each policy's goodput point, per seed
                points = [(p, s, searches[(p, s)].goodput) for p in config.policies for s in seeds]
                full.run([pt for pt in points if pt[2] > 0], "confirming with full runs:")
                confirmed = full.results
        if config.peers:
            rates_for_peers, peer_rule = peer_rates(config, searches, seeds, the_plan.start_rps)
            peers = stack.enter_context(Runner(setup, 1, bar, lambda point: run_peer_point(config, setup, point)))
            peers.run([(peer, s, r) for peer in config.peers for s in seeds for r in rates_for_peers],
                      "peers over HTTP:")
            peer_results = peers.results
    summaries = {p: policy_summary(p, seeds, searches, results, the_plan.capacity_rps) for p in config.policies}
    for policy, comparison in full_vs_virtual(results, beside).items():
        summaries[policy] |= comparison
    peer_summaries = {peer: peer_summary(peer, seeds, rates_for_peers, peer_results, the_plan.capacity_rps)
                      | {"rates_rule": peer_rule} for peer in config.peers}
    for (policy, seed, rate), res in confirmed.items():
        summaries[policy].setdefault("full_attainment_at_goodput", {})[str(seed)] = {
            "rate": rate, "attainment": res.figures["attainment"], "virtual": results[(policy, seed, rate)].figures[
                "attainment"]}
    worker_ids = [f"{s.profile}-{n}" for s in parse_workers(config.cluster) for n in range(1, s.count + 1)]
    out_dir = Path(config.out_dir or report.RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = save_records(out_dir / f"{name}.records.jsonl.gz", the_plan, results | {
        (f"{p}{FULL}", s, r): res for (p, s, r), res in confirmed.items()} | {
        (f"{p}{VIRTUAL}", s, r): res for (p, s, r), res in beside.items()} | peer_results, worker_ids)
    title = (f"goodput: {trace_name(config.trace)} on {config.cluster} ({config.model}), SLO {setup.slo.name} "
             f"(TTFT {setup.slo.ttft_ms:g} ms, TPOT {setup.slo.tpot_ms:g} ms), max_tokens {setup.cap or ORACLE}, "
             f"{'full' if config.full and config.rates is not None else 'virtual'}"
             + (", peers over HTTP" if config.peers else ""))
    sweep = sorted({r for (_, _, r) in results if all((p, s, r) in results for p in config.policies for s in seeds)})
    lines = summaries | {f"{p}{VIRTUAL}": {"attainment_at_seeds": _attainment_seeds(beside, p), "goodput_rps": None}
                         for p in config.policies if beside} | {
        peer: {**s, "goodput_rps": None} for peer, s in peer_summaries.items()}
    png = plot(lines, title, the_plan.capacity_rps, len(seeds), out_dir / f"{name}.png")
    figures = result_figures(config, the_plan, summaries, results, seeds) | {
        "peers": peer_summaries, "peer_rates": rates_for_peers,
        "peer_rates_rule": f"--peers without --rates: {' and '.join(f'{f:g}' for f in PEER_RATE_FACTORS)} x "
                           f"{PEER_ANCHOR}'s median virtual goodput over the seeds",
        "peer_time_scale_rule": f"real time (1) unless a run's arrivals take over {PEER_TARGET_WALL_S:g} wall s; "
                                f"power_of_two polls /get_load every {LOAD_POLL_WALL_S:g} wall s "
                                "(load_poll_staleness_s = that x the time scale, in simulated s)",
        "full_time_scale_rule": f"arrivals in ~{config.target_wall_s:g} wall s, at most so far that "
                                f"{CONTROL_PLANE_WALL_MS:g} wall ms per request stay within "
                                f"{MAX_CONTROL_SHARE:.0%} of the TTFT limit",
        "confirm_rule": f"--full --rates: per policy, rate and seed, |full - virtual| attainment <= "
                        f"{CONFIRM_TOLERANCE:g} x virtual, and the same verdict against {ATTAINMENT_TARGET:g}"}
    data = report.payload("goodput", figures | {"records_file": records.name, "figures_png": [png.name] if png else []})
    path = report.save(name, data, out_dir)
    print_tables(title, the_plan, summaries, sweep)
    print_comparisons(summaries, peer_summaries)
    _warn_above_capacity(summaries, the_plan.capacity_rps)
    report.status.print(f"wrote {path}, {records.name}" + (f" and {png.name}" if png else ""))
    return headline(config, the_plan, summaries, peer_summaries)


def _warn_infeasible(the_plan: Plan) -> None:
    slo = the_plan.setup.slo
    bad = [g for g, f in the_plan.feasibility.items() if not f["feasible"]]
    if bad and slo.standard:
        report.status.print(f"warning: SLO {slo.name} is met idle by fewer than {FEASIBLE_SHARE:.0%} of the requests "
                            f"that fit {', '.join(bad)}: its goodput is bounded by the GPUs, not the routing")


def _warn_above_capacity(summaries: dict[str, dict[str, Any]], capacity: float) -> None:
    above = [p for p, s in summaries.items() if s["goodput_rps"] > capacity]
    if above:
        report.status.print(f"warning: {', '.join(above)}: goodput above the cluster's saturation throughput "
                            f"({capacity:.1f} req/s): a window this short is a burst the cluster absorbs before its "
                            "queues reach a steady state; give more --max-requests")


def headline(config: GoodputConfig, the_plan: Plan, summaries: dict[str, dict[str, Any]],
             peer_summaries: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The --json line: trace, SLO, capacity, feasibility, per policy goodput and its figures, per peer attainment."""
    keys = ("goodput_rps", "goodput_rps_seeds", "attainment_at", "preemptions", "rejected_below_goodput",
            "goodput_range", "goodput_lower_bound", "kv_held_at_goodput", "kv_used_at_goodput")
    return {"trace": trace_name(config.trace), "slo": the_plan.setup.slo.brief(),
            "capacity_rps": round(the_plan.capacity_rps, 3), "max_tokens": the_plan.setup.cap or ORACLE,
            "mode": "full" if config.full else "virtual",
            "feasibility": {g: {k: f[k] for k in ("meets_both", "fit", "feasible")}
                            for g, f in the_plan.feasibility.items()},
            "policies": {p: {k: s[k] for k in (*keys, "full_attainment_at_goodput", "virtual_attainment_at",
                                               "full_confirms_virtual") if k in s}
                         for p, s in summaries.items()},
            "peers": {p: {k: s[k] for k in ("goodput_rps", "goodput_lower_bound", "attainment_at", "time_scale")}
                      for p, s in (peer_summaries or {}).items()}}


def result_figures(config: GoodputConfig, the_plan: Plan, summaries: dict[str, dict[str, Any]],
                   results: dict[tuple[str, int, float], RunResult], seeds: list[int]) -> dict[str, Any]:
    """Return the result file's body: the setup, the feasibility table, every policy's summary and run."""
    setup = the_plan.setup
    return {
        "trace": trace_name(config.trace), "trace_file": str(config.trace), "cluster": config.cluster,
        "model": config.model, "mode": "full" if config.full else "virtual", "virtual": not config.full,
        "slo": setup.slo.brief() | {"source": setup.slo.source, "standard": setup.slo.standard},
        "slo_rule": "met when completed with TTFT <= ttft_ms and mean TPOT after the first token <= tpot_ms; "
                    "rejected, failed, cancelled and unfinished requests miss",
        "max_tokens": setup.cap or ORACLE,
        "max_tokens_rule": (f"the power of two >= the trace's p{CAP_PERCENTILE} output ({MIN_CAP_TOKENS} at least), "
                            "the same for every request; the true length stays in the simulated engine")
        if config.max_tokens.strip().lower() == AUTO else f"--max-tokens {config.max_tokens}",
        "goodput_rule": {"attainment": ATTAINMENT_TARGET, "step": RATE_STEP, "tolerance": RATE_TOLERANCE,
                         "ceiling_over_capacity": CEILING_OVER_CAPACITY, "rates_given": config.rates},
        "policies": config.policies, "predictor": config.predictor, "seeds": seeds,
        "windows": {str(w.seed): {"start": w.start, "requests": len(w.requests),
                                  "own_rps": _round(mean_rate(w.requests), 3)} for w in setup.windows.values()},
        "trace_rows": len(the_plan.whole), "timed": the_plan.timed, "start_rps": the_plan.start_rps,
        "ceiling_rps": the_plan.ceiling_rps,
        "capacity_rps": round(the_plan.capacity_rps, 3), "capacity_rps_seeds": the_plan.capacity_seeds,
        "capacity_meaning": "each GPU's saturation throughput on the window's requests (true lengths), its scheduler "
                            "run alone, summed over the cluster (dio.ops.bench.workload.engine_capacity_rps)",
        "policy_weights": setup.weights, "max_wait_s": config.max_wait_s,
        "feasibility": the_plan.feasibility,
        "latency_unit": "simulated ms",
        "summary": summaries,
        "runs": {p: {rate_key(r): {str(s): res.figures for (pp, s, rr), res in sorted(results.items())
                                    if pp == p and rr == r}
                     for r in sorted({r for (pp, _, r) in results if pp == p})} for p in config.policies},
    }
