"""``dio bench ...``: the benchmark commands (registered on the ``dio`` app as ``bench``)."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.bench import report

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Benchmarks: trace replay, overload, predictor convergence, decision cost, pipeline.")

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


def _finish(summary: dict, as_json: bool) -> None:
    if as_json:
        typer.echo(report.json_line(summary))


@bench_app.command(context_settings=EXTRA_ARGS)
def replay(
    ctx: typer.Context,
    trace: str = typer.Option(..., help="trace file, or a bundled name: azure-code, azure-conv, arxiv, mooncake"),
    cluster: str = typer.Option("H100:1,A100-40GB:2,L4:2,T4:3", help="simulated GPUs: PROFILE:COUNT,..."),
    model: str = typer.Option("llama-3.2-3b", help="model shape the GPUs serve"),
    load: list[float] = typer.Option([0.7, 0.9], help="offered load(s), fractions of capacity: --load 0.7 0.9"),
    policies: str = typer.Option(ALL_POLICIES, help="comma-separated policies"),
    slo_k: float = typer.Option(5.0, help="SLO = k x the request's unloaded latency on the fastest GPU"),
    time_scale: float = typer.Option(None, help="simulated s per wall s (default: arrivals take --target-wall-s)"),
    target_wall_s: float = typer.Option(15.0, help="wall seconds the arrivals of one run take (auto time scale)"),
    drain_wall_s: float = typer.Option(30.0, help="after the last arrival, wall seconds to wait for results"),
    max_requests: int = typer.Option(3000, help="requests replayed (the first N of the trace)"),
    arrivals: str = typer.Option("trace", help="trace | poisson | FILE (a timed trace whose arrival times to use)"),
    predictor: str = typer.Option("rls", help="seed | vector | rls"),
    deadlines: bool = typer.Option(False, help="send each request's SLO as its deadline"),
    calibrate: bool = typer.Option(False, help="measure capacity with a saturation run (else: roofline estimate)"),
    seed: int = typer.Option(0),
    out: Path = typer.Option(None, help="results folder (default ops/bench/results)"),
    name: str = typer.Option(None, help="result file stem (default replay-<trace>)"),
    as_json: bool = typer.Option(False, "--json", help="print a one-line JSON summary last"),
) -> None:
    """Replay a trace through the whole system for every policy and load; compare latency and SLOs."""
    from ops.bench.replay import ReplayConfig, run_replay

    config = ReplayConfig(trace=trace, cluster=cluster, model=model, loads=_loads(load, ctx), policies=_list(policies),
                          slo_k=slo_k, time_scale=time_scale, target_wall_s=target_wall_s, drain_wall_s=drain_wall_s,
                          max_requests=max_requests, arrivals=arrivals, predictor=predictor, deadlines=deadlines,
                          calibrate=calibrate, seed=seed, out_dir=out, name=name)
    try:
        summary = run_replay(config)
    except (ValueError, RuntimeError, TimeoutError) as exc:
        _fail(str(exc))
    _finish(summary, as_json)
