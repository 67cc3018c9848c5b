"""``dio bench summary``: the headline tables of the result files, as Markdown (for the README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dio.ops.bench.report import RESULTS_DIR, fmt


def markdown_table(columns: list[str], rows: list[list[Any]]) -> str:
    """Return a Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def replay_section(data: dict[str, Any]) -> str:
    """Return one replay result: a table per load, a row per policy."""
    out = [f"### {data['label']} ({data['trace']}, {data['requests']} requests)",
           f"`{data['command']}`", "",
           f"Capacity {data['capacity']['used_rps']} req/s ({data['capacity']['source']}; roofline "
           f"{data['capacity'].get('roofline_rps')}, engine {data['capacity'].get('engine_rps')}), time scale "
           f"{data['time_scale']}, SLO {data['slo_k']}× unloaded on the fastest GPU; latencies in simulated ms.", ""]
    loads = sorted({load for by in data["runs"].values() for load in by}, key=float)
    for load in loads:
        rows = []
        for policy, by in data["runs"].items():
            f = by.get(load)
            if f is None:
                continue
            rows.append([policy, f["p50_ms"], f["p99_ms"], f["ttft_p99_ms"], _pct(f["slo_attainment"]),
                         f["goodput_tok_s"], f["completed"], f["rejected"], f["failed"], f["lost"],
                         f["predictor_error_ms"]])
        out += [f"load {load}:", "", markdown_table(["policy", "p50", "p99", "TTFT p99", "SLO", "goodput tok/s",
                                                     "completed", "rejected", "failed", "lost",
                                                     "pred. err ms"], rows), ""]
    return "\n".join(out)


def headline_rows(results: list[dict[str, Any]]) -> str:
    """Return one row per replay trace and load: DIO, the best baseline, round-robin."""
    rows = []
    for data in results:
        for load, h in data["headline"].items():
            dio, best, rr = h.get("dio", {}), h.get("best_baseline", {}), h.get("round-robin", {})
            rows.append([data["label"], load, dio.get("p99_ms"), _pct(dio.get("slo_attainment")), dio.get("failed"),
                         best.get("policy"), best.get("p99_ms"), _pct(best.get("slo_attainment")), best.get("failed"),
                         rr.get("p99_ms"), _pct(rr.get("slo_attainment")), rr.get("failed")])
    return markdown_table(["trace", "load", "DIO p99", "DIO SLO", "DIO failed", "best baseline", "its p99", "its SLO",
                           "its failed", "RR p99", "RR SLO", "RR failed"], rows)


def overload_section(data: dict[str, Any]) -> str:
    """Return the overload result: a row per policy and load."""
    rows = []
    for policy, by in data["runs"].items():
        kept = data.get("overload_headline", {}).get(policy, {}).get("goodput_kept", {})
        for load, f in sorted(by.items(), key=lambda kv: float(kv[0])):
            rows.append([policy, load, f["goodput_tok_s"], kept.get(load), _pct(f["slo_attainment"]), f["p99_ms"],
                         f["completed"], f["rejected"], f["rejected_with_retry_after"], f["failed"], f["lost"]])
    head = [f"### {data['label']} ({data['trace']})", f"`{data['command']}`", "",
            f"Capacity {data['capacity']['used_rps']} req/s ({data['capacity']['source']}), each load offered for "
            f"{data['duration_s']} simulated s, requests carry their SLO as deadline.", ""]
    return "\n".join(head) + "\n" + markdown_table(["policy", "load", "goodput tok/s", "goodput vs 1x", "SLO", "p99 ms",
                                             "completed", "rejected", "with retry-after", "failed", "lost"], rows)


