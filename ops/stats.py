"""Benchmark statistics: percentiles, SLO attainment and goodput.

Pure functions, no I/O. A request that never finished (rejected, failed, timed out) has latency
``None``: it counts in the request total, misses every SLO, and is left out of the percentiles,
which describe the requests that did finish.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_QUANTILES = (50, 90, 99)
REASON_CHARS = 160  # a grouped reason is cut to this length
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def reason_key(text: str | None) -> str:
    """Return a reason without its request-specific numbers, so equal causes group together."""
    if not text:
        return "(none)"
    return NUMBER.sub("#", text)[:REASON_CHARS]


def _finished(values: Iterable[float | None]) -> np.ndarray:
    """Return the finite values as a float array, dropping ``None`` and NaN."""
    array = np.asarray([v for v in values if v is not None], dtype=float)
    return array[np.isfinite(array)]


def percentile(values: Iterable[float | None], q: float) -> float | None:
    """Return the q-th percentile (0-100) of the finished values, or None if there are none."""
    array = _finished(values)
    if array.size == 0:
        return None
    return float(np.percentile(array, q))


def percentiles(
    values: Iterable[float | None], quantiles: Sequence[float] = DEFAULT_QUANTILES
) -> dict[str, float | None]:
    """Return ``{"p50": ..., "p90": ..., "p99": ...}`` (None for each when nothing finished)."""
    array = _finished(values)
    keys = [f"p{q:g}" for q in quantiles]
    if array.size == 0:
        return dict.fromkeys(keys)
    return dict(zip(keys, (float(v) for v in np.percentile(array, quantiles)), strict=True))


def met_slo(latencies: Sequence[float | None], deadlines: float | Sequence[float | None]) -> np.ndarray:
    """Return one bool per request: finished within its deadline.

    Args:
        deadlines: one deadline for every request, or one per request (None: no SLO, always met
            once finished).
    """
    n = len(latencies)
    if isinstance(deadlines, int | float):
        deadlines = [float(deadlines)] * n
    if len(deadlines) != n:
        raise ValueError(f"{n} latencies but {len(deadlines)} deadlines")
    lat = np.asarray([np.inf if v is None else v for v in latencies], dtype=float)
    ddl = np.asarray([np.inf if d is None else d for d in deadlines], dtype=float)
    return np.isfinite(lat) & (lat <= ddl)


def slo_attained(latencies: Sequence[float | None], deadlines: float | Sequence[float | None]) -> float | None:
    """Return the fraction of requests that finished within their deadline (None if no requests)."""
    if len(latencies) == 0:
        return None
    return float(met_slo(latencies, deadlines).mean())


def goodput(
    tokens: Sequence[int],
    latencies: Sequence[float | None],
    deadlines: float | Sequence[float | None],
    span_s: float,
) -> float:
    """Return tokens per second, counting only the requests that met their SLO, over ``span_s``."""
    if span_s <= 0:
        raise ValueError(f"span_s must be positive, got {span_s}")
    if len(tokens) != len(latencies):
        raise ValueError(f"{len(tokens)} token counts but {len(latencies)} latencies")
    if len(tokens) == 0:
        return 0.0
    good = met_slo(latencies, deadlines)
    return float(np.asarray(tokens, dtype=float)[good].sum() / span_s)


def summarize(
    latencies: Sequence[float | None],
    *,
    deadlines: float | Sequence[float | None] | None = None,
    tokens: Sequence[int] | None = None,
    span_s: float | None = None,
) -> dict[str, float | int | None]:
    """Return count, finished, mean, p50/p90/p99 and max; SLO attainment and goodput when given."""
    done = _finished(latencies)
    summary: dict[str, float | int | None] = {
        "count": len(latencies),
        "finished": int(done.size),
        "mean": float(done.mean()) if done.size else None,
        **percentiles(done),
        "max": float(done.max()) if done.size else None,
    }
    if deadlines is not None:
        summary["slo_attained"] = slo_attained(latencies, deadlines)
        if tokens is not None and span_s is not None:
            summary["goodput_tok_s"] = goodput(tokens, latencies, deadlines, span_s)
    return summary
