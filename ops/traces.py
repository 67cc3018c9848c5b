"""Load LLM workload traces into one shape: arrival time, prompt tokens, output tokens.

Three formats (``fmt``), detected from the first line:

- ``azure``: the Azure LLM inference traces, CSV ``TIMESTAMP,ContextTokens,GeneratedTokens``
  with wall-clock timestamps such as ``2023-11-16 18:15:46.6805900``.
- ``mooncake``: Mooncake-style JSONL, ``{"timestamp": ms, "input_length", "output_length",
  "hash_ids": [...]}``; ``hash_ids`` name 512-token prompt blocks, equal ids share a KV prefix.
- ``lengths``: length-only CSV ``num_prefill_tokens,num_decode_tokens,...`` (ShareGPT, arXiv);
  arrivals come from a Poisson process (``rate``) or from another trace (``arrivals``).

Arrival times are seconds after the first request, sorted. Output token counts below 1 are
clamped to 1. None of the public traces DIO benchmarks on has one (the smallest output is 1 in Mooncake, 2 in
ShareGPT, 5 in arXiv, 6 in Azure code, 7 in Azure conversation), so the clamp only guards other
dumps and hand-written files: a request must generate at least one token to be served at all
(vLLM rejects ``max_tokens=0``), and dropping the row would shift every later arrival's index.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import numpy as np

from dio.ops.stats import percentile

FORMATS = ("azure", "mooncake", "lengths")
BUNDLED = {
    "azure-code": "azure_code_2000.csv",
    "azure-conv": "azure_conv_2000.csv",
    "arxiv": "arxiv_lengths_2000.csv",
    "mooncake": "mooncake_500.jsonl",
}
AZURE_COLUMNS = ("timestamp", "contexttokens", "generatedtokens")
LENGTH_COLUMNS = ("num_prefill_tokens", "num_decode_tokens")
MOONCAKE_MS_PER_S = 1000.0

_TIMESTAMP = re.compile(
    r"^(?P<base>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?$"
)


class TraceError(ValueError):
    """A trace file could not be read; the message names the file and the line."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a workload trace."""

    arrival_s: float  # seconds after the trace's first request
    prompt_tokens: int
    output_tokens: int
    prefix_hashes: list[int] | None = None  # Mooncake block ids (512 tokens each), if known


Trace = list[TraceRequest]


def bundled(name: str) -> Path:
    """Return the path of a sample trace shipped with DIO ("azure-code", "azure-conv", ...)."""
    if name not in BUNDLED:
        raise KeyError(f"no bundled trace {name!r}; choose one of {sorted(BUNDLED)}")
    # DIO is installed as plain files (not zipped), so the resource is a real path.
    return Path(str(files("dio.ops").joinpath("data", BUNDLED[name])))


def load_trace(
    path: str | Path,
    *,
    fmt: str = "auto",
    arrivals: Sequence[float] | Trace | None = None,
    rate: float | None = None,
    seed: int = 0,
    max_requests: int | None = None,
) -> Trace:
    """Load a trace file, sorted by arrival, arrivals relative to the first request.

    Args:
        fmt: "azure", "mooncake", "lengths" or "auto" (detect from the first line).
        arrivals: arrival times (or a trace whose arrival times to take) for a length-only trace;
            if fewer than the rows, only that many rows are used.
        rate: requests per second: Poisson arrivals for a length-only trace; for a timed trace,
            rescale its arrivals to this mean rate, keeping their burstiness.
        max_requests: keep only the first this many requests (after sorting by arrival).
    """
    path = Path(path)
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt not in FORMATS:
        raise ValueError(f"unknown trace format {fmt!r}; choose one of {FORMATS} or 'auto'")
    if arrivals is not None and fmt != "lengths":
        raise ValueError(f"{path}: arrivals= applies to length-only traces, this one is {fmt}")
    if fmt == "lengths":
        return load_lengths(path, arrivals=arrivals, rate=rate, seed=seed, max_requests=max_requests)
    trace = (load_azure if fmt == "azure" else load_mooncake)(path)[:max_requests]
    return rescale_arrivals(trace, rate) if rate is not None else trace


def detect_format(path: Path) -> str:
    """Return the format of a trace file from its first non-blank line."""
    with _open(path) as handle:
        first = next((line.strip() for line in handle if line.strip()), "")
    header = {name.strip().lower() for name in first.split(",")}
    if first.startswith("{"):
        return "mooncake"
    if set(AZURE_COLUMNS) <= header:
        return "azure"
    if set(LENGTH_COLUMNS) <= header:
        return "lengths"
    raise TraceError(f"{path}:1: cannot tell the trace format from {first[:80]!r}")


def load_azure(path: str | Path) -> Trace:
    """Load an Azure LLM inference trace CSV."""
    stamped = [
        (
            _at(path, n, lambda row=row: _timestamp_ns(row["timestamp"])),
            _lengths(path, n, row, AZURE_COLUMNS[1:]),
        )
        for n, row in _csv_rows(Path(path), AZURE_COLUMNS)
    ]
    if not stamped:
        return []
    start_ns = min(ns for ns, _ in stamped)
    trace = [TraceRequest((ns - start_ns) / 1e9, p, o) for ns, (p, o) in stamped]
    return _sorted(trace)


