"""``dio demo``: DIO end to end on a simulated heterogeneous cluster, with a readable summary.

It uses the Redis at ``DIO_REDIS_URL`` (or starts a private one), starts a dispatcher and one
process per simulated GPU, replays request lengths and arrivals from a real trace at a chosen
fraction of the cluster's estimated capacity, waits for every result, and reports what the
client saw. Requests are sent as the goodput benchmark sends them: each with the trace's
``max_tokens`` cap (its true length known only to the simulated engine) and the TTFT/TPOT SLO of
a preset (``chat`` for the Azure traces; ``dio.ops.slo``), against which attainment is reported.
All keys live under a private prefix that is deleted afterwards.

With ``pools`` > 1 the deployment is sharded by model (``DIO_SHARD_BY_MODEL``): one pool per model
(``POOL_MODELS``), each on the same GPUs with its own dispatcher and hash tag, the requests dealt
out in turn; the summary adds each pool's counts and the Redis node that serves its slot.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from dio.client import Client, ClientSettings
from dio.client.pools import ClientPools
from dio.dispatcher.predictor_store import read_states
from dio.ops.capacity import capacity_rps
from dio.ops.local_cluster import LocalCluster, Pool, WorkerSpec, parse_workers, worker_ids
from dio.ops.openloop import request_fields, submit_on_schedule
from dio.ops.redis_server import ClusterHandle, RedisHandle, ensure_redis, start_private_cluster
from dio.ops.slo import Slo, max_tokens_cap, meets, parse_slo, preset_for, tpot_ms
from dio.ops.stats import reason_key
from dio.ops.traces import BUNDLED, TraceRequest, bundled, load_trace, rescale_arrivals
from dio.protocol.connection import connect, connection_options, delete_keys
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.keys import Keys
from dio.protocol.models import JobResult, JobStatus
from dio.protocol.pools import delete_deployment
from dio.protocol.settings import CommonSettings

RESULT_GRACE_S = 120.0  # after the last submission, how long to wait for the last results
POOL_MODELS = (DEFAULT_MODEL, "tiny-llama-1b", "llama-3.1-8b")  # the models of --pools N (fit a T4 up to 2)
COUNTS = ("submitted", "completed", "rejected", "failed", "cancelled", "lost")


@dataclass
class DemoConfig:
    requests: int = 500
    policy: str = "dio"
    workers: str = "H100:1,A100-40GB:1,L4:1,T4:1"
    trace: str = "azure-conv"
    load: float = 0.6
    time_scale: float = 10.0
    slo: str | None = None  # a preset or TTFT_MS:TPOT_MS (dio.ops.slo); None: the trace's preset
    seed: int = 0
    model: str = DEFAULT_MODEL
    redis_cluster: bool = False  # start a private three-node Redis Cluster (whatever DIO_REDIS_URL says)
    pools: int = 1  # model pools; more than one: sharded by model, one dispatcher per pool


def load_demo_trace(name: str, count: int, seed: int) -> list[TraceRequest]:
    path = bundled(name) if name in BUNDLED else Path(name)
    trace = load_trace(path, seed=seed)
    if len(trace) < count:
        raise ValueError(f"the trace {name!r} has {len(trace)} requests; asked for {count}")
    return trace[:count]


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def demo_slo(config: DemoConfig) -> Slo:
    return parse_slo(config.slo or preset_for(config.trace))


def fields_for(config: DemoConfig, trace: list[TraceRequest], models: list[str]) -> Any:
    """The submit fields of request ``i``: the trace's max_tokens cap and the SLO, in wall ms (time-scaled)."""
    slo, cap = demo_slo(config), max_tokens_cap([r.output_tokens for r in trace])

    def fields(i: int, request: TraceRequest) -> dict[str, Any]:
        return {**request_fields(request, i, models[i], max_tokens=cap),
                "ttft_slo_ms": slo.ttft_ms / config.time_scale, "tpot_slo_ms": slo.tpot_ms / config.time_scale}

    return fields


