"""``dio top``: a live terminal view of any DIO deployment, read from Redis alone.

Each frame is one read of what the processes keep in Redis anyway — the worker registry and
their heartbeat telemetry (``{dio}:worker:<id>``, ``{dio}:alive:<id>``), their queue streams, the
predictors' saved errors (``{dio}:predictor``), the intake stream and its consumer group, and the
active dispatcher's counters (``{dio}:dispatcher:stats``, written each second) — in two pipelined
round trips. Rates are the change of those counters between two frames. Nothing is written.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dio.protocol.keys import DISPATCHER_GROUP, Keys
from dio.protocol.models import WorkerInfo, WorkerTelemetry, from_hash
from dio.protocol.pools import key_spaces

STALE_BEAT_S = 2.0  # a heartbeat older than this is shown in yellow (the TTL is 3 s by default)
COLUMNS = ("worker", "gpu", "state", "KV", "run", "wait", "queue", "done/s", "done", "fail", "preempt", "err p50",
           "beat")
LEFT_COLUMNS = {"worker", "gpu", "state"}
STATS_COUNTERS = ("dispatched", "rejected", "completions", "deadlettered", "requeued")


@dataclass
class Snapshot:
    """What one read of Redis found (``read_snapshot``)."""

    at: float  # this host's clock when it was read
    prefix: str
    lease: str | None
    intake: int  # entries on the intake stream
    pending: int  # of them read by the dispatcher and not ended: its backlog (and hand-offs in flight)
    unread: int  # not read by any dispatcher yet
    deadletter: int
    dispatcher: dict[str, str]  # the stats hash (empty: no active dispatcher wrote it lately)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)


def _int(value: Any) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return 0


def _worker(fields: dict[str, str], alive: bool, queue: int, predictor: dict[str, Any]) -> dict[str, Any]:
    """One worker's row of facts from its hash (capabilities and telemetry; defaults when unreadable)."""
    try:
        info: WorkerInfo | None = from_hash(WorkerInfo, fields)
    except (ValueError, TypeError):
        info = None
    try:
        telemetry = from_hash(WorkerTelemetry, fields)
    except (ValueError, TypeError):
        telemetry = WorkerTelemetry(updated_at=0.0)
    return {"gpu": info.gpu if info else "?", "model": info.model if info else "?", "alive": alive,
            "queue": queue, "error_p50_ms": predictor.get("error_p50_ms"), **telemetry.model_dump()}


def _group_counts(groups: Any) -> tuple[int, int]:
    """(pending, lag) of the dispatchers' group in an XINFO GROUPS reply (zeros when the stream is missing)."""
    if isinstance(groups, list):
        for group in groups:
            if group.get("name") == DISPATCHER_GROUP:
                return _int(group.get("pending")), _int(group.get("lag"))
    return 0, 0


def read_snapshot(client: redis.Redis, keys: Keys) -> Snapshot:
    """Read one frame's facts from Redis (two pipelines; read-only)."""
    pipe = client.pipeline(transaction=False)
    pipe.smembers(keys.workers)
    pipe.get(keys.lease)
    pipe.hgetall(keys.dispatcher_stats)
    pipe.xlen(keys.intake)
    pipe.xlen(keys.deadletter)
    pipe.hgetall(keys.predictor)
    pipe.xinfo_groups(keys.intake)
    ids, lease, stats, intake, deadletter, predictors, groups = pipe.execute(raise_on_error=False)
    pending, unread = _group_counts(groups)
    worker_ids = sorted(ids) if isinstance(ids, set) else []
    pipe = client.pipeline(transaction=False)
    for worker_id in worker_ids:
        pipe.hgetall(keys.worker(worker_id))
        pipe.exists(keys.alive(worker_id))
        pipe.xlen(keys.queue(worker_id))
    replies = pipe.execute() if worker_ids else []
    saved: dict[str, Any] = {}
    for worker_id, raw in (predictors or {}).items():
        try:
            saved[worker_id] = json.loads(raw)
        except (TypeError, ValueError):
            continue
    workers = {wid: _worker(replies[3 * i], bool(replies[3 * i + 1]), _int(replies[3 * i + 2]), saved.get(wid, {}))
               for i, wid in enumerate(worker_ids)}
    return Snapshot(at=time.time(), prefix=keys.prefix, lease=lease, intake=_int(intake), pending=pending,
                    unread=unread, deadletter=_int(deadletter), dispatcher=stats or {}, workers=workers)


def _rate(now: Any, before: Any, dt: float) -> float | None:
    """Per-second change of a counter; None when unknown or it went back (a restarted process)."""
    if before is None or dt <= 0:
        return None
    delta = _int(now) - _int(before)
    return delta / dt if delta >= 0 else None


