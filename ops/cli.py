"""The ``dio`` command line: run the processes, submit, inspect, demo, benchmark."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING

import typer

from dio.protocol.defaults import DEFAULT_MODEL

if TYPE_CHECKING:
    from dio.client.handle import JobHandle
    from dio.protocol.models import JobResult

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DIO: a Distributed Inference Orchestrator for LLM serving on Redis.")

POLICY_HELP = ("dio | round-robin | random | least-loaded | power-of-two | queue-kv | weighted-least-connections"
               " | token-load-prefix | kv-cost")
BENCH_MISSING = ("the benchmarks run from a DIO checkout (they are not part of the installed package): "
                 "git clone the repository and pip install -e '.[bench]'")


def _logging(verbose: bool, default_level: str | None = None) -> None:
    """Set up logging: DIO_LOG_LEVEL / --log-level (DEBUG with --verbose), DIO_LOG_FORMAT / --log-format."""
    from dio.protocol.logs import setup_logging

    level = "DEBUG" if verbose else (None if os.environ.get("DIO_LOG_LEVEL") else default_level)
    setup_logging(level)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


METRICS_PORT_HELP = "serve Prometheus metrics at http://<addr>:PORT/metrics (0: any free port) [DIO_METRICS_PORT]"


def _serve_metrics(registry, port: int | None, addr: str, what: str) -> None:
    """Serve ``registry`` on ``port`` when one is set, and log where; a port that is taken is one error line."""
    from dio.protocol.metrics import MetricsPortError, serve_metrics

    if port is None:
        return
    try:
        endpoint = serve_metrics(registry, port, addr)
    except MetricsPortError as exc:
        _fail(str(exc))
    logging.getLogger("dio.ops").info("%s metrics at http://%s:%d/metrics", what, addr, endpoint.port)


@app.command()
def dispatcher(
    policy: str = typer.Option(None, help=POLICY_HELP),
    predictor: str = typer.Option(None, help="seed | vector | rls"),
    name: str = typer.Option(None, help="consumer name (default: dispatcher-<host>-<pid>)"),
    model: str | None = typer.Option(None, help="with DIO_SHARD_BY_MODEL: the model whose pool this dispatcher "
                                                "serves [DIO_MODEL]"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help=METRICS_PORT_HELP),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a dispatcher (active, or standby until the active one's lease expires)."""
    from dio.dispatcher.config import DispatcherSettings
    from dio.dispatcher.metrics import DispatcherMetrics
    from dio.dispatcher.policies import POLICIES
    from dio.dispatcher.service import Dispatcher

    _logging(verbose)
    overrides = {k: v for k, v in (("policy", policy), ("predictor", predictor), ("dispatcher_name", name),
                                   ("model", model)) if v}
    if metrics_port is not None:
        overrides["metrics_port"] = metrics_port
    settings = DispatcherSettings(**overrides)
    if settings.policy not in POLICIES:
        _fail(f"unknown policy {settings.policy!r}; choose one of {', '.join(POLICIES)}")
    metrics = DispatcherMetrics()
    _serve_metrics(metrics.registry, settings.metrics_port, settings.metrics_addr, "dispatcher")
    _warn_if_unreachable(settings)
    if settings.shard_by_model:
        logging.getLogger("dio.ops").info("sharded by model: this dispatcher serves the pool of %s (keys %s)",
                                          settings.model, settings.pool_keys.prefix)
    service = Dispatcher(settings, metrics=metrics)
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
    cluster: str | None = typer.Option(None, "--workers", "--cluster",
                                       help="host one engine per GPU of a spec like H100:1,L4:2 (ids H100-1, L4-1, "
                                            "L4-2); --cluster is the same option"),
    max_num_seqs: int | None = typer.Option(None, help="sequences the engine runs at once [DIO_MAX_NUM_SEQS]"),
    gpu_memory_utilization: float | None = typer.Option(None, help="fraction of VRAM for weights + KV cache "
                                                                   "[DIO_GPU_MEMORY_UTILIZATION]"),
    max_model_len: int | None = typer.Option(None, help="vllm: the model's context length [DIO_MAX_MODEL_LEN]"),
    kv_capacity_tokens: int | None = typer.Option(None, help="sim: override the KV capacity in tokens "
                                                             "[DIO_KV_CAPACITY_TOKENS]"),
    load_format: str | None = typer.Option(None, help="vllm: 'dummy' for random weights [DIO_LOAD_FORMAT]"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help=METRICS_PORT_HELP + "; one port for "
                                            "the workers of this process (label worker)"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Run a GPU worker daemon (or several simulated ones in one process)."""
    from dio.gpu_worker.config import WorkerSettings
    from dio.gpu_worker.daemon import WorkerIdInUse, serve
    from dio.gpu_worker.engine_factory import make_engine
    from dio.gpu_worker.metrics import WorkerMetrics

    _logging(verbose)
    given = {"engine": engine, "profile": profile, "model": model, "time_scale": time_scale,
             "max_num_seqs": max_num_seqs, "gpu_memory_utilization": gpu_memory_utilization,
             "max_model_len": max_model_len, "kv_capacity_tokens": kv_capacity_tokens, "load_format": load_format,
             "metrics_port": metrics_port}
    settings = WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    if settings.engine == "vllm" and not _vllm_available():
        from dio.ops.cli_edge import VLLM_MISSING

        _fail(VLLM_MISSING)
    try:
        if cluster:
            engines, ids = _cluster_engines(settings, cluster)
        else:
            engines = [make_engine(settings) for _ in range(count)]
            base = worker_id or settings.worker_id
            ids = [base] if count == 1 else [f"{base or settings.profile}-{i + 1}" for i in range(count)]
    except ValueError as exc:
        _fail(str(exc))
    metrics = WorkerMetrics()
    _serve_metrics(metrics.registry, settings.metrics_port, settings.metrics_addr, "worker")
    metrics.served = settings.metrics_port is not None
    _warn_if_unreachable(settings)
    try:
        asyncio.run(serve(settings, engines, ids, metrics))
    except WorkerIdInUse as exc:  # nothing of the live owner's was touched
        _fail(str(exc))


def _warn_if_unreachable(settings) -> None:
    """Log where Redis was looked for and what to check when it does not answer; the daemon waits for it."""
    from dio.ops.cli_edge import warn_if_unreachable

    warn_if_unreachable(settings, logging.getLogger("dio.ops"))


def _vllm_available() -> bool:
    """Return True when vLLM is installed, or its CPU stand-in is asked for (DIO_VLLM_STANDIN, dry runs)."""
    import importlib.util

    from dio.gpu_worker.engine_factory import STANDIN_ENV

    return bool(os.environ.get(STANDIN_ENV)) or importlib.util.find_spec("vllm") is not None


def _cluster_engines(settings, spec: str) -> tuple[list, list[str]]:
    """Build one engine per GPU of a ``PROFILE:COUNT,...`` spec, with the ids a LocalCluster uses."""
    from dio.gpu_worker.engine_factory import make_engine
    from dio.ops.local_cluster import parse_workers, worker_ids

    pairs = worker_ids(parse_workers(spec))
    engines = [make_engine(settings.model_copy(update={"profile": profile})) for profile, _ in pairs]
    return engines, [worker_id for _, worker_id in pairs]


@app.command()
def up(
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:1,T4:1", "--workers", "--cluster",
                                help="GPU profiles and counts (--cluster is the same option)"),
    policy: str = typer.Option("dio"),
    predictor: str = typer.Option("vector"),
    model: str = typer.Option(DEFAULT_MODEL),
    pools: str | None = typer.Option(None, "--pools", help="several models, each on its own GPUs: "
                                     "'llama-3.2-3b=H100:1,L4:1;llama-3.1-8b=A100-40GB:1' (instead of --workers "
                                     "and --model)"),
    shard_by_model: bool | None = typer.Option(None, "--shard-by-model/--no-shard-by-model",
                                               help="each model's keys under their own hash tag, one dispatcher "
                                                    "per pool [DIO_SHARD_BY_MODEL]"),
    time_scale: float = typer.Option(1.0, help="simulated seconds per wall second"),
    log_dir: str = typer.Option(None, help="write each process's log here"),
    metrics_port: int | None = typer.Option(None, "--metrics-port", help="Prometheus /metrics ports from this "
                                            "one up: the dispatcher's, then each worker's (default: free ports)"),
    no_metrics: bool = typer.Option(False, "--no-metrics", help="serve no /metrics endpoints"),
    gateway_port: int = typer.Option(8000, "--gateway-port", help="the OpenAI-compatible gateway's port on "
                                     "127.0.0.1 (0: a free one)"),
    no_gateway: bool = typer.Option(False, "--no-gateway", help="run no gateway"),
) -> None:
    """Run a local cluster (dispatcher + simulated workers + a gateway) until Ctrl-C or SIGTERM.

    A process of it that exits is started again (capped backoff, logged); the password, in
    DIO_REDIS_PASSWORD or in the URL, reaches the processes through their environment and is
    never printed.
    """
    from pathlib import Path

    from dio.gpu_worker.sim.profiles import get_profile
    from dio.ops.local_cluster import LocalCluster, assign_metrics_ports, format_workers, parse_pools, parse_workers
    from dio.ops.redis_server import RedisServerError, ensure_redis
    from dio.protocol.connection import connection_options, redact_url
    from dio.protocol.settings import CommonSettings

    _logging(False)
    overrides = {} if shard_by_model is None else {"shard_by_model": shard_by_model}
    settings = CommonSettings(**overrides)  # a bad prefix for sharding is one error line (cli_edge)
    try:
        specs = parse_workers(workers)
        pool_list = parse_pools(pools) if pools else None
        for pool in pool_list or []:
            settings.keys_for(pool.model)  # a model that cannot name a pool fails here
        for spec in [s for pool in pool_list or [] for s in pool.workers] or specs:
            get_profile(spec.profile)  # a GPU no profile has fails here, not in a worker process; H100 = H100-80GB
    except ValueError as exc:
        _fail(str(exc))
    # A Redis named by DIO_REDIS_URL or --redis-url is the one to use: when it does not answer,
    # say so rather than start a private server the operator did not ask for.
    configured = bool(os.environ.get("DIO_REDIS_URL"))
    try:
        server = ensure_redis(settings.redis_url, allow_start=not configured, **connection_options(settings))
    except RedisServerError as exc:  # its message names the URL without the password
        hint = ("; DIO_REDIS_URL (or --redis-url) names it, so dio up starts no Redis of its own: start that server "
                "or fix the URL, or unset DIO_REDIS_URL to have dio up start a private one") if configured else ""
        _fail(f"{exc}{hint}")
    with server:
        # A private server started here has no password or TLS: the children get its URL alone.
        connection = settings if not server.owned else CommonSettings(
            redis_url=server.url, redis_username=None, redis_password=None, redis_ca_certs=None,
            redis_certfile=None, redis_keyfile=None, redis_cluster=False, key_prefix=settings.key_prefix)
        cluster = LocalCluster(server.url, specs, key_prefix=settings.key_prefix, policy=policy, predictor=predictor,
                               model=model, time_scale=time_scale, log_dir=Path(log_dir) if log_dir else None,
                               connection=connection, batch_runner=True,
                               gateway_port=_up_gateway_port(gateway_port, no_gateway), pools=pool_list,
                               shard_by_model=settings.shard_by_model)
        if not no_metrics:
            cluster.metrics_ports = assign_metrics_ports(cluster.child_names(), metrics_port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        try:
            try:
                cluster.start()
            except (RuntimeError, TimeoutError) as exc:  # a process exited early, or the workers never registered
                _fail(f"{exc} (--log-dir DIR keeps each process's log)")
            shown = f"{workers} ({model}, " if pool_list is None else "; ".join(
                f"{p.model}={format_workers(list(p.workers))}" for p in pool_list) + " ("
            sharding = ", sharded by model: one dispatcher per pool" if settings.shard_by_model else ""
            typer.echo(f"DIO is up: {shown}policy {policy}, time scale {time_scale}{sharding})")
            if settings.shard_by_model:
                typer.echo("export DIO_SHARD_BY_MODEL=true")
            typer.echo(f"export DIO_REDIS_URL={redact_url(server.url)}")
            if connection.redis_password or redact_url(server.url) != server.url:
                typer.echo("(the password is not shown: put it in DIO_REDIS_URL or DIO_REDIS_PASSWORD yourself)")
            if settings.key_prefix != CommonSettings.model_fields["key_prefix"].default:
                typer.echo(f"export DIO_KEY_PREFIX='{settings.key_prefix}'")
            for name, port in cluster.metrics_ports.items():
                typer.echo(f"metrics: {name:<12} http://127.0.0.1:{port}/metrics")
            if cluster.gateway_url is not None:
                typer.echo(f"gateway: {cluster.gateway_url} (OpenAI base_url {cluster.gateway_url}/v1)")
                if not no_metrics:
                    typer.echo(f"metrics: {'gateway':<12} {cluster.gateway_url}/metrics")
            typer.echo("a batch runner runs `dio batch submit FILE --wait` batches")
            typer.echo("dio top shows it live; Ctrl-C stops it.")
            cluster.supervise(stop)
        finally:
            typer.echo("stopping (workers drain their jobs)...")
            cluster.stop()


def _up_gateway_port(port: int, no_gateway: bool) -> int | None:
    """The port ``dio up`` runs its gateway on (None: none, saying how to install it when it is missing)."""
    from dio.ops.gateway.server import missing_dependency

    if no_gateway:
        return None
    hint = missing_dependency()
    if hint is not None:
        typer.echo(f"no gateway: {hint}", err=True)
        return None
    return port


@app.command()
def gateway(
    host: str | None = typer.Option(None, help="address to listen on [DIO_GATEWAY_HOST; default 127.0.0.1]"),
    port: int | None = typer.Option(None, help="port to listen on, 0 for a free one [DIO_GATEWAY_PORT; default 8000]"),
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve DIO behind an OpenAI-compatible HTTP API (stateless: run as many as you like)."""
    from dio.ops.gateway.server import missing_dependency

    hint = missing_dependency()
    if hint is not None:
        _fail(hint)
    from dio.ops.gateway.server import run_cli

    _logging(verbose)
    run_cli(host, port)


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
    stream: bool = typer.Option(False, "--stream", help="print the answer as it is generated"),
) -> None:
    """Submit one request and print its result."""
    from dio.client import Client, ClientSettings, DIOError, RedisUnavailable
    from dio.ops.cli_edge import error_line

    # The client's own warnings (Redis lost, retrying) would only repeat the one error line below.
    _logging(False, default_level="ERROR")
    with Client(ClientSettings(model=model)) as dio:  # sharded by model: a client of that model's pool
        try:
            handle = dio.submit(prompt, max_tokens=max_tokens, model=model, tier=tier, deadline_ms=deadline_ms,
                                ttft_slo_ms=ttft_slo_ms, tpot_slo_ms=tpot_slo_ms, sheddable=sheddable or None,
                                stream=stream or None)
            result = _print_stream(handle, timeout) if stream and not as_json else handle.result(timeout=timeout)
        except RedisUnavailable as exc:
            _fail(f"{error_line(exc.error) or exc} (retried for {exc.retry_s:g} s, DIO_CLIENT_RETRY_S)")
        except DIOError as exc:
            _fail(str(exc))
    if as_json:
        typer.echo(result.model_dump_json(exclude_none=True))
        return
    latency = result.latency_s
    typer.echo(f"{result.status.value} on {result.worker} in {latency * 1000:.0f} ms "
               f"({result.prompt_tokens} prompt + {result.output_tokens} output tokens)")
    if not stream:
        typer.echo(result.output or "")


