"""``dio bench ...``: the benchmark commands (registered on the ``dio`` app as ``bench``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from dio.protocol.defaults import DEFAULT_MODEL

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Benchmarks: goodput, trace replay, overload, predictor convergence, decision cost, "
                             "pipeline.")

ALL_POLICIES = "dio,round-robin,random,least-loaded,power-of-two,queue-kv"


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _loads(given: list[float], ctx: typer.Context) -> list[float]:
    """Return the loads of ``--load 0.7 0.9`` (click gives the values after the first as extra args)."""
    loads = list(given)
    for arg in ctx.args:
        try:
            loads.append(float(arg))
        except ValueError:
            _fail(f"unexpected argument {arg!r}")
    return loads


EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": False}


def _run(run: Callable[[Any], dict], config: Any, as_json: bool,
         errors: tuple[type[Exception], ...] = (ValueError, RuntimeError, TimeoutError)) -> None:
    """Run a benchmark; a bad option or a run that cannot finish is one error line (exit 2), not a traceback."""
    from dio.ops.bench.report import json_line

    try:
        summary = run(config)
    except errors as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json_line(summary))


def _predictor(given: str | None) -> str:
    """Return the predictor to use: the one given, else the dispatcher's default."""
    from dio.ops.bench.cluster_run import DEFAULT_PREDICTOR

    return given or DEFAULT_PREDICTOR


