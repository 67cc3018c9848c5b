"""``dio inspect``: the facts ``redis-cli`` shows about a running DIO, gathered and explained."""

from __future__ import annotations

import json
from typing import Any

import redis
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from dio.protocol.keys import DISPATCHER_GROUP, WORKER_GROUP, Keys
from dio.protocol.models import M, WorkerInfo, WorkerTelemetry, from_hash

# The capabilities shown of a worker, with what is shown when its hash is gone.
INFO_UNKNOWN: dict[str, Any] = {"gpu": None, "model": None, "engine": None, "kv_capacity_tokens": 0}
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
    """Read workers, queues, intake, predictors and the lease into one dict."""
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


def render(facts: dict[str, Any]) -> None:
    console = Console(width=max(Console().width, 130))
    intake = facts["intake"]
    console.print(f"[bold]DIO[/] keys under [cyan]{facts['prefix']}[/]; active dispatcher: "
                  f"{facts['lease'] or '[red]none[/]'}")
    console.print(f"intake: {intake['length']} entries — {intake['pending']} read by the dispatcher and waiting "
                  f"for a worker (its backlog), {intake['lag']} not read yet;  completions not yet learned: "
                  f"{facts['completions']['length']};  dead-lettered: {facts['deadletter']}")
    table = Table(title="workers")
    for col in ("id", "alive", "gpu", "model", "KV cap", "KV reserved", "KV used", "running", "waiting",
                "queued", "done", "failed", "preempt", "predictor (seen, p50 err ms)"):
        table.add_column(col)
    for w in facts["workers"]:
        p = w["predictor"]
        err = f"{p['error_p50_ms']:.1f}" if p.get("error_p50_ms") is not None else "-"
        table.add_row(
            w["id"], "yes" if w["alive"] else "[red]no[/]", str(w["gpu"]), str(w["model"]),
            f"{w['kv_capacity_tokens']:,}", f"{w['kv_reserved_tokens']:,}", f"{w['kv_usage']:.0%}",
            str(w["running"]), str(w["waiting"]), f"{w['queue']['length']} ({w['queue']['lag']} unread)",
            str(w["completed"]), str(w["failed"]), str(w["preemptions"]), f"{p.get('kind')} ({p['seen']}, {err})",
        )
    console.print(table)
    console.print("[dim]redis-cli: XINFO GROUPS <prefix>intake · XLEN <prefix>queue:<id> · "
                  "HGETALL <prefix>worker:<id> · HGETALL <prefix>job:<id> · HGETALL <prefix>predictor[/]")