def _print_stream(handle: JobHandle, timeout: float) -> JobResult:
    """Print an answer as it is generated; return its completed result (raise its JobError otherwise)."""
    from dio.client.jobs import outcome

    tokens = handle.stream(timeout=timeout)
    result: JobResult | None = None
    for event in tokens:
        if event.restarted:  # what was printed is void: the job runs again on another worker
            typer.echo("\n[its worker died: the answer starts again]", err=True)
        typer.echo(event.text, nl=False)
        result = event.result or result
    typer.echo("")
    if tokens.ttft_s is not None:
        typer.echo(f"first token after {tokens.ttft_s * 1000:.0f} ms (measured here)", err=True)
    assert result is not None  # the last event always carries it
    return outcome(result, True)


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
def top(
    interval: float = typer.Option(1.0, min=0.1, help="seconds between frames (rates are over this interval)"),
    once: bool = typer.Option(False, "--once", help="print one frame (two reads, --interval apart) and exit"),
) -> None:
    """A live view of a deployment, from Redis alone: workers, intake, backlog, rates (DIO_REDIS_URL)."""
    import redis

    from dio.ops.top import run_top
    from dio.protocol.connection import connect, redact_url
    from dio.protocol.settings import CommonSettings

    settings = CommonSettings()
    try:
        run_top(connect(settings), settings.keys, interval_s=interval, once=once)
    except KeyboardInterrupt:
        pass
    except redis.RedisError as exc:
        _fail(f"cannot read DIO's state from Redis at {redact_url(settings.redis_url)}: {exc}")