@bench_app.command(context_settings=EXTRA_ARGS)
def replay(
    ctx: typer.Context,
    trace: str = typer.Option(..., help="trace file, or a bundled name: azure-code, azure-conv, arxiv, mooncake"),
    cluster: str = typer.Option("H100:1,A100-40GB:2,L4:2,T4:3", "--workers", "--cluster",
                                help="simulated GPUs: PROFILE:COUNT,..."),
    model: str = typer.Option(DEFAULT_MODEL, help="model shape the GPUs serve"),
    load: list[float] = typer.Option([0.7, 0.9], help="offered load(s), fractions of capacity: --load 0.7 0.9"),
    policies: str = typer.Option(ALL_POLICIES, help="comma-separated policies"),
    peers: str = typer.Option("", help="comma-separated peer routers ROUTER:POLICY run on the same simulated GPUs "
                              "over HTTP, e.g. vllm-router:round_robin,sglang-router:cache_aware"),
    slo_k: float = typer.Option(5.0, help="SLO = k x the request's unloaded latency on the fastest GPU"),
    time_scale: float = typer.Option(None, help="simulated s per wall s (default: arrivals take --target-wall-s)"),
    target_wall_s: float = typer.Option(12.0, help="wall seconds the arrivals of one run take (auto time scale)"),
    drain_wall_s: float = typer.Option(25.0, help="after the last arrival, wall seconds to wait for results"),
    max_requests: int = typer.Option(3000, help="requests replayed (the first N of the trace)"),
    arrivals: str = typer.Option("trace", help="trace | poisson | FILE (a timed trace whose arrival times to use)"),
    predictor: str = typer.Option(None, help="seed | vector | rls (default: the dispatcher's)"),
    deadlines: bool = typer.Option(True, help="send each request's SLO as its deadline_ms (DIO routes by it and "
                                   "rejects what it predicts late, with retry-after; the baselines ignore it)"),
    capacity: str = typer.Option("engine", help="what load 1.0 is: engine (each GPU's measured saturation "
                                 "throughput, summed) | roofline (estimate) | calibrate (a saturation run of DIO)"),
    calibrate: bool = typer.Option(False, "--calibrate", help="same as --capacity calibrate"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option(None, help="result file stem (default replay-<trace>)"),
    virtual: bool = typer.Option(False, "--virtual", help="simulated time in one process: the same routing code "
                                 "and GPU models without Redis or processes (seconds per run; for policy work)"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Replay a trace through the whole system for every policy and load; compare latency and SLOs."""
    from dio.ops.bench.replay import ReplayConfig, run_replay

    config = ReplayConfig(trace=trace, cluster=cluster, model=model, loads=_loads(load, ctx), policies=_list(policies),
                          peers=_list(peers), slo_k=slo_k, time_scale=time_scale, target_wall_s=target_wall_s,
                          drain_wall_s=drain_wall_s,
                          max_requests=max_requests, arrivals=arrivals, predictor=_predictor(predictor),
                          deadlines=deadlines,
                          capacity="calibrate" if calibrate else capacity, seed=seed, out_dir=out, name=name,
                          virtual=virtual)
    _run(run_replay, config, as_json)


@bench_app.command()
def goodput(
    trace: str = typer.Option(..., help="trace file, or a bundled name: azure-code, azure-conv, arxiv, mooncake"),
    cluster: str = typer.Option("H100:1,A100-40GB:2,L4:2,T4:3", "--workers", "--cluster",
                                help="simulated GPUs: PROFILE:COUNT,..."),
    model: str = typer.Option(DEFAULT_MODEL, help="model shape the GPUs serve"),
    slo: str = typer.Option(None, help="chat | summarization | long-context | interactive, or TTFT_MS:TPOT_MS "
                            "(default: the trace's preset: summarization for arXiv, long-context for Mooncake, "
                            "else chat)"),
    max_tokens: str = typer.Option("auto", help="auto (every request's cap: the power of two >= the trace's p99 "
                                   "output, at least 256) | oracle (each request's true length; comparison only) "
                                   "| N"),
    policies: str = typer.Option(None, help="comma-separated policies (default: every registered policy)"),
    peers: str = typer.Option("", help="peer routers ROUTER:POLICY,... (vllm-router, sglang-router) in front of the "
                              "same simulated GPUs over HTTP, at --rates or else at 0.8 and 1.0 x DIO's median "
                              "virtual goodput"),
    full: bool = typer.Option(False, "--full", help="through the whole system (Redis, dispatcher, worker "
                              "processes): at --rates, or else to confirm each policy's virtual goodput point"),
    rates: str = typer.Option(None, help="R1,R2,...: measure attainment at these rates (req/s) instead of searching"),
    seeds: int = typer.Option(3, help="seeds: trace windows and arrival/policy seeds (median and range reported)"),
    seed: int = typer.Option(0, help="the first seed"),
    max_requests: int = typer.Option(2000, help="requests per run (a window of the trace per seed)"),
    predictor: str = typer.Option(None, help="seed | vector | rls (default: the dispatcher's)"),
    jobs: int = typer.Option(None, help="processes for virtual runs (default: the CPU count)"),
    time_scale: float = typer.Option(None, help="--full: simulated s per wall s (default: auto, bounded by the SLO)"),
    peer_time_scale: float = typer.Option(None, help="--peers: simulated s per wall s (default: 1, real time, "
                                          "unless a run's arrivals would take over 120 wall s)"),
    target_wall_s: float = typer.Option(12.0, help="--full: wall seconds a run's arrivals take (auto time scale)"),
    drain_wall_s: float = typer.Option(25.0, help="--full: after the last arrival, wall seconds to wait for results"),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option(None, help="result file stem (default goodput-<trace>-<slo>)"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Goodput: the highest request rate at which >= 90% of requests meet a TTFT and TPOT SLO, per policy."""
    from dio.dispatcher.policies import POLICIES
    from dio.ops.bench.goodput import GoodputConfig, run_goodput

    try:
        given = [float(r) for r in _list(rates)] if rates else None
    except ValueError:
        _fail(f"--rates takes numbers (requests per s), got {rates!r}")
    config = GoodputConfig(trace=trace, cluster=cluster, model=model, slo=slo, max_tokens=max_tokens,
                           policies=_list(policies) if policies else list(POLICIES), peers=_list(peers), full=full,
                           rates=given, seeds=seeds, seed=seed, max_requests=max_requests,
                           predictor=_predictor(predictor), jobs=jobs, time_scale=time_scale,
                           peer_time_scale=peer_time_scale, target_wall_s=target_wall_s, drain_wall_s=drain_wall_s,
                           out_dir=out, name=name)
    _run(run_goodput, config, as_json)


@bench_app.command()
def pipeline(
    requests: int = typer.Option(20000, help="DIO requests submitted as fast as possible"),
    half_load_s: float = typer.Option(5.0, help="seconds of open-loop traffic at half the measured rate"),
    low_rates: str = typer.Option("20,100", help="also measure added latency at these request rates (per s)"),
    workers: int = typer.Option(2, help="instant-engine workers (one process)"),
    policy: str = typer.Option("dio"),
    rq_requests: int = typer.Option(1000, help="RQ jobs (one per request)"),
    xadd_requests: int = typer.Option(100000, help="redis-benchmark XADD requests"),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option("pipeline", help="result file stem"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Requests/s and added latency of DIO with an instant engine, against RQ and redis-benchmark."""
    from dio.ops.bench.pipeline import PipelineConfig, run_pipeline

    try:
        rates = tuple(float(r) for r in _list(low_rates))
    except ValueError:
        _fail(f"--low-rates takes numbers, got {low_rates!r}")
    config = PipelineConfig(requests=requests, half_load_s=half_load_s, low_rates=rates, workers=workers, policy=policy,
                            rq_requests=rq_requests, xadd_requests=xadd_requests, out_dir=out, name=name)
    _run(run_pipeline, config, as_json)


@bench_app.command(context_settings=EXTRA_ARGS)
def overload(
    ctx: typer.Context,
    trace: str = typer.Option("azure-conv", help="trace file, or a bundled name"),
    cluster: str = typer.Option("H100:1,A100-40GB:2,L4:2,T4:3", "--workers", "--cluster",
                                help="simulated GPUs: PROFILE:COUNT,..."),
    model: str = typer.Option(DEFAULT_MODEL),
    load: list[float] = typer.Option([1.0, 1.5, 2.0, 3.0], help="offered loads, multiples of capacity: --load 1 2 3"),
    duration_s: float = typer.Option(20.0, help="simulated seconds each load is offered"),
    policies: str = typer.Option(ALL_POLICIES, help="comma-separated policies"),
    slo_k: float = typer.Option(5.0, help="SLO = k x the request's unloaded latency on the fastest GPU"),
    time_scale: float = typer.Option(None, help="simulated s per wall s (default: a load takes --target-wall-s)"),
    target_wall_s: float = typer.Option(12.0, help="wall seconds each load is offered (auto time scale)"),
    drain_wall_s: float = typer.Option(25.0, help="after the last arrival, wall seconds to wait for results"),
    arrivals: str = typer.Option("trace", help="trace | poisson | FILE"),
    capacity: str = typer.Option("engine", help="engine | roofline | calibrate"),
    deadlines: bool = typer.Option(True, help="send each request's SLO as its deadline"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option(None, help="result file stem (default overload-<trace>)"),
    virtual: bool = typer.Option(False, "--virtual", help="simulated time in one process (see replay --virtual)"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Offer 1x-3x capacity to every policy: goodput, rejections with retry-after, failures."""
    from dio.ops.bench.overload import OverloadConfig, run_overload

    config = OverloadConfig(trace=trace, cluster=cluster, model=model, loads=_loads(load, ctx), duration_s=duration_s,
                            policies=_list(policies), slo_k=slo_k, time_scale=time_scale, target_wall_s=target_wall_s,
                            drain_wall_s=drain_wall_s, arrivals=arrivals, capacity=capacity, deadlines=deadlines,
                            seed=seed, out_dir=out, name=name, virtual=virtual)
    _run(run_overload, config, as_json)


@bench_app.command("batch-interference")
def batch_interference(
    cluster: str = typer.Option("H100:1,A100-40GB:1,L4:1,T4:1", "--workers", "--cluster",
                                help="simulated GPUs: PROFILE:COUNT,..."),
    trace: str = typer.Option("azure-conv", help="the interactive trace (bundled name or file)"),
    requests: int = typer.Option(1000, help="interactive requests"),
    load: float = typer.Option(0.5, help="their rate, as a fraction of the cluster's estimated capacity"),
    batch_lines: int = typer.Option(10_000, help="lines of the batch that runs beside them"),
    batch_prompt_tokens: int = typer.Option(512, help="each batch line's prompt, in tokens"),
    batch_max_tokens: int = typer.Option(128, help="each batch line's max_tokens"),
    concurrency: int = typer.Option(256, help="the batch runner's requests in flight, at most"),
    min_in_flight: int = typer.Option(2, help="...and while interactive work arrives"),
    compare_greedy: bool = typer.Option(True, help="also run the batch with the runner's pacing off (--greedy)"),
    repeats: int = typer.Option(2, help="runs of each mode, interleaved (percentiles pool their requests)"),
    time_scale: float = typer.Option(2.0, help="simulated seconds per wall second"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option("batch-interference", help="result file stem"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Interactive TTFT on one cluster with and without a big batch running (target: p99 at most 10% worse)."""
    from dio.ops.bench.batch_interference import InterferenceConfig, run_interference

    config = InterferenceConfig(workers=cluster, trace=trace, requests=requests, load=load, batch_lines=batch_lines,
                                batch_prompt_tokens=batch_prompt_tokens, batch_max_tokens=batch_max_tokens,
                                concurrency=concurrency, min_in_flight=min_in_flight, compare_greedy=compare_greedy,
                                repeats=repeats,
                                time_scale=time_scale, seed=seed, out_dir=out, name=name)
    _run(run_interference, config, as_json)


@bench_app.command()
def convergence(
    trace: str = typer.Option("azure-conv", help="trace whose request lengths (and, for tokens, arrivals) to use"),
    part: str = typer.Option("all", help="all | predictors (the end-to-end predictors, one GPU at a time) | tokens "
                             "(DIO's TTFT and TPOT predictors, inside its routing core on a cluster)"),
    gpus: str = typer.Option("H100,A100-40GB,L4,T4", help="predictors: GPU profiles, one simulated worker each"),
    predictors: str = typer.Option("seed,vector,rls,vector+prior",
                                   help="vector+prior: the vector predictor started from the roofline prior"),
    model: str = typer.Option(DEFAULT_MODEL),
    load: float = typer.Option(0.5, help="predictors: arrivals as a fraction of each GPU's saturation throughput"),
    completions: int = typer.Option(200, help="predictors: completions per phase (cold, then after the slowdown)"),
    slowdown: float = typer.Option(2.0, help="drift: the GPU's compute and bandwidth are divided by this"),
    repeats: int = typer.Option(20, help="predictors: runs (seeds) per GPU; curves are medians over them"),
    threshold_ms: float = typer.Option(50.0, help="predictors: error target (simulated ms)"),
    cluster: str = typer.Option("H100:1,A100-40GB:2,L4:2,T4:3", "--workers", "--cluster",
                                help="tokens: the simulated GPUs DIO routes over"),
    rate: float = typer.Option(40.0, help="tokens: arrivals, requests per simulated second (the trace's bursts kept)"),
    requests: int = typer.Option(16000, help="tokens: requests per run; the slowdown comes at the middle arrival"),
    drift_worker: str = typer.Option("H100-1", help="tokens: the worker that slows down (ids PROFILE-N, N from 1)"),
    token_repeats: int = typer.Option(3, help="tokens: runs (trace windows and seeds) per variant, pooled"),
    variants: str = typer.Option("prior,no-prior", help="tokens: with the roofline prior, and/or without it"),
    window: int = typer.Option(20, help="tokens: completions learned per window"),
    windows: int = typer.Option(5, help="tokens: windows shown per phase (the rest pooled into one more)"),
    target: float = typer.Option(0.10, help="tokens: the MAPE target after the first window"),
    slo: str = typer.Option(None, help="tokens: SLO every request carries: a goodput preset or TTFT_MS:TPOT_MS "
                            "(default: the trace's preset)"),
    max_tokens: str = typer.Option("auto", help="tokens: the max_tokens cap of every request: auto or N"),
    records: bool = typer.Option(False, help="tokens: also write every completion (NAME-tokens.records.jsonl.gz)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option("convergence", help="result file stem (the tokens part: NAME-tokens)"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Predictor error against completions seen, from a cold start and after a slowdown.

    predictors: each end-to-end predictor on one GPU at a time; tokens: DIO's TTFT and TPOT
    predictions at dispatch against the measured ones, per worker of a routed cluster.
    """
    from dio.ops.bench.convergence import ConvergenceConfig, TokenConfig, run_convergence, run_token_convergence

    if part not in ("all", "predictors", "tokens"):
        _fail(f"--part takes all, predictors or tokens, got {part!r}")
    config = ConvergenceConfig(trace=trace, gpus=_list(gpus), predictors=_list(predictors), model=model, load=load,
                               completions=completions, slowdown=slowdown, repeats=repeats,
                               threshold_ms=threshold_ms, seed=seed, out_dir=out, name=name)
    tokens = TokenConfig(trace=trace, cluster=cluster, model=model, rate_rps=rate, requests=requests,
                         drift_worker=drift_worker, slowdown=slowdown, window=window, windows=windows, target=target,
                         repeats=token_repeats, variants=_list(variants), slo=slo, max_tokens=max_tokens,
                         records=records, seed=seed, out_dir=out, name=f"{name}-tokens")

    def run(_: object) -> dict:
        summary = run_convergence(config) if part != "tokens" else {}
        if part != "predictors":
            summary["tokens"] = run_token_convergence(tokens)
        return summary

    _run(run, None, as_json, errors=(ValueError,))


@bench_app.command()
def decision(
    workers: str = typer.Option("1,8,32,128,512,1024", help="worker counts"),
    policies: str = typer.Option(ALL_POLICIES, help="policies timed (pure scoring)"),
    e2e_policies: str = typer.Option(None, help="policies timed end to end (default: the same)"),
    e2e: bool = typer.Option(True, help="also time one dispatcher process through Redis"),
    batch: int = typer.Option(2000, help="decisions timed per policy and worker count (pure)"),
    e2e_requests: int = typer.Option(10000, help="requests the dispatcher drains per e2e run"),
    trace: str = typer.Option("azure-conv", help="trace whose request lengths to use"),
    predictor: str = typer.Option(None, help="seed | vector | rls (default: the dispatcher's)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option("decision", help="result file stem"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Microseconds per routing decision against worker count: pure scoring and one dispatcher end to end."""
    from dio.ops.bench.decision import DecisionConfig, run_decision

    try:
        counts = [int(n) for n in _list(workers)]
    except ValueError:
        _fail(f"--workers takes whole numbers, got {workers!r}")
    config = DecisionConfig(workers=counts, policies=_list(policies),
                            e2e_policies=_list(e2e_policies) if e2e_policies else None, e2e=e2e, batch=batch,
                            e2e_requests=e2e_requests, trace=trace, predictor=_predictor(predictor), seed=seed,
                            out_dir=out,
                            name=name)
    _run(run_decision, config, as_json)


@bench_app.command()
def summary(folder: Path = typer.Option(None, help="results folder (default ops/bench/results)")) -> None:
    """Print the headline tables of the result files as Markdown."""
    from dio.ops.bench.report import RESULTS_DIR
    from dio.ops.bench.summary import render

    typer.echo(render(folder or RESULTS_DIR))


@bench_app.command("sim-server")
def sim_server(
    profile: str = typer.Option("H100-80GB", help="simulated GPU: H100-80GB, A100-80GB, A100-40GB, L4, A10G, T4"),
    model: str = typer.Option(DEFAULT_MODEL, help="model shape"),
    port: int = typer.Option(8000, help="HTTP port (with --cluster: the first of consecutive ports; 0: any free)"),
    host: str = typer.Option("127.0.0.1"),
    time_scale: float = typer.Option(1.0, help="simulated seconds per wall second"),
    max_num_seqs: int = typer.Option(None, help="sequences the engine runs at once"),
    kv_capacity_tokens: int = typer.Option(None, help="override the KV capacity in tokens"),
    cluster: str = typer.Option(None, "--workers", "--cluster",
                                help="serve several GPUs from this process, e.g. H100:1,L4:2"),
    load_format: str = typer.Option("vllm-router", help="/get_load's shape: vllm-router | sglang"),
    ports_file: str = typer.Option(None, help="write the ports served (a JSON list) to this file when ready"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve simulated GPUs over HTTP as vLLM OpenAI servers (for testing routers)."""
    import asyncio
    import logging
    import sys

    from dio.ops.bench.sim_server import LOAD_FORMATS, serve_forever, sim_specs
    from dio.ops.local_cluster import parse_workers

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if load_format not in LOAD_FORMATS:
        _fail(f"--load-format must be one of {', '.join(LOAD_FORMATS)}")
    try:
        profiles = [s.profile for s in parse_workers(cluster) for _ in range(s.count)] if cluster else [profile]
        specs = sim_specs(profiles, model, port, time_scale=time_scale, max_num_seqs=max_num_seqs,
                          kv_capacity_tokens=kv_capacity_tokens)
    except ValueError as exc:
        _fail(str(exc))
    asyncio.run(serve_forever(specs, host, load_format=load_format, ports_file=ports_file))
