"""PNGs and the summary of the GPU measurements, from their JSON files.

    python -m dio.ops.gpu.report ops/bench/results/gpu --device-kind nvidia-h100-x1   # <dir>/*.png, <dir>/summary.json

The device may lack matplotlib: ``dio.ops.gpu.measure`` tries the plots there and skips them when it
cannot import it; this command draws them here from the JSON that came back.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if "error" not in data else None


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


# --- summary ----------------------------------------------------------------------------------------


def summary(folder: Path, device_kind: str | None = None) -> dict[str, Any]:
    """Collect the headline numbers of every measurement found in ``folder``.

    ``device_kind`` is the run tool's kind the measurements ran on (e.g. nvidia-h100-x1): the
    measurements see the GPU, not the kind, so whoever made them says it.
    """
    out: dict[str, Any] = {}
    sources = []
    env = None
    overhead = _load(folder, "overhead")
    if overhead:
        sources.append("overhead.json")
        env = overhead.get("environment")
        out.update({k: overhead.get(k) for k in ("throughput_ratio", "added_p50_ms", "added_p99_ms",
                                                  "added_p50_ms_unloaded", "added_p50_ms_unloaded_paired")})
    calibration = _load(folder, "calibration")
    if calibration:
        sources.append("calibration.json")
        env = env or calibration.get("environment")
        fit = calibration.get("fit") or {}
        out["sim_error_max"] = fit.get("sim_error_max")
        out["sim_error_mean"] = (fit.get("error_after") or {}).get("mean")
        out["sim_error_max_before_fit"] = (fit.get("error_before") or {}).get("max")
        out["sim_fitted_h100"] = fit.get("fitted")
    hetero = _load(folder, "hetero")
    if hetero:
        sources.append("hetero.json")
        env = env or hetero.get("environment")
        out["hetero_capacity_rps"] = hetero.get("capacity_rps")
        out["hetero"] = {
            run["policy"] + "@" + str(run["load"]): {k: run.get(k) for k in ("p50_ms", "p99_ms", "ttft_p99_ms",
                                                                              "slo_attainment", "failed", "rejected",
                                                                              "preemptions", "lost")}
            for run in hetero.get("runs", [])
        }
        out["per_policy"] = _per_policy(hetero.get("runs", []))
    predictor = _load(folder, "predictor-real") or ((hetero or {}).get("predictor_real") and hetero)
    if predictor:
        real = predictor.get("predictor_real", predictor)
        sources.append("predictor-real.json" if "predictor_real" not in predictor else "hetero.json")
        out["nlms_completions_to_50ms"] = {kind: (real.get(kind) or {}).get("completions_to_50ms")
                                           for kind in ("seed", "vector", "rls")}
    if env:
        out["device"] = env.get("gpu")
        out["device_kind"] = device_kind
        out["enforce_eager"] = env.get("enforce_eager")
        out["vllm_version"] = (env.get("versions") or {}).get("vllm")
        out["torch_version"] = (env.get("versions") or {}).get("torch")
    out["sources"] = sources
    return out


def _per_policy(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per policy: the worst p99 and SLO attainment over its loads, failed summed."""
    out: dict[str, Any] = {}
    for run in runs:
        entry = out.setdefault(run["policy"], {"p99_ms": None, "slo_attainment": None, "failed": 0, "by_load": {}})
        entry["by_load"][str(run["load"])] = {k: run.get(k) for k in ("p99_ms", "slo_attainment", "failed")}
        if run.get("p99_ms") is not None:
            entry["p99_ms"] = max(entry["p99_ms"] or 0.0, run["p99_ms"])
        if run.get("slo_attainment") is not None:
            entry["slo_attainment"] = min(entry["slo_attainment"] if entry["slo_attainment"] is not None else 1.0,
                                          run["slo_attainment"])
        entry["failed"] += run.get("failed") or 0
    return out


# --- plots ------------------------------------------------------------------------------------------