def summarize(config: DemoConfig, specs: list[WorkerSpec], trace: list[TraceRequest], results: list[JobResult | None],
              predictors: dict[str, Any], wall_s: float, offered_rps: float,
              ids: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """Build the demo's summary from what the client saw (latencies in simulated ms).

    ``ids``: (profile, worker id) of the workers, when not ``worker_ids(specs)`` (a pool's are prefixed).
    """
    scale, slo = config.time_scale, demo_slo(config)
    seen = [r for r in results if r is not None and r.status.terminal]
    by_status = Counter(r.status.value for r in seen)
    latencies, ttfts, tpots, met = [], [], [], 0
    per_worker: dict[str, dict[str, Any]] = {wid: {"gpu": p, "jobs": 0, "failed": 0, "lat": []}
                                             for p, wid in (ids or worker_ids(specs))}
    for result in results:
        if result is None or result.worker is None or result.worker not in per_worker:
            continue
        w = per_worker[result.worker]
        w["jobs"] += 1
        if result.status == JobStatus.failed:
            w["failed"] += 1
        if result.status != JobStatus.completed or result.latency_s is None:
            continue
        latency = result.latency_s * 1000.0 * scale
        latencies.append(latency)
        w["lat"].append(latency)
        ttft = None if result.ttft_s is None else result.ttft_s * 1000.0 * scale
        if ttft is not None:
            ttfts.append(ttft)
            if (tpot := tpot_ms(ttft, latency, result.output_tokens or 0)) is not None:
                tpots.append(tpot)
        met += meets(slo, ttft, latency, result.output_tokens or 0)
    workers = {}
    for wid, w in per_worker.items():
        pred = predictors.get(wid, {})
        err = pred.get("error_p50_ms")
        workers[wid] = {"gpu": w["gpu"], "jobs": w["jobs"], "failed": w["failed"],
                        "p50_ms": percentile(w["lat"], 50), "p99_ms": percentile(w["lat"], 99),
                        "predictor_error_p50_ms": None if err is None else round(err * scale, 1),
                        "predictor_seen": pred.get("seen", 0)}
    return {
        "policy": config.policy, "trace": config.trace, "workers_spec": config.workers,
        "submitted": len(trace), "completed": by_status.get("completed", 0),
        "rejected": by_status.get("rejected", 0), "failed": by_status.get("failed", 0),
        "cancelled": by_status.get("cancelled", 0), "lost": len(trace) - len(seen),
        "p50_ms": percentile(latencies, 50), "p90_ms": percentile(latencies, 90), "p99_ms": percentile(latencies, 99),
        "ttft_p50_ms": percentile(ttfts, 50), "ttft_p99_ms": percentile(ttfts, 99),
        "tpot_p50_ms": percentile(tpots, 50), "tpot_p99_ms": percentile(tpots, 99),
        "slo": slo.brief(), "slo_attainment": round(met / len(trace), 4) if trace else None,
        "rejected_reasons": dict(Counter(reason_key(r.reason) for r in seen if r.status == JobStatus.rejected)),
        "failed_errors": dict(Counter(reason_key(r.error) for r in seen if r.status == JobStatus.failed)),
        "offered_rps_sim": round(offered_rps, 3), "load": config.load, "time_scale": scale, "wall_s": round(wall_s, 2),
        "latency_unit": "simulated ms (wall ms x time_scale)",
        "workers": workers,
    }


def print_summary(summary: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 130))
    console.print(f"[bold]DIO demo[/] — policy [cyan]{summary['policy']}[/], trace {summary['trace']}, "
                  f"{summary['submitted']} requests at {summary['load']:.0%} of estimated capacity "
                  f"({summary['offered_rps_sim']} req/s simulated), time scale {summary['time_scale']}×, "
                  f"{summary['wall_s']} s wall, Redis {summary.get('redis', 'single')}")
    console.print(f"completed {summary['completed']} · rejected {summary['rejected']} · failed {summary['failed']} · "
                  f"lost {summary['lost']}   latency p50 {summary['p50_ms']} / p90 {summary['p90_ms']} / "
                  f"p99 {summary['p99_ms']} ms · TTFT p50 {summary['ttft_p50_ms']} ms · TPOT p50 "
                  f"{summary['tpot_p50_ms']} ms · SLO {slo_text(summary['slo'])} attainment "
                  f"{summary['slo_attainment']:.1%}")
    table = Table(title="per worker (simulated ms)")
    for col in ("worker", "GPU", "jobs", "failed", "p50", "p99", "predictor |error| p50", "completions learned"):
        table.add_column(col)
    for wid, w in summary["workers"].items():
        table.add_row(wid, w["gpu"], str(w["jobs"]), str(w["failed"]), str(w["p50_ms"]), str(w["p99_ms"]),
                      str(w["predictor_error_p50_ms"]), str(w["predictor_seen"]))
    console.print(table)
    for title, counts in (("rejected", summary["rejected_reasons"]), ("failed", summary["failed_errors"])):
        for reason, n in counts.items():
            console.print(f"  {title} ×{n}: {reason}")


