"""Replay DIO's latency predictors offline on service times measured on a real GPU.

Input: per-request records of the ``hetero`` measurement (worker, prompt and output tokens,
dispatch/start/finish times from the job hashes). Each predictor of ``dispatcher/predictors.py``
(``seed``, ``vector``, ``rls``) learns them per worker in completion order, exactly as the
dispatcher does (``Predictor.update`` returns the error made before learning), with the load
feature the dispatcher uses: the KV tokens of that worker's jobs in flight when the job was
dispatched (itself included), in units of the model's weights.

``completions_to(errors)``: the first n after which the median of every following window of 10
absolute errors stays under the threshold (50 ms); None when that never happens.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from dio.dispatcher.cluster import DEFAULT_LOAD_UNIT_TOKENS
from dio.dispatcher.predictors import PREDICTORS, make_predictor

THRESHOLD_MS = 50.0
WINDOW = 10
SEEN_BINS = ((1, 1), (2, 5), (6, 10), (11, 20), (21, 50), (51, 100), (101, 200), (201, 500), (501, 10**9))


def _usable(record: dict[str, Any]) -> bool:
    return (record.get("status") == "completed" and record.get("worker") is not None
            and record.get("service_ms") is not None and record.get("finished_at") is not None)


def loads_at_dispatch(records: list[dict[str, Any]], load_units: dict[str, float]) -> dict[str, float]:
    """Return each job's load feature: KV tokens of its worker's jobs in flight when it was sent / load unit."""
    by_worker: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        if _usable(record):
            by_worker[record["worker"]].append(record)
    loads = {}
    for worker, jobs in by_worker.items():
        sent = np.array([j.get("dispatched_at") or j.get("started_at") or j["finished_at"] for j in jobs])
        ended = np.array([j["finished_at"] for j in jobs])
        kv = np.array([(j["prompt_tokens"] or 0) + (j["output_tokens"] or 0) for j in jobs], dtype=float)
        unit = load_units.get(worker) or DEFAULT_LOAD_UNIT_TOKENS
        for i, job in enumerate(jobs):
            in_flight = (sent <= sent[i]) & (ended > sent[i])
            loads[job["id"]] = float(kv[in_flight].sum()) / unit
    return loads


def replay(records: list[dict[str, Any]], kind: str, load_units: dict[str, float]) -> dict[str, list[float]]:
    """Feed the completions to a fresh predictor in completion order; return |error| (ms) per worker, in order."""
    predictor = make_predictor(kind)
    rows: dict[str, int] = {}
    errors: dict[str, list[float]] = defaultdict(list)
    loads = loads_at_dispatch(records, load_units)
    for record in sorted(filter(_usable, records), key=lambda r: r["finished_at"]):
        worker = record["worker"]
        if worker not in rows:
            rows[worker] = predictor.add_row()
        error = predictor.update(rows[worker], record["prompt_tokens"] or 0, record["output_tokens"] or 0,
                                 record["service_ms"], loads[record["id"]])
        errors[worker].append(abs(float(error)))
    return dict(errors)


def service_times(records: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Each worker's service times (ms) in the order ``replay`` learns them."""
    out: dict[str, list[float]] = defaultdict(list)
    for record in sorted(filter(_usable, records), key=lambda r: r["finished_at"]):
        out[record["worker"]].append(float(record["service_ms"]))
    return dict(out)


def completions_to(errors: list[float], threshold_ms: float = THRESHOLD_MS, window: int = WINDOW) -> int | None:
    """Return the first n such that every window of ``window`` errors after the n-th has median < threshold."""
    if len(errors) < window:
        return None
    medians = [float(np.median(errors[m:m + window])) for m in range(len(errors) - window + 1)]
    bad = [m for m, value in enumerate(medians) if value >= threshold_ms]
    return 0 if not bad else (bad[-1] + 1 if bad[-1] + 1 < len(medians) else None)


def curve(errors: dict[str, list[float]]) -> list[dict[str, Any]]:
    """Median |error| over every worker by completions seen (1, 2-5, 6-10, ...)."""
    out = []
    for lo, hi in SEEN_BINS:
        pooled = [e for errs in errors.values() for e in errs[lo - 1:hi]]
        if pooled:
            label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f"{lo}+")
            out.append({"seen": label, "median_abs_error_ms": round(float(np.median(pooled)), 1), "n": len(pooled)})
    return out


def evaluate(records: list[dict[str, Any]], load_units: dict[str, float]) -> dict[str, Any]:
    """Replay every predictor; return its error curve and completions to < 50 ms, per worker and worst."""
    out: dict[str, Any] = {}
    service = [r["service_ms"] for r in records if _usable(r)]
    services = service_times(records)
    for kind in PREDICTORS:
        errors = replay(records, kind, load_units)
        to = {worker: completions_to(errs) for worker, errs in errors.items()}
        pooled = [e for errs in errors.values() for e in errs]
        last = [e for errs in errors.values() for e in errs[-50:]]
        relative = [e / max(y, 1.0) for w, errs in errors.items() for e, y in zip(errs, services[w], strict=True)]
        out[kind] = {
            "completions_to_50ms": None if not to or None in to.values() else max(to.values()),
            "completions_to_50ms_per_worker": to,
            "median_abs_error_ms": round(float(np.median(pooled)), 1) if pooled else None,
            "median_abs_error_ms_last_50": round(float(np.median(last)), 1) if last else None,
            "median_relative_error": round(float(np.median(relative)), 4) if relative else None,
            "completions": {worker: len(errs) for worker, errs in errors.items()},
            "curve": curve(errors),
        }
    out["service_ms_median"] = round(float(np.median(service)), 1) if service else None
    out["threshold_ms"] = THRESHOLD_MS
    out["window"] = WINDOW
    return out
