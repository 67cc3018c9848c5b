"""Benchmark plots (matplotlib, Agg backend: no display needed), written next to the result JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

DPI = 110


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _by_load(runs: dict[str, dict[str, dict[str, Any]]], key: str) -> dict[str, tuple[list[float], list[Any]]]:
    """Return, per policy, the loads and the figure ``key`` at each load (sorted by load)."""
    out = {}
    for policy, by_load in runs.items():
        loads = sorted(by_load, key=float)
        out[policy] = ([float(x) for x in loads], [by_load[x].get(key) for x in loads])
    return out


def load_lines(runs: dict[str, dict[str, dict[str, Any]]], title: str, path: Path,
               cdfs: dict[str, dict[str, Any]] | None = None, x_label: str = "offered load (fraction of capacity)",
               panels: tuple[tuple[str, str, bool], ...] = (("p99_ms", "p99 latency (simulated ms)", True),
                                                           ("slo_attainment", "SLO attainment", False))) -> Path:
    """Plot figures against load, one line per policy, and optionally a latency CDF panel."""
    count = len(panels) + (1 if cdfs else 0)
    fig, axes = plt.subplots(1, count, figsize=(5.2 * count, 4.2))
    axes = list(axes) if count > 1 else [axes]
    for ax, (key, label, log) in zip(axes, panels, strict=False):
        for policy, (loads, values) in _by_load(runs, key).items():
            points = [(x, v) for x, v in zip(loads, values, strict=True) if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=policy, lw=2.5 if policy == "dio" else 1.2)
        ax.set_xlabel(x_label)
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if cdfs:
        ax = axes[-1]
        for policy, cdf in cdfs.items():
            if cdf["ms"]:
                ax.plot(cdf["ms"], cdf["q"], label=policy, lw=2.5 if policy == "dio" else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("latency (simulated ms)")
        ax.set_ylabel("fraction of completed requests")
        ax.grid(alpha=0.3)
        ax.set_title("latency CDF at the highest load")
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def curves(series: dict[str, tuple[list[float], list[float]]], title: str, x_label: str, y_label: str, path: Path,
           log_x: bool = False, log_y: bool = False, hline: float | None = None) -> Path:
    """Plot named (x, y) curves on one axis."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker=".", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1)
    ax.set_xscale("log" if log_x else "linear")
    ax.set_yscale("log" if log_y else "linear")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def panels(grid: list[dict[str, tuple[list[float], list[float]]]], titles: list[str], suptitle: str, x_label: str,
           y_label: str, path: Path, log_y: bool = True, hline: float | None = None) -> Path:
    """Plot several curve sets side by side (one panel each)."""
    fig, axes = plt.subplots(1, len(grid), figsize=(4.6 * len(grid), 4.0), sharey=True)
    axes = list(axes) if len(grid) > 1 else [axes]
    for ax, series, title in zip(axes, grid, titles, strict=True):
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name)
        if hline is not None:
            ax.axhline(hline, color="grey", ls="--", lw=1)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(y_label)
    axes[0].legend(fontsize=7)
    fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)



def rate_bands(series: dict[str, dict[str, Any]], title: str, x_label: str, y_label: str, path: Path,
               hline: float | None = None, vline: float | None = None, vline_label: str = "") -> Path:
    """Plot per name a median line with its min-max band against rate (log x), extra points and a goodput mark.

    ``series[name]`` has ``rates``, ``median``, ``low``, ``high`` (the line and band), ``points``
    (more (rate, value) pairs, drawn as dots) and ``mark`` (a rate drawn as a dotted line, or None).
    """
    fig, ax = plt.subplots(figsize=(7.6, 4.8))
    for name, s in series.items():
        line, = ax.plot(s["rates"], s["median"], marker="o", ms=3, label=name, lw=2.5 if name == "dio" else 1.2)
        color = line.get_color()
        ax.fill_between(s["rates"], s["low"], s["high"], color=color, alpha=0.15, lw=0)
        if s.get("points"):
            xs, ys = zip(*s["points"], strict=True)
            ax.scatter(xs, ys, color=color, s=8)
        if s.get("mark"):
            ax.axvline(s["mark"], color=color, ls=":", lw=1)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=1)
    if vline is not None:
        ax.axvline(vline, color="black", ls="-.", lw=1, label=vline_label or None)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=8)
    return _save(fig, path)