def slo_text(slo: dict[str, Any]) -> str:
    return f"{slo['name']} (TTFT ≤ {slo['ttft_ms']:g} ms, TPOT ≤ {slo['tpot_ms']:g} ms)"


def redis_kind(client: Any) -> str:
    """Return "single", or "cluster (N primaries)" for a Redis Cluster client."""
    return f"cluster ({len(client.get_primaries())} primaries)" if hasattr(client, "get_primaries") else "single"


def demo_connection(settings: CommonSettings, server: RedisHandle | ClusterHandle, prefix: str) -> CommonSettings:
    """Return what the demo connects with: the configured user, password and TLS, or a private server's URL alone.

    Not sharded by model, whatever DIO_SHARD_BY_MODEL says: the pooled demo turns it on itself.
    """
    if not server.owned:
        return settings.model_copy(update={"redis_url": server.url, "key_prefix": prefix, "shard_by_model": False})
    return CommonSettings(redis_url=server.url, redis_username=None, redis_password=None, redis_ca_certs=None,
                          redis_certfile=None, redis_keyfile=None, redis_cluster=False, shard_by_model=False,
                          key_prefix=prefix)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo, print its summary and return it."""
    if config.pools > 1:
        return run_pooled_demo(config)
    specs = parse_workers(config.workers)
    trace = load_demo_trace(config.trace, config.requests, config.seed)
    offered_rps = config.load * capacity_rps(specs, config.model, trace)
    trace = rescale_arrivals(trace, offered_rps)
    settings = CommonSettings()
    prefix = f"{{dio-demo-{uuid.uuid4().hex[:8]}}}:"
    if config.redis_cluster:
        server: RedisHandle | ClusterHandle = start_private_cluster()
    else:
        server = ensure_redis(settings.redis_url, **connection_options(settings))
    with server:
        connection = demo_connection(settings, server, prefix)
        cluster = LocalCluster(server.url, specs, key_prefix=prefix, policy=config.policy, model=config.model,
                               time_scale=config.time_scale, connection=connection)
        try:
            cluster.start()
            started = time.monotonic()
            with Client(ClientSettings(**connection.model_dump())) as client:
                handles = submit_on_schedule(client, trace, config.time_scale,
                                             fields_for(config, trace, [config.model] * len(trace)))
                results = [h.result(timeout=RESULT_GRACE_S, raise_on_error=False) for h in handles]
            wall_s = time.monotonic() - started
        finally:
            cluster.stop()
        redis_client = connect(connection)
        summary = summarize(config, specs, trace, results, read_states(redis_client, connection.keys), wall_s,
                            offered_rps)
        summary["redis"] = redis_kind(redis_client)
        delete_keys(redis_client, connection.keys)
    print_summary(summary)
    return summary


def pool_models(count: int) -> list[str]:
    if not 1 <= count <= len(POOL_MODELS):
        raise ValueError(f"--pools takes 1 to {len(POOL_MODELS)} (the models {', '.join(POOL_MODELS)})")
    return list(POOL_MODELS[:count])


def node_of(client: Any, key: str) -> str:
    """The node (host:port) that serves ``key``'s slot; "single" on one Redis."""
    return str(client.get_node_from_key(key).name) if hasattr(client, "get_node_from_key") else "single"