def convergence_section(data: dict[str, Any]) -> str:
    """Return the convergence result: a row per predictor and GPU."""
    rows = []
    floors = data.get("least_squares_floor_ms", {})
    for kind, entry in data["predictors"].items():
        for gpu, g in entry["by_gpu"].items():
            rows.append([kind, gpu, g["cold"], g.get("cold_relative"), g["cold_final_median_ms"],
                         floors.get(gpu, {}).get("cold"), g["drift"], g.get("drift_relative"),
                         g["drift_final_median_ms"], floors.get(gpu, {}).get("drift")])
    head = [f"### convergence ({data['trace']}, load {data['load']}, slowdown {data['slowdown']}×, "
            f"{data['repeats']} runs)", f"`{data['command']}`", ""]
    return "\n".join(head) + "\n" + markdown_table(["predictor", "GPU", "cold: to 50 ms", "cold: to 10%",
                                             "cold: final median ms", "cold: LS floor ms", "drift: to 50 ms",
                                             "drift: to 10%", "drift: final median ms", "drift: LS floor ms"], rows)


def convergence_tokens_section(data: dict[str, Any]) -> str:
    """Return the TTFT/TPOT convergence result: per variant and phase, a row per worker, MAPE % per window."""
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.0f}"

    def yes(value: bool | None) -> str:
        return "-" if value is None else ("yes" if value else "no")

    out = [f"### {data['label']} ({data['trace']}, {data['cluster']}, {data['rate_rps']} req/s, drift: "
           f"{data['drift_worker']} {data['slowdown']}× slower, {data['repeats']} runs)", f"`{data['command']}`", "",
           f"TTFT / TPOT MAPE (%) of DIO's predictions at dispatch, by completions the worker had learned in the "
           f"phase; floor: the best linear fit on the router's features, in sample; met: ≤ "
           f"{100 * data['target_mape']:.0f}% in every window after the first."]
    for variant, by_worker in data["workers"].items():
        for phase in ("cold", "drift"):
            labels = [w["window"] for w in next(iter(by_worker.values()))[phase]["windows"]]
            rows = [[worker, entry[phase]["completions"],
                     *[f"{pct(w['ttft'])} / {pct(w['tpot'])}" if w["n"] else "-" for w in entry[phase]["windows"]],
                     f"{pct(entry[phase]['floor']['ttft'])} / {pct(entry[phase]['floor']['tpot'])}",
                     f"{yes(entry[phase]['met']['ttft'])} / {yes(entry[phase]['met']['tpot'])}"]
                    for worker, entry in by_worker.items()]
            out += ["", f"{variant}, {phase}:", "",
                    markdown_table(["worker", "completions", *labels, "floor", "met"], rows)]
    return "\n".join(out)


def decision_section(data: dict[str, Any]) -> str:
    """Return the decision result: a row per worker count, pure µs per policy and DIO's e2e rate."""
    policies = list(data["by_policy"])
    rows = []
    for count in data["worker_counts"]:
        key = str(count)
        rows.append([count, *(data["by_policy"][p].get(key, {}).get("score_us") for p in policies),
                     *(data["by_policy"][p].get(key, {}).get("e2e_decisions_per_s") for p in policies)])
    columns = ["workers", *(f"{p} µs" for p in policies), *(f"{p} e2e/s" for p in policies)]
    return "\n".join(["### decision", f"`{data['command']}`", "", ""]) + markdown_table(columns, rows)


def pipeline_section(data: dict[str, Any]) -> str:
    """Return the pipeline result."""
    keys = ("dio_rps", "rq_rps", "dio_over_rq", "xadd_rps", "xadd_pipelined_rps", "half_load_rps", "added_p50_ms",
            "added_p99_ms")
    rows = [[k, data.get(k)] for k in keys]
    rows += [[f"stage p50 ms: {k}", v] for k, v in (data.get("stages_p50_ms") or {}).items()]
    rows += [[f"CPU µs/request: {k}", v] for k, v in (data.get("cpu_us_per_request") or {}).items()]
    rows += [[f"added ms at {rate} req/s: p50 / p99", f"{v['p50']} / {v['p99']}"]
             for rate, v in (data.get("added_ms_at_rate") or {}).items()]
    return "\n".join(["### pipeline", f"`{data['command']}`", "", ""]) + markdown_table(["figure", "value"], rows)