@app.command()
def demo(
    requests: int = typer.Option(500, help="requests to submit"),
    policy: str = typer.Option("dio", help=POLICY_HELP),
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:1,T4:1", "--workers", "--cluster",
                                help="simulated GPUs (--cluster is the same option)"),
    trace: str = typer.Option("azure-conv", help="bundled trace (azure-conv, azure-code, arxiv, mooncake) or a path"),
    load: float = typer.Option(0.6, help="offered load as a fraction of the cluster's estimated capacity"),
    time_scale: float = typer.Option(10.0, help="simulated seconds per wall second"),
    slo: str = typer.Option(None, help="the SLO attainment is measured against: a preset (chat, summarization, "
                                       "long-context, interactive) or TTFT_MS:TPOT_MS (default: the trace's preset)"),
    seed: int = typer.Option(0),
    redis_cluster: bool = typer.Option(False, "--redis-cluster",
                                       help="run on a private three-node Redis Cluster (started and stopped here)"),
    pools: int = typer.Option(1, "--pools", help="model pools (1-3): more than one shards the deployment by "
                                                 "model, one dispatcher per pool, each on --workers"),
    as_json: bool = typer.Option(False, "--json", help="also print the summary as JSON on the last line"),
) -> None:
    """Run DIO end to end on a simulated heterogeneous cluster and print a summary."""
    from dio.ops.demo import DemoConfig, run_demo

    config = DemoConfig(requests=requests, policy=policy, workers=workers, trace=trace, load=load,
                        time_scale=time_scale, slo=slo, seed=seed, redis_cluster=redis_cluster, pools=pools)
    try:
        summary = run_demo(config)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(summary))