def run_pooled_demo(config: DemoConfig) -> dict[str, Any]:
    """The demo on ``config.pools`` model pools sharded by model; the summary has each pool's and the totals."""
    models = pool_models(config.pools)
    specs = parse_workers(config.workers)
    trace = load_demo_trace(config.trace, config.requests, config.seed)
    offered_rps = config.load * sum(capacity_rps(specs, model, trace) for model in models)
    trace = rescale_arrivals(trace, offered_rps)
    model_of = [models[i % len(models)] for i in range(len(trace))]  # dealt out in turn
    settings = CommonSettings()
    prefix = f"{{dio-demo-{uuid.uuid4().hex[:8]}}}:"
    server: RedisHandle | ClusterHandle = start_private_cluster() if config.redis_cluster else ensure_redis(
        settings.redis_url, **connection_options(settings))
    with server:
        connection = demo_connection(settings, server, prefix).model_copy(update={"shard_by_model": True})
        cluster = LocalCluster(server.url, specs, key_prefix=prefix, policy=config.policy, time_scale=config.time_scale,
                               connection=connection, pools=[Pool(m, tuple(specs)) for m in models],
                               shard_by_model=True)
        try:
            cluster.start()
            started = time.monotonic()
            with ClientPools(ClientSettings(**connection.model_dump())) as pools:
                handles = submit_on_schedule(pools, trace, config.time_scale, fields_for(config, trace, model_of))
                results = [h.result(timeout=RESULT_GRACE_S, raise_on_error=False) for h in handles]
            wall_s = time.monotonic() - started
        finally:
            cluster.stop()
        redis_client = connect(connection)
        per_pool = {}
        for model in models:
            keys = connection.keys_for(model)
            mine = [i for i, m in enumerate(model_of) if m == model]
            ids = cluster.pool_workers(Pool(model, tuple(specs)))
            pool = summarize(replace(config, model=model), specs, [trace[i] for i in mine], [results[i] for i in mine],
                             read_states(redis_client, keys), wall_s, offered_rps, ids)
            pool.update(slot=key_slot_of(keys), node=node_of(redis_client, keys.intake))
            per_pool[model] = pool
        summary = combine_pools(config, per_pool, wall_s, offered_rps)
        summary["redis"] = redis_kind(redis_client)
        delete_deployment(redis_client, Keys(prefix))
    print_pools(summary)
    return summary


def key_slot_of(keys: Keys) -> int:
    from redis.crc import key_slot

    return int(key_slot(keys.intake.encode()))


def combine_pools(config: DemoConfig, pools: dict[str, dict[str, Any]], wall_s: float,
                  offered_rps: float) -> dict[str, Any]:
    """The totals over the pools (counts summed, SLO attainment over every request), with each pool's summary."""
    totals: dict[str, Any] = {name: sum(p[name] for p in pools.values()) for name in COUNTS}
    met = sum((p["slo_attainment"] or 0) * p["submitted"] for p in pools.values())
    totals["slo_attainment"] = round(met / totals["submitted"], 4) if totals["submitted"] else None
    return {"policy": config.policy, "trace": config.trace, "workers_spec": config.workers, **totals,
            "slo": demo_slo(config).brief(), "load": config.load, "time_scale": config.time_scale,
            "wall_s": round(wall_s, 2),
            "offered_rps_sim": round(offered_rps, 3), "sharded_by_model": True, "pools": pools,
            "workers": {wid: w for p in pools.values() for wid, w in p["workers"].items()}}


def print_pools(summary: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 130))
    for model, pool in summary["pools"].items():
        console.print(f"[bold]pool {model}[/] (slot {pool['slot']} on node {pool['node']}):")
        print_summary({**pool, "redis": summary["redis"]})
    console.print(f"[bold]all {len(summary['pools'])} pools[/]: submitted {summary['submitted']} · completed "
                  f"{summary['completed']} · rejected {summary['rejected']} · failed {summary['failed']} · lost "
                  f"{summary['lost']} · SLO attainment {summary['slo_attainment']:.1%}")
