"""The ``dio`` command line: run the processes, submit, inspect, demo, benchmark."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import threading

import typer

from dio.protocol.defaults import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DIO: a Distributed Inference Orchestrator for LLM serving on Redis.")

POLICY_HELP = ("dio | round-robin | random | least-loaded | power-of-two | queue-kv | weighted-least-connections"
               " | token-load-prefix | kv-cost")
BENCH_MISSING = ("the benchmarks run from a DIO checkout (they are not part of the installed package): "
                 "git clone the repository and pip install -e '.[bench]'")


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def dispatcher(
    policy: str = typer.Option(None, help=POLICY_HELP),
    predictor: str = typer.Option(None, help="seed | vector | rls"),
    name: str = typer.Option(None, help="consumer name (default: dispatcher-<host>-<pid>)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a dispatcher (active, or standby until the active one's lease expires)."""
    from dio.dispatcher.config import DispatcherSettings
    from dio.dispatcher.policies import POLICIES
    from dio.dispatcher.service import Dispatcher

    _logging(verbose)
    overrides = {k: v for k, v in (("policy", policy), ("predictor", predictor), ("dispatcher_name", name)) if v}
    settings = DispatcherSettings(**overrides)
    if settings.policy not in POLICIES:
        _fail(f"unknown policy {settings.policy!r}; choose one of {', '.join(POLICIES)}")
    service = Dispatcher(settings)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: service.stop())
    service.run()