@app.command()
def chaos(
    requests: int = typer.Option(2000, help="requests to submit"),
    workers: str = typer.Option("H100:1,A100-40GB:1,L4:2,T4:1", "--workers", "--cluster",
                                help="simulated GPUs (at least 4, 2 types; --cluster is the same option)"),
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
    """Delete every DIO key under the configured prefix (and its model pools', when sharded by model)."""
    from dio.protocol.connection import connect
    from dio.protocol.pools import count_deployment_keys, delete_deployment
    from dio.protocol.settings import CommonSettings

    settings = CommonSettings()
    client = connect(settings)
    if not yes:  # sharded by model, each registered pool's keys too
        found = count_deployment_keys(client, settings.keys)
        typer.echo(f"{found} keys under {settings.key_prefix!r} (and its model pools'); add --yes to delete them")
        return
    typer.echo(f"deleted {delete_deployment(client, settings.keys)} keys")


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


def _batch_commands() -> None:
    """``dio batch ...`` and ``dio batch-runner`` (ops/batch_cli.py)."""
    from dio.ops.batch_cli import batch_app, batch_runner

    app.add_typer(batch_app, name="batch")
    app.command("batch-runner")(batch_runner)


_batch_commands()


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"dio {version('dio')}")
        raise typer.Exit()