def rates(prev: Snapshot | None, cur: Snapshot) -> dict[str, Any]:
    """Per-second rates between two snapshots: the cluster's, and each worker's completions."""
    dt = cur.at - prev.at if prev else 0.0
    before = prev.dispatcher if prev else {}
    cluster = {name: _rate(cur.dispatcher.get(name), before.get(name), dt) for name in STATS_COUNTERS}
    workers = {}
    for wid, w in cur.workers.items():
        old = prev.workers.get(wid) if prev else None
        workers[wid] = {k: _rate(w[k], old[k] if old else None, dt) for k in ("completed", "failed")}
    done = [r["completed"] for r in workers.values() if r["completed"] is not None]
    cluster["completed"] = sum(done) if done else None
    return {"dt": dt, "cluster": cluster, "workers": workers}


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _state(w: dict[str, Any]) -> str:
    if not w["alive"]:
        return "[red]dead[/]"
    return "[yellow]drain[/]" if w["draining"] else "[green]ok[/]"


def _beat(age_s: float) -> str:
    text = f"{age_s:.1f}s" if age_s < 100 else f"{age_s / 60:.0f}m"
    return f"[yellow]{text}[/]" if age_s > STALE_BEAT_S else text


def render(cur: Snapshot, r: dict[str, Any]) -> Group:
    """One frame: the header lines (dispatcher, intake and backlog, rates) and the workers' table."""
    stats, cluster = cur.dispatcher, r["cluster"]
    who = escape(cur.lease) if cur.lease else "[red]none[/]"
    policy = f" (policy {escape(stats['policy'])})" if stats.get("policy") else ""
    head = Text.from_markup(f"[bold]DIO top[/] · keys [cyan]{escape(cur.prefix)}[/] · dispatcher {who}{policy} · "
                            f"{time.strftime('%H:%M:%S', time.localtime(cur.at))}")
    backlog = f"backlog {stats.get('backlog', cur.pending)}"
    if _int(stats.get("backlog_bytes")):
        backlog += f" ({_int(stats['backlog_bytes']) / 1024:.0f} KiB)"
    queues = Text(f"intake {cur.intake} entries ({cur.unread} unread) · {backlog} · "
                  f"dead-lettered {cur.deadletter}")
    flow = Text(f"per second: completed {_fmt_rate(cluster['completed'])} · dispatched "
                f"{_fmt_rate(cluster['dispatched'])} · rejected {_fmt_rate(cluster['rejected'])} · requeued "
                f"{_fmt_rate(cluster['requeued'])}  (over {r['dt']:.1f} s)")
    table = Table(box=None, pad_edge=False, header_style="bold", show_edge=False)
    for name in COLUMNS:
        table.add_column(name, justify="left" if name in LEFT_COLUMNS else "right", no_wrap=True)
    for wid, w in cur.workers.items():
        err = w["error_p50_ms"]
        table.add_row(escape(wid), escape(str(w["gpu"])), _state(w), f"{w['kv_usage']:.0%}", str(w["running"]),
                      str(w["waiting"]), str(w["queue"]), _fmt_rate(r["workers"][wid]["completed"]),
                      str(w["completed"]), str(w["failed"]), str(w["preemptions"]),
                      "-" if err is None else f"{err:.0f}ms", _beat(max(cur.at - w["updated_at"], 0.0)))
    if not cur.workers:
        return Group(head, queues, flow, Text("no workers registered"))
    return Group(head, queues, flow, Text(""), table)


def read_snapshots(client: redis.Redis, keys: Keys) -> list[Snapshot]:
    """One snapshot per model pool when sharded by model (the pool registry names them), else the one."""
    return [read_snapshot(client, space) for space in key_spaces(client, keys).values()]


def render_all(current: list[Snapshot], previous: list[Snapshot] | None) -> Group:
    """One frame: each pool's view (one pool, or one deployment unsharded: just its view), rates per pool."""
    before = {snap.prefix: snap for snap in previous or []}
    views = [render(snap, rates(before.get(snap.prefix), snap)) for snap in current]
    if len(views) == 1:
        return views[0]
    return Group(*(part for view in views for part in (view, Text(""))))


def frame(client: redis.Redis, keys: Keys, interval_s: float) -> Group:
    """Read twice, ``interval_s`` apart, and render the second read with the rates between them."""
    first = read_snapshots(client, keys)
    time.sleep(interval_s)
    second = read_snapshots(client, keys)
    return render_all(second, first)


def run_top(client: redis.Redis, keys: Keys, interval_s: float = 1.0, once: bool = False,
            console: Console | None = None) -> None:
    """Show frames every ``interval_s`` until Ctrl-C (``once``: print one frame and return)."""
    console = console or Console()
    if once:
        console.print(frame(client, keys, interval_s))
        return
    first = read_snapshots(client, keys)  # no Redis at all: the caller says so and exits
    prev: list[Snapshot] | None = first
    with Live(render_all(first, None), console=console, auto_refresh=False) as live:
        while True:
            time.sleep(interval_s)
            try:
                cur = read_snapshots(client, keys)
            except redis.RedisError as exc:  # an outage while watching: say so, and keep trying
                live.update(Text(f"Redis unreachable ({exc}); retrying every {interval_s:g} s"), refresh=True)
                prev = None
                continue
            live.update(render_all(cur, prev), refresh=True)
            prev = cur