def load_mooncake(path: str | Path) -> Trace:
    """Load a Mooncake-style JSONL trace (timestamps in milliseconds)."""
    path = Path(path)
    records = []
    with _open(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                records.append(_at(path, number, lambda line=line: _mooncake_record(line)))
    if not records:
        return []
    start_ms = min(ms for ms, _ in records)
    trace = [replace(request, arrival_s=(ms - start_ms) / MOONCAKE_MS_PER_S) for ms, request in records]
    return _sorted(trace)


def load_lengths(
    path: str | Path,
    *,
    arrivals: Sequence[float] | Trace | None = None,
    rate: float | None = None,
    seed: int = 0,
    max_requests: int | None = None,
) -> Trace:
    """Load a length-only CSV and give it arrivals from ``arrivals`` or a Poisson ``rate``."""
    if (arrivals is None) == (rate is None):
        raise ValueError(f"{path}: a length-only trace needs exactly one of arrivals= or rate=")
    rows = _csv_rows(Path(path), LENGTH_COLUMNS)
    lengths = [_lengths(path, n, row, LENGTH_COLUMNS) for n, row in rows][:max_requests]
    if arrivals is None:
        times = poisson_arrivals(len(lengths), rate, seed)
    else:
        times = [a.arrival_s if isinstance(a, TraceRequest) else float(a) for a in arrivals]
    return with_arrivals([TraceRequest(0.0, p, o) for p, o in lengths], times)


def with_arrivals(trace: Trace, arrivals: Sequence[float]) -> Trace:
    """Return the requests (in order) with the given arrival times, as many as both have."""
    n = min(len(trace), len(arrivals))
    times = sorted(float(a) for a in arrivals[:n])
    start = times[0] if times else 0.0
    return [replace(r, arrival_s=t - start) for r, t in zip(trace[:n], times, strict=True)]


def poisson_arrivals(n: int, rate: float, seed: int = 0) -> list[float]:
    """Return n arrival times of a Poisson process at ``rate`` per second, the first at 0."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    if n <= 0:
        return []
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def mean_rate(trace: Trace) -> float | None:
    """Return requests per second, 1 / mean inter-arrival time (None under two distinct times)."""
    if len(trace) < 2 or trace[-1].arrival_s <= trace[0].arrival_s:
        return None
    return (len(trace) - 1) / (trace[-1].arrival_s - trace[0].arrival_s)


def rescale_arrivals(trace: Trace, target_rps: float) -> Trace:
    """Stretch or squeeze the inter-arrival times so the mean rate is ``target_rps``.

    Every gap is scaled by the same factor, so bursts stay bursts (the inter-arrival CV is kept).
    A trace whose requests all arrive at once has no rate to scale and is returned unchanged.
    """
    if target_rps <= 0:
        raise ValueError(f"target_rps must be positive, got {target_rps}")
    current = mean_rate(trace)
    if current is None:
        return list(trace)
    factor = current / target_rps
    start = trace[0].arrival_s
    return [replace(r, arrival_s=(r.arrival_s - start) * factor) for r in trace]


def sample(trace: Trace, n: int, seed: int = 0, *, contiguous: bool = True) -> Trace:
    """Return n requests: a random contiguous window, or a random subset kept in order.

    Arrivals are re-based so the first sampled request arrives at 0.
    """
    if n >= len(trace):
        return _rebased(list(trace))
    rng = np.random.default_rng(seed)
    if contiguous:
        start = int(rng.integers(0, len(trace) - n + 1))
        return _rebased(trace[start : start + n])
    picked = np.sort(rng.choice(len(trace), size=n, replace=False))
    return _rebased([trace[i] for i in picked])


@dataclass(frozen=True)
class TraceStats:
    """What a trace looks like: size, rate, burstiness, lengths."""

    count: int
    duration_s: float
    mean_rps: float | None
    interarrival_cv: float | None  # std / mean of the gaps: 1 for Poisson, more when bursty
    prompt_mean: float | None
    prompt_p50: float | None
    prompt_p99: float | None
    output_mean: float | None
    output_p50: float | None
    output_p99: float | None
    prefix_block_reuse: float | None = None  # share of prefix blocks seen earlier (Mooncake)


def prefix_block_reuse(trace: Trace) -> float | None:
    """Return the share of prefix blocks already seen in an earlier request (None without ids)."""
    seen: set[int] = set()
    total = hits = 0
    for request in trace:
        for block in request.prefix_hashes or ():
            total += 1
            hits += block in seen
            seen.add(block)
    return hits / total if total else None


def trace_stats(trace: Trace) -> TraceStats:
    """Return count, duration, mean rate, inter-arrival CV, prompt/output mean, p50, p99, reuse."""
    arrivals = np.asarray([r.arrival_s for r in trace], dtype=float)
    gaps = np.diff(arrivals)
    cv = float(gaps.std() / gaps.mean()) if gaps.size and gaps.mean() > 0 else None
    prompts = [r.prompt_tokens for r in trace]
    outputs = [r.output_tokens for r in trace]
    return TraceStats(
        count=len(trace),
        duration_s=float(arrivals[-1] - arrivals[0]) if trace else 0.0,
        mean_rps=mean_rate(trace),
        interarrival_cv=cv,
        prompt_mean=float(np.mean(prompts)) if trace else None,
        prompt_p50=percentile(prompts, 50),
        prompt_p99=percentile(prompts, 99),
        output_mean=float(np.mean(outputs)) if trace else None,
        output_p50=percentile(outputs, 50),
        output_p99=percentile(outputs, 99),
        prefix_block_reuse=prefix_block_reuse(trace),
    )


# --- parsing helpers -------------------------------------------------------------------------


def _open(path: Path):
    """Open a trace as text, dropping a UTF-8 byte-order mark; a missing file is a TraceError."""
    try:
        return path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise TraceError(f"{path}: cannot open: {exc}") from exc


def _csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row keyed by lower-case column name), checking the header first."""
    with _open(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip().lower() for name in next(reader, [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise TraceError(f"{path}:1: header lacks column(s) {missing}; got {header}")
        for cells in reader:
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                raise TraceError(f"{path}:{reader.line_num}: {len(cells)} fields, header has {len(header)}")
            yield reader.line_num, dict(zip(header, cells, strict=True))


def _at(path: str | Path, line: int, parse: Callable[[], Any]) -> Any:
    """Run a row parser, turning its failure into a TraceError naming the file and line."""
    try:
        return parse()
    except TraceError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise TraceError(f"{path}:{line}: {exc}") from exc


def _lengths(path: str | Path, line: int, row: dict[str, str], columns: Sequence[str]) -> tuple[int, int]:
    """Return (prompt tokens, output tokens) of a CSV row, read from the two named columns."""
    prompt_key, output_key = columns
    return _at(path, line, lambda: _token_counts(row[prompt_key], row[output_key]))


def _token_counts(prompt: Any, output: Any) -> tuple[int, int]:
    """Validate token counts: prompt at least 1, output clamped up to 1."""
    prompt_tokens, output_tokens = _count(prompt, "prompt"), _count(output, "output")
    if prompt_tokens < 1:
        raise ValueError(f"prompt token count must be at least 1, got {prompt_tokens}")
    return prompt_tokens, max(output_tokens, 1)


def _count(value: Any, what: str) -> int:
    """Parse a token count: an int, or a string or float holding a whole number."""
    if isinstance(value, bool):
        raise ValueError(f"{what} token count {value!r} is not a whole number")
    if isinstance(value, str):
        value = value.strip()
        try:
            return int(value)
        except ValueError:
            pass
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} token count {value!r} is not a whole number") from None
    if not number.is_integer():
        raise ValueError(f"{what} token count {value!r} is not a whole number")
    return int(number)


def _timestamp_ns(text: str) -> int:
    """Parse an Azure timestamp to integer nanoseconds since the epoch (naive times are UTC).

    Integer nanoseconds keep the 7 fractional digits exact; a float of epoch seconds would not.
    A bare number is taken as seconds.
    """
    text = text.strip()
    match = _TIMESTAMP.match(text)
    if match is None:
        try:
            return round(float(text) * 1e9)
        except ValueError:
            raise ValueError(f"bad timestamp {text!r}") from None
    base = datetime.fromisoformat(match["base"] + _tz_suffix(match["tz"]))
    if base.tzinfo is None:
        base = base.replace(tzinfo=UTC)
    fraction_ns = int((match["frac"] or "0")[:9].ljust(9, "0"))
    return int(base.timestamp()) * 1_000_000_000 + fraction_ns


def _tz_suffix(tz: str | None) -> str:
    """Return a timezone suffix that datetime.fromisoformat accepts."""
    if not tz:
        return ""
    if tz == "Z":
        return "+00:00"
    return tz if ":" in tz else f"{tz[:3]}:{tz[3:]}"


def _mooncake_record(line: str) -> tuple[float, TraceRequest]:
    """Parse one JSONL line into (timestamp in ms, request with arrival 0)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in ("timestamp", "input_length", "output_length") if key not in record]
    if missing:
        raise ValueError(f"missing key(s) {missing}")
    timestamp = record["timestamp"]
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float) or not math.isfinite(timestamp):
        raise ValueError(f"timestamp {timestamp!r} is not a number")
    prompt, output = _token_counts(record["input_length"], record["output_length"])
    return float(timestamp), TraceRequest(0.0, prompt, output, _hash_ids(record.get("hash_ids")))


def _hash_ids(value: Any) -> list[int] | None:
    """Validate an optional list of integer prefix-block ids."""
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError("hash_ids must be a list of integers")
    return value


def _sorted(trace: Trace) -> Trace:
    """Sort by arrival (stable, so ties keep file order)."""
    return sorted(trace, key=lambda r: r.arrival_s)


def _rebased(trace: Trace) -> Trace:
    """Shift arrivals so the first request arrives at 0."""
    if not trace:
        return []
    start = trace[0].arrival_s
    return [replace(r, arrival_s=r.arrival_s - start) for r in trace]