def _save(plt: Any, fig: Any, path: Path) -> bool:
    """Write a finished figure to ``path`` and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_calibration(result: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    fit = result.get("fit")
    if plt is None or not fit:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, kind, xlabel, ylabel in ((axes[0], "prefill", "prompt tokens", "time to first token (ms)"),
                                     (axes[1], "decode", "batch size", "decode step (ms)")):
        for i, model in enumerate(sorted({p["model"] for p in fit["points"]})):
            pts = sorted((p for p in fit["points"] if p["model"] == model and p["kind"] == kind), key=lambda p: p["x"])
            if not pts:
                continue
            x = [p["x"] for p in pts]
            color = f"C{i}"
            ax.plot(x, [p["measured_ms"] for p in pts], "o", color=color, label=f"{model} measured")
            ax.plot(x, [p["sim_before_ms"] for p in pts], ":", color=color, label=f"{model} sim, stock")
            ax.plot(x, [p["sim_after_ms"] for p in pts], "-", color=color, label=f"{model} sim, fitted")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    f = fit["fitted"]
    fig.suptitle(f"vLLM on {(result.get('environment') or {}).get('gpu') or 'GPU'} vs roofline: fitted compute eff "
                 f"{f['compute_efficiency']}, bandwidth eff {f['bandwidth_efficiency']}, step overhead "
                 f"{f['step_overhead_s'] * 1000:.2f} ms; max error {fit['error_before']['max']:.0%} -> "
                 f"{fit['error_after']['max']:.0%}", fontsize=9)
    return _save(plt, fig, path)


def plot_overhead(result: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    if plt is None or "direct" not in result:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "latencies_ms", "burst: latency CDF"),
                           (axes[1], "unloaded_latencies_ms", "one at a time: latency CDF")):
        for side in ("direct", "dio"):
            values = sorted(result[side].get(key) or [])
            if values:
                ax.plot(values, [(i + 1) / len(values) for i in range(len(values))], label=side)
        ax.set_xlabel("latency (ms)")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"DIO vs vLLM direct: throughput ratio {result.get('throughput_ratio')}, added p50 "
                 f"{result.get('added_p50_ms')} ms (burst), {result.get('added_p50_ms_unloaded')} ms (unloaded)",
                 fontsize=9)
    return _save(plt, fig, path)


def plot_hetero(result: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    runs = result.get("runs") or []
    if plt is None or not runs:
        return False
    policies = list(dict.fromkeys(r["policy"] for r in runs))
    loads = list(dict.fromkeys(r["load"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.8 / max(len(policies), 1)
    for ax, key, label in ((axes[0], "p99_ms", "p99 latency (ms)"), (axes[1], "ttft_p99_ms", "p99 TTFT (ms)"),
                           (axes[2], "slo_attainment", "SLO attainment")):
        for i, policy in enumerate(policies):
            values = [next((r.get(key) or 0 for r in runs if r["policy"] == policy and r["load"] == load), 0)
                      for load in loads]
            ax.bar([j + i * width for j in range(len(loads))], values, width, label=policy)
        ax.set_xticks([j + width * (len(policies) - 1) / 2 for j in range(len(loads))])
        ax.set_xticklabels([f"{load:.0%} of capacity" for load in loads])
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"3 vLLM workers on one GPU ({result.get('worker_kv_tokens')} KV tokens), "
                 f"capacity {result.get('capacity_rps')} req/s", fontsize=9)
    return _save(plt, fig, path)


def plot_predictor(result: dict[str, Any], path: Path) -> bool:
    plt = _pyplot()
    real = result.get("predictor_real", result)
    if plt is None or not real.get("rls"):
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind in ("seed", "vector", "rls"):
        points = (real.get(kind) or {}).get("curve") or []
        ax.plot(range(len(points)), [p["median_abs_error_ms"] for p in points], "o-",
                label=f"{kind} (to 50 ms: {real[kind].get('completions_to_50ms')})")
        ax.set_xticks(range(len(points)))
        ax.set_xticklabels([p["seen"] for p in points])
    ax.axhline(real.get("threshold_ms", 50), color="grey", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("completions seen (per worker)")
    ax.set_ylabel("median |error| (ms)")
    ax.set_title(f"predictors on real vLLM service times (median service {real.get('service_ms_median')} ms)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


PLOTS = {"calibration": plot_calibration, "overhead": plot_overhead, "hetero": plot_hetero,
         "predictor-real": plot_predictor}


def plot(name: str, result: dict[str, Any], folder: Path) -> str | None:
    """Draw a measurement's PNG into ``folder`` when matplotlib is there; return its file name."""
    draw = PLOTS.get(name)
    if draw is None:
        return None
    try:
        return f"{name}.png" if draw(result, folder / f"{name}.png") else None
    except Exception as exc:  # a plot must never cost the measurement
        print(f"plot {name} failed: {type(exc).__name__}: {exc}", flush=True)
        return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m dio.ops.gpu.report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", nargs="?", default="ops/bench/results/gpu", type=Path)
    parser.add_argument("--device-kind", default=None, help="the run tool's kind they ran on, e.g. nvidia-h100-x1")
    args = parser.parse_args(argv)
    for name in PLOTS:
        result = _load(args.folder, name)
        if result is not None:
            print(name, "->", plot(name, result, args.folder))
    data = summary(args.folder, args.device_kind)
    (args.folder / SUMMARY).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
