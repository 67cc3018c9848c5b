"""Benchmark output: result files under ``ops/bench/results/``, tables, progress bars.

Every result file records the benchmark, the time, the exact command, the machine (CPU count,
Python, package and Redis versions, git commit: ``dio.ops.machine.machine_info``) and every figure.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import redis
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dio.ops.machine import machine_info

RESULTS_DIR = Path(__file__).resolve().parent / "results"

console = Console()  # tables: stdout (the --json line comes after them)
status = Console(stderr=True)  # progress and notes: stderr


def command_line() -> str:
    """Return the command that is running, as a shell would show it (``dio bench ...``)."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]] if sys.argv else []
    return shlex.join(argv)


def payload(benchmark: str, figures: dict[str, Any], client: redis.Redis | None = None) -> dict[str, Any]:
    """Wrap a benchmark's figures with what is needed to reproduce and judge them."""
    return {"benchmark": benchmark, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command_line(), "argv": list(sys.argv), "machine": machine_info(client), **figures}


def save(name: str, data: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write ``<out_dir>/<name>.json`` and return its path."""
    out = Path(out_dir or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path


def json_line(obj: Any) -> str:
    """Return ``obj`` as one line of JSON (the last stdout line of ``--json``)."""
    return json.dumps(obj, separators=(",", ":"), default=str)


def progress() -> Progress:
    """Return a progress display on stderr (it disappears when done)."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=status, transient=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    """Build a rich table whose cells are shown with ``fmt``."""
    out = Table(title=title)
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*(fmt(v) for v in row))
    return out


def fmt(value: Any) -> str:
    """Format a figure for a table: None as '-', floats to 3 significant digits or whole numbers."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    return str(value)
