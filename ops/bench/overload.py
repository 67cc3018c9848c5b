"""``dio bench overload``: offered load past capacity, for every policy.

Each load (1× as the reference, then 1.5×, 2×, 3× capacity) is offered for the same simulated
duration, so the cluster sits in steady overload rather than absorbing one burst. Requests carry
their SLO as a deadline, as interactive clients under load do: the dispatcher rejects a request
still waiting at its deadline, with the reason and a retry-after hint. What to look for: failed
(OOM) stays 0 for DIO; goodput at 3× stays near goodput at 1×; every request not served is
``rejected`` with a reason and retry-after, none ``failed`` or ``lost``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dio.ops.bench.replay import ReplayConfig, run_benchmark
from dio.ops.bench.workload import trace_name

OVERLOAD_KEYS = ("goodput_tok_s", "slo_attainment", "p99_ms", "completed", "rejected", "rejected_with_retry_after",
                 "failed", "lost", "submitted")
PANELS = (("goodput_tok_s", "goodput (output tokens/s meeting SLO)", False),
          ("p99_ms", "p99 latency of admitted requests (simulated ms)", True),
          ("failed", "failed (OOM)", False))


@dataclass
class OverloadConfig(ReplayConfig):
    """Options of ``dio bench overload`` (a replay past capacity, deadlines on)."""

    loads: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    duration_s: float | None = 20.0
    max_requests: int | None = None
    deadlines: bool = True
    benchmark: str = "overload"


def overload_figures(runs: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """Return per policy: goodput kept at each load (vs the lowest), and whether every unserved request
    was rejected with a retry-after (none failed or lost)."""
    out = {}
    for policy, by_load in runs.items():
        loads = sorted(by_load, key=float)
        base = by_load[loads[0]]["goodput_tok_s"] or 0.0
        out[policy] = {
            "goodput_kept": {load: round(by_load[load]["goodput_tok_s"] / base, 3) if base else None
                             for load in loads},
            "failed": {load: by_load[load]["failed"] for load in loads},
            "unserved_all_rejected_with_retry_after": {load: _clean(by_load[load]) for load in loads},
        }
    return {"overload_headline": out}


def _clean(figures: dict[str, Any]) -> bool:
    return (figures["failed"] == 0 and figures["lost"] == 0
            and figures["rejected"] == figures["rejected_with_retry_after"])


def run_overload(config: OverloadConfig) -> dict[str, Any]:
    """Run the overload benchmark; return the --json summary (per policy and load)."""
    the_plan, runs = run_benchmark(config, extra=overload_figures, table_keys=OVERLOAD_KEYS, panels=PANELS)
    keys = ("goodput_tok_s", "p99_ms", "completed", "rejected", "rejected_with_retry_after", "failed", "lost")
    return {"trace": trace_name(config.trace), "time_scale": the_plan.time_scale,
            "capacity_rps": round(the_plan.capacity_rps, 3), "capacity_source": the_plan.capacity["source"],
            "latency_unit": "simulated ms", **overload_figures(runs),
            "policies": {p: {load: {k: f[k] for k in keys} for load, f in by.items()} for p, by in runs.items()}}