@app.command()
def worker(
    # Every default is None, so that an option not given leaves its DIO_* variable (or the settings' default).
    engine: str | None = typer.Option(None, help="sim | vllm | instant [DIO_ENGINE; default sim]"),
    profile: str | None = typer.Option(None, help="simulated GPU: H100-80GB, A100-80GB, A100-40GB, L4, A10G, T4 "
                                                  "[DIO_PROFILE; default H100-80GB]"),
    model: str | None = typer.Option(None, help="model shape (sim) or model path (vllm) "
                                                f"[DIO_MODEL; default {DEFAULT_MODEL}]"),
    time_scale: float | None = typer.Option(None, help="sim: simulated seconds per wall second "
                                                       "[DIO_TIME_SCALE; default 1]"),
    count: int = typer.Option(1, help="simulated workers hosted by this one process"),
    worker_id: str | None = typer.Option(None, "--id", help="worker id (with --count N, suffixed -1..N)"),
    cluster: str | None = typer.Option(None, "--cluster", help="host one engine per GPU of a spec like H100:1,L4:2 "
                                                               "(ids H100-1, L4-1, L4-2)"),
    max_num_seqs: int | None = typer.Option(None, help="sequences the engine runs at once [DIO_MAX_NUM_SEQS]"),
    gpu_memory_utilization: float | None = typer.Option(None, help="fraction of VRAM for weights + KV cache "
                                                                   "[DIO_GPU_MEMORY_UTILIZATION]"),
    max_model_len: int | None = typer.Option(None, help="vllm: the model's context length [DIO_MAX_MODEL_LEN]"),
    kv_capacity_tokens: int | None = typer.Option(None, help="sim: override the KV capacity in tokens "
                                                             "[DIO_KV_CAPACITY_TOKENS]"),
    load_format: str | None = typer.Option(None, help="vllm: 'dummy' for random weights [DIO_LOAD_FORMAT]"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a GPU worker daemon (or several simulated ones in one process)."""
    from dio.gpu_worker.config import WorkerSettings
    from dio.gpu_worker.daemon import WorkerIdInUse, serve
    from dio.gpu_worker.engine_factory import make_engine

    _logging(verbose)
    given = {"engine": engine, "profile": profile, "model": model, "time_scale": time_scale,
             "max_num_seqs": max_num_seqs, "gpu_memory_utilization": gpu_memory_utilization,
             "max_model_len": max_model_len, "kv_capacity_tokens": kv_capacity_tokens, "load_format": load_format}
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    try:
        if cluster:
            engines, ids = _cluster_engines(settings, cluster)
        else:
            engines = [make_engine(settings) for _ in range(count)]
            base = worker_id or settings.worker_id
            ids = [base] if count == 1 else [f"{base or settings.profile}-{i + 1}" for i in range(count)]
    except ValueError as exc:
        _fail(str(exc))
    try:
        asyncio.run(serve(settings, engines, ids))
    except WorkerIdInUse as exc:  # nothing of the live owner's was touched
        _fail(str(exc))


def _cluster_engines(settings, spec: str) -> tuple[list, list[str]]:
    """Build one engine per GPU of a ``PROFILE:COUNT,...`` spec, with the ids a LocalCluster uses."""
    from dio.gpu_worker.engine_factory import make_engine
    from dio.ops.local_cluster import parse_workers, worker_ids

    pairs = worker_ids(parse_workers(spec))
    engines = [make_engine(settings.model_copy(update={"profile": profile})) for profile, _ in pairs]
    return engines, [worker_id for _, worker_id in pairs]


@app.command()
def up(
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:1,T4:1", help="GPU profiles and counts"),
    policy: str = typer.Option("dio"),
    predictor: str = typer.Option("vector"),
    model: str = typer.Option(DEFAULT_MODEL),
    time_scale: float = typer.Option(1.0, help="simulated seconds per wall second"),
    log_dir: str = typer.Option(None, help="write each process's log here"),
) -> None:
    """Run a local cluster (dispatcher + simulated workers) until Ctrl-C or SIGTERM.

    A process of it that exits is started again (capped backoff, logged); the password, in
    DIO_REDIS_PASSWORD or in the URL, reaches the processes through their environment and is
    never printed.
    """
    from pathlib import Path

    from dio.ops.local_cluster import LocalCluster, parse_workers
    from dio.ops.redis_server import RedisServerError, ensure_redis
    from dio.protocol.connection import connection_options, redact_url
    from dio.protocol.settings import CommonSettings

    _logging(False)
    settings = CommonSettings()
    try:
        specs = parse_workers(workers)
    except ValueError as exc:
        _fail(str(exc))
    try:
        server = ensure_redis(settings.redis_url, **connection_options(settings))
    except RedisServerError as exc:  # its message names the URL without the password
        _fail(str(exc))
    with server:
        # A private server started here has no password or TLS: the children get its URL alone.
        connection = settings if not server.owned else CommonSettings(
            redis_url=server.url, redis_username=None, redis_password=None, redis_ca_certs=None,
            redis_certfile=None, redis_keyfile=None, key_prefix=settings.key_prefix)
        cluster = LocalCluster(server.url, specs, key_prefix=settings.key_prefix, policy=policy, predictor=predictor,
                               model=model, time_scale=time_scale, log_dir=Path(log_dir) if log_dir else None,
                               connection=connection)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            cluster.start()
            typer.echo(f"DIO is up: {workers} ({model}, policy {policy}, time scale {time_scale})")
            typer.echo(f"export DIO_REDIS_URL={redact_url(server.url)}")
            if connection.redis_password or redact_url(server.url) != server.url:
                typer.echo("(the password is not shown: put it in DIO_REDIS_URL or DIO_REDIS_PASSWORD yourself)")
            if settings.key_prefix != CommonSettings.model_fields["key_prefix"].default:
                typer.echo(f"export DIO_KEY_PREFIX='{settings.key_prefix}'")
            typer.echo("Ctrl-C stops it.")
            cluster.supervise(stop)
        finally:
            typer.echo("stopping (workers drain their jobs)...")
            cluster.stop()


@app.command()
def submit(
    prompt: str = typer.Argument(..., help="the prompt text"),
    max_tokens: int = typer.Option(64),
    model: str = typer.Option(DEFAULT_MODEL),
    tier: str = typer.Option("interactive", help="interactive | batch"),
    deadline_ms: float = typer.Option(None, help="deadline (ms from submission)"),
    ttft_slo_ms: float = typer.Option(None, help="time-to-first-token SLO (ms)"),
    tpot_slo_ms: float = typer.Option(None, help="time-per-output-token SLO (ms)"),
    sheddable: bool = typer.Option(False, "--sheddable", help="may be rejected at once when predicted to miss its SLO"),
    timeout: float = typer.Option(120.0, help="seconds to wait for the result"),
    as_json: bool = typer.Option(False, "--json", help="print the whole result as JSON"),
) -> None:
    """Submit one request and print its result."""
    from dio.client import Client, DIOError

    with Client() as dio:
        try:
            handle = dio.submit(prompt, max_tokens=max_tokens, model=model, tier=tier, deadline_ms=deadline_ms,
                                ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, sheddable=sheddable or None)
            result = handle.result(timeout=timeout)
        except DIOError as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(result.model_dump_json(exclude_none=True))
        return
    latency = result.latency_s
    typer.echo(f"{result.status.value} on {result.worker} in {latency * 1000:.0f} ms "
               f"({result.prompt_tokens} prompt + {result.output_tokens} output tokens)")
    typer.echo(result.output or "")


@app.command()
def inspect(as_json: bool = typer.Option(False, "--json", help="print one JSON object")) -> None:
    """Show workers, queues, pending work and predictors: what redis-cli shows, explained."""
    from dio.ops.inspect import collect, render
    from dio.protocol.connection import connect
    from dio.protocol.settings import CommonSettings

    settings = CommonSettings()
    facts = collect(connect(settings), settings.keys)
    if as_json:
        typer.echo(json.dumps(facts, default=str))
    else:
        render(facts)


@app.command()
def demo(
    requests: int = typer.Option(500, help="requests to submit"),
    policy: str = typer.Option("dio", help=POLICY_HELP),
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:1,T4:1", help="simulated GPUs"),
    trace: str = typer.Option("azure-conv", help="bundled trace (azure-conv, azure-code, arxiv, mooncake) or a path"),
    load: float = typer.Option(0.6, help="offered load as a fraction of the cluster's estimated capacity"),
    time_scale: float = typer.Option(10.0, help="simulated seconds per wall second"),
    slo_k: float = typer.Option(5.0, help="SLO = k × the request's unloaded time on the fastest GPU"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="also print the summary as JSON on the last line"),
) -> None:
    """Run DIO end to end on a simulated heterogeneous cluster and print a summary."""
    from dio.ops.demo import DemoConfig, run_demo

    config = DemoConfig(requests=requests, policy=policy, workers=workers, trace=trace, load=load,
                        time_scale=time_scale, slo_k=slo_k, seed=seed)
    try:
        summary = run_demo(config)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
def chaos(
    requests: int = typer.Option(2000, help="requests to submit"),
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:2,T4:1", help="simulated GPUs (at least 4, 2 types)"),
    load: float = typer.Option(1.0, help="offered load as a fraction of the cluster's estimated capacity"),
    submit_s: float = typer.Option(120.0, help="wall seconds over which the requests arrive"),
    worker_kills: int = typer.Option(6, help="workers SIGKILLed (each restarted under its id within a second)"),
    worker_stalls: int = typer.Option(1, help="workers SIGSTOPped for --stall-s, then resumed"),
    stall_s: float = typer.Option(10.0, help="how long a stalled worker or dispatcher stays stopped"),
    dispatcher_kills: int = typer.Option(2, help="active dispatchers SIGKILLed"),
    dispatcher_stalls: int = typer.Option(1, help="active dispatchers SIGSTOPped for --stall-s, then resumed"),
    redis_restarts: int = typer.Option(1, help="graceful Redis restarts"),
    redis_kills: int = typer.Option(1, help="Redis SIGKILLs (restarted from its AOF)"),
    redis_restart_down_s: float = typer.Option(1.0, help="how long Redis stays down in a graceful restart"),
    redis_kill_down_s: float = typer.Option(5.0, help="how long Redis stays down after its SIGKILL"),
    malformed: int = typer.Option(50, help="malformed entries written straight to the intake"),
    cancel_fraction: float = typer.Option(0.05, help="share of the requests cancelled at random"),
    drain_s: float = typer.Option(120.0, help="after the last submission and fault: the bound on a terminal state"),
    seed: int = typer.Option(0),
    log_dir: str = typer.Option(None, help="write each process's log here"),
    as_json: bool = typer.Option(False, "--json", help="also print the summary as JSON on the last line"),
) -> None:
    """Kill and stall DIO's processes and Redis under load; check every request ends exactly once."""
    from pathlib import Path

    from dio.ops.chaos import ChaosConfig, passed, print_summary, run_chaos

    config = ChaosConfig(requests=requests, workers=workers, load=load, submit_s=submit_s, worker_kills=worker_kills,
                         worker_stalls=worker_stalls, stall_s=stall_s, dispatcher_kills=dispatcher_kills,
                         dispatcher_stalls=dispatcher_stalls,
                         redis_restarts=redis_restarts, redis_kills=redis_kills,
                         redis_restart_down_s=redis_restart_down_s, redis_kill_down_s=redis_kill_down_s,
                         malformed=malformed, cancel_fraction=cancel_fraction, drain_s=drain_s, seed=seed,
                         log_dir=Path(log_dir) if log_dir else None)
    try:
        summary = run_chaos(config)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    print_summary(summary)
    if as_json:
        typer.echo(json.dumps(summary))
    if not passed(summary):
        raise typer.Exit(1)


@app.command()
def reset(yes: bool = typer.Option(False, "--yes", help="really delete")) -> None:
    """Delete every DIO key under the configured prefix."""
    from dio.protocol.connection import connect, delete_keys
    from dio.protocol.settings import CommonSettings

    settings = CommonSettings()
    client = connect(settings)
    if not yes:
        found = sum(1 for _ in client.scan_iter(match=settings.keys.all_keys_pattern(), count=1000))
        typer.echo(f"{found} keys under {settings.key_prefix!r}; add --yes to delete them")
        return
    typer.echo(f"deleted {delete_keys(client, settings.keys)} keys")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)
def bench(ctx: typer.Context) -> None:
    """Benchmarks: goodput, replay, overload, convergence, decision cost, pipeline, simulated GPUs over HTTP."""
    # Loaded only when asked for: the product never imports benchmark code.
    try:
        from dio.ops.bench.cli import bench_app
    except ImportError as exc:
        if exc.name is not None and exc.name.startswith("dio.ops.bench"):
            _fail(BENCH_MISSING)
        raise
    bench_app(args=ctx.args, prog_name="dio bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