def goodput_section(data: dict[str, Any]) -> str:
    """Return one goodput result: feasibility per GPU type, then a row per policy."""
    slo = data["slo"]
    head = [f"### {data['label']} ({data['trace']}, {data['mode']}, SLO {slo['name']}: TTFT {slo['ttft_ms']:g} ms, "
            f"TPOT {slo['tpot_ms']:g} ms)", f"`{data['command']}`", "",
            f"max_tokens {data['max_tokens']}, seeds {data['seeds']}, capacity {data['capacity_rps']} req/s; rates in "
            "requests per simulated s.", ""]
    feasible = [[gpu, f["fit"], f["ttft_p99_ms"], f["tpot_p99_ms"], _pct(f["meets_both"]), f["feasible"]]
                for gpu, f in data["feasibility"].items()]
    rows = [[p, s["goodput_rps"], f"{s['goodput_range'][0]:g}–{s['goodput_range'][1]:g}",
             _pct(s["goodput_over_capacity"]), s["preemptions"], s["rejected_below_goodput"],
             _pct(s["kv_held_at_goodput"])] for p, s in data["summary"].items()]
    return "\n".join(head) + "\n" + markdown_table(["GPU", "fit", "TTFT p99 ms idle", "TPOT p99 ms idle",
                                                    "meet both", "feasible"], feasible) + "\n\n" + markdown_table(
        ["policy", "goodput req/s", "range", "of capacity", "preemptions", "rejected ≤ goodput", "KV-held"],
        rows) + _goodput_comparisons(data)


def _goodput_comparisons(data: dict[str, Any]) -> str:
    """Full against virtual attainment (--full --rates) and the peers' attainment (--peers), where the file has them."""
    out = ""
    rows = [[p, rate, seed, _pct(c["virtual"]), _pct(c["full"]), "yes" if c["confirms"] else "no"]
            for p, s in data["summary"].items() for rate, by_seed in (s.get("full_vs_virtual") or {}).items()
            for seed, c in by_seed.items()]
    if rows:
        out += "\n\nfull against virtual, same rate and seed:\n\n" + markdown_table(
            ["policy", "rate", "seed", "virtual", "full", "confirms"], rows)
    peers = data.get("peers") or {}
    if peers:
        rates = sorted({float(r) for s in peers.values() for r in s["attainment_at"]}, key=float)
        keys = [f"{r:g}" for r in rates]
        rows = [[name, *(_pct(s["attainment_at"].get(k)) for k in keys), s.get("time_scale")]
                for name, s in [*peers.items(), *data["summary"].items()]]
        out += (f"\n\npeers over HTTP ({data['mode']} DIO beside them): SLO attainment at each rate\n\n"
                + markdown_table(["peer / policy", *keys, "time scale"], rows))
    return out


SECTIONS = {"goodput": goodput_section, "overload": overload_section, "convergence": convergence_section,
            "convergence-tokens": convergence_tokens_section, "decision": decision_section,
            "pipeline": pipeline_section}


def render(folder: Path = RESULTS_DIR) -> str:
    """Return every result file of ``folder`` as Markdown, the replay headline first."""
    results = [json.loads(p.read_text()) | {"label": p.stem} for p in sorted(folder.glob("*.json"))]
    replays = [d for d in results if d.get("benchmark") == "replay"]
    parts = []
    if replays:
        parts.append("### replay headline (DIO vs the best baseline vs round-robin; p99 in simulated ms)\n\n"
                     + headline_rows(replays))
        parts += [replay_section(d) for d in replays]
    parts += [SECTIONS[d["benchmark"]](d) for d in results if d.get("benchmark") in SECTIONS]
    return "\n\n".join(parts) + "\n"