@app.callback(help="DIO: a Distributed Inference Orchestrator for LLM serving on Redis.\n\n"
                   "Every command also takes --redis-url URL [DIO_REDIS_URL], --log-level DEBUG|INFO|WARNING|ERROR "
                   "[DIO_LOG_LEVEL] and --log-format text|json [DIO_LOG_FORMAT].")
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="print DIO's version and exit")) -> None:
    """DIO: a Distributed Inference Orchestrator for LLM serving on Redis."""


def _warn_unknown_variables() -> None:
    from dio.ops.env_check import warnings

    for line in warnings(os.environ):
        typer.echo(line, err=True)


def main() -> None:
    """Run ``dio``: warn about misspelled DIO_* variables; an operator's mistake ends in one line, exit code 2."""
    from dio.ops.cli_edge import EXIT_OPERATOR_ERROR, UsageError, error_line, take_common_options

    try:
        args, variables = take_common_options(sys.argv[1:])
    except UsageError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_OPERATOR_ERROR)
    os.environ.update(variables)
    _warn_unknown_variables()
    try:
        app(args=args, prog_name="dio")
    except Exception as exc:  # noqa: BLE001 - the ones error_line does not know are re-raised
        line = error_line(exc)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(EXIT_OPERATOR_ERROR)


if __name__ == "__main__":
    main()
