"""``dio inspect``: the facts ``redis-cli`` shows about a running DIO, gathered and explained."""

from __future__ import annotations

import json
import shlex
from typing import Any, Literal

import redis
from pydantic import ValidationError
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dio.protocol.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from dio.protocol.models import M, WorkerInfo, WorkerTelemetry, from_hash
from dio.protocol.pools import pool_key_sets

# The capabilities shown of a worker, with what is shown when its hash is gone.
INFO_UNKNOWN: dict[str, Any] = {"gpu": None, "model": None, "engine": None, "kv_capacity_tokens": 0}
# The workers' table: (header, justification). "queue" is entries/unread; "seen" and "err p50" are the
# predictor's completions learned and median recent error.
COLUMNS: tuple[tuple[str, Literal["left", "right"]], ...] = (
    ("id", "left"), ("gpu", "left"), ("alive", "left"), ("KV cap", "right"), ("reserved", "right"),
    ("used", "right"), ("run", "right"), ("wait", "right"), ("queue", "right"), ("done", "right"),
    ("fail", "right"), ("preempt", "right"), ("seen", "right"), ("err p50", "right"))
TELEMETRY_SHOWN = ("kv_usage", "running", "waiting", "completed", "failed", "preemptions", "draining")


def _group(client: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    """XLEN and XINFO GROUPS of one stream: entries, delivered-but-unacked, not yet delivered."""
    info = {"length": client.xlen(stream), "pending": 0, "lag": 0}
    try:
        for g in client.xinfo_groups(stream):
            if g["name"] == group:
                info["pending"] = g["pending"]
                info["lag"] = g.get("lag") or 0
    except redis.ResponseError:  # the stream does not exist yet
        pass
    return info


def _decode(cls: type[M], fields: dict[str, str]) -> M | None:
    """Decode a worker hash as ``cls``; None when it is gone or unreadable (the worker is still listed)."""
    try:
        return from_hash(cls, fields)
    except ValidationError:
        return None


def _worker_state(fields: dict[str, str]) -> dict[str, Any]:
    """The capabilities and telemetry ``dio inspect`` shows of one worker hash."""
    info = _decode(WorkerInfo, fields)
    telemetry = _decode(WorkerTelemetry, fields) or WorkerTelemetry()
    shown = info.model_dump(include=set(INFO_UNKNOWN)) if info else dict(INFO_UNKNOWN)
    return {**shown, **telemetry.model_dump(include=set(TELEMETRY_SHOWN))}


def collect(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Read workers, queues, intake, predictors and the lease into one dict.

    Sharded by model (the pool registry names pools): ``pools`` holds each pool's facts by model,
    and ``workers`` every pool's workers, each with its ``pool``.
    """
    pools = pool_key_sets(client, keys)
    if not pools:
        return collect_pool(client, keys)
    facts = {model: collect_pool(client, space) for model, space in pools.items()}
    workers = [{**w, "pool": model} for model, pool in facts.items() for w in pool["workers"]]
    return {"prefix": keys.prefix, "pools": facts, "workers": workers}


def collect_pool(client: redis.Redis, keys: Keys) -> dict[str, Any]:
    """Read one key space's workers, queues, intake, predictors and lease (a deployment's, or one pool's)."""
    workers = []
    predictors = {wid: json.loads(raw) for wid, raw in client.hgetall(keys.predictor).items()}
    for worker_id in sorted(client.smembers(keys.workers)):
        fields = client.hgetall(keys.worker(worker_id))
        queue = _group(client, keys.queue(worker_id), WORKER_GROUP)
        reserved = client.hgetall(keys.reserved(worker_id))
        state = predictors.get(worker_id, {})
        workers.append({
            "id": worker_id,
            "alive": bool(client.exists(keys.alive(worker_id))),
            **_worker_state(fields),
            "kv_reserved_tokens": sum(int(v) for v in reserved.values()),
            "queue": queue,
            "predictor": {"kind": state.get("kind"), "seen": state.get("seen", 0),
                          "error_p50_ms": state.get("error_p50_ms"), "service_ms": state.get("service_ms")},
        })
    return {
        "prefix": keys.prefix,
        "lease": client.get(keys.lease),
        "ttl_ms": client.pttl(keys.lease),
        "intake": _group(client, keys.intake, DISPATCHER_GROUP),
        "completions": _group(client, keys.completions, DISPATCHER_GROUP),
        "deadletter": client.xlen(keys.deadletter),
        "workers": workers,
    }


def _tokens(n: int) -> str:
    """A count in at most 5 characters: 9,999, 605k, 1.2M."""
    if n < 10_000:
        return f"{n:,}"
    return f"{n / 1000:.0f}k" if n < 1_000_000 else f"{n / 1e6:.1f}M"


def _hints(prefix: str) -> list[str]:
    """The redis-cli commands behind the view, with the real key prefix (quoted for a shell: it has braces)."""
    q = shlex.quote
    return [f"XINFO GROUPS {q(prefix + 'intake')} · XLEN {q(prefix + 'queue:<id>')} · "
            f"HGETALL {q(prefix + 'worker:<id>')}",
            f"HGETALL {q(prefix + 'job:<id>')} · HGETALL {q(prefix + 'predictor')} · "
            f"HGETALL {q(prefix + 'dispatcher:stats')}"]


def render(facts: dict[str, Any], console: Console | None = None) -> None:
    """Print the facts, one pool after another when sharded by model."""
    console = console or Console()
    if "pools" not in facts:
        render_pool(facts, console)
        return
    console.print(f"[bold]DIO[/] sharded by model under [cyan]{escape(facts['prefix'])}[/]: "
                  f"{len(facts['pools'])} pools")
    for pool in facts["pools"].values():
        console.print("")
        render_pool(pool, console)


def render_pool(facts: dict[str, Any], console: Console) -> None:
    """Print one key space's facts; the table fits a 100-column terminal (the model is above it)."""
    intake, prefix = facts["intake"], facts["prefix"]
    console.print(f"[bold]DIO[/] keys under [cyan]{escape(prefix)}[/]; active dispatcher: "
                  f"{escape(facts['lease']) if facts['lease'] else '[red]none[/]'}")
    console.print(f"intake: {intake['length']} entries — {intake['pending']} read by the dispatcher and waiting "
                  f"for a worker (its backlog), {intake['lag']} not read yet; completions not yet learned: "
                  f"{facts['completions']['length']}; dead-lettered: {facts['deadletter']}")
    models = sorted({str(w["model"]) for w in facts["workers"]})
    kinds = sorted({str(w["predictor"].get("kind")) for w in facts["workers"] if w["predictor"].get("kind")})
    console.print(f"workers: {len(facts['workers'])}; models: {escape(', '.join(models)) or '-'}; predictor: "
                  f"{escape(', '.join(kinds)) or '-'}")
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), show_edge=False)
    for col, justify in COLUMNS:
        table.add_column(col, no_wrap=True, justify=justify)
    for w in facts["workers"]:
        p = w["predictor"]
        err = f"{p['error_p50_ms']:.1f}ms" if p.get("error_p50_ms") is not None else "-"
        table.add_row(
            escape(w["id"]), escape(str(w["gpu"])), "yes" if w["alive"] else "[red]no[/]",
            _tokens(w["kv_capacity_tokens"]), _tokens(w["kv_reserved_tokens"]), f"{w['kv_usage']:.0%}",
            str(w["running"]), str(w["waiting"]), f"{w['queue']['length']}/{w['queue']['lag']}",
            str(w["completed"]), str(w["failed"]), str(w["preemptions"]), _tokens(p["seen"]), err,
        )
    console.print(table)
    first, second = _hints(prefix)
    console.print(f"[dim]redis-cli: {escape(first)}[/]")
    console.print(f"[dim]           {escape(second)}[/]")
