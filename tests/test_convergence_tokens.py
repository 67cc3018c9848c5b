"""The TTFT/TPOT part of ``dio bench convergence``: its metric, its hooks, and a fast run (pure: no Redis)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dio.dispatcher.config import DispatcherSettings
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SimRequest
from dio.ops.bench import convergence
from dio.ops.bench.convergence import TokenConfig, TokenRecord
from dio.ops.bench.virtual import VirtualCluster
from dio.ops.bench.workload import load_workload

MODEL = "llama-3.2-3b"
SMALL = "H100:1,T4:1"


def record(learned: int, ttft_pred: float, ttft: float, tpot_pred: float = 10.0, tpot: float | None = 10.0,
           warm: bool = True, order: int = 0) -> TokenRecord:
    return TokenRecord(worker="w", sent_s=0.0, done_s=1.0, phase="cold", learned=learned, warm=warm,
                       ttft_pred_ms=ttft_pred, tpot_pred_ms=tpot_pred, ttft_ms=ttft, tpot_ms=tpot, uncached=100,
                       queue=0.0, load=0.1, share=0.1, share_held=0.1, tpot_pred_held_ms=tpot_pred, running=1,
                       waiting=0, kv_usage=0.1, outstanding=1, output_tokens=2, order=order or learned + 1)


def test_mape_is_the_median_of_relative_errors() -> None:
    assert convergence.mape([110, 90, 100], [100, 100, 100]) == pytest.approx(0.1)
    assert convergence.mape([50, 300], [100, 100]) == pytest.approx(1.25)  # median of 0.5 and 2.0
    assert convergence.mape([5, 1], [0, 10]) == pytest.approx(0.9)  # a zero measurement has no percentage
    assert convergence.mape([], []) is None


def test_windows_group_predictions_by_completions_learned() -> None:
    records = ([record(k, 150.0, 100.0) for k in range(20)]  # 50% off before 20 completions were learned
               + [record(k, 105.0, 100.0, tpot_pred=12.0) for k in range(20, 40)]  # then 5%; TPOT 20%
               + [record(k, 100.0, 100.0, tpot=None) for k in range(40, 45)]  # a one-token output: no TPOT
               + [record(3, 1000.0, 1.0, warm=False)])  # no prediction at all yet: not counted
    windows = convergence.windows_of(records, width=20, count=2)
    assert [w["window"] for w in windows] == ["0–19", "20–39", "40+"]
    assert [w["n"] for w in windows] == [20, 20, 5]
    assert [w["n_tpot"] for w in windows] == [20, 20, 0]
    assert windows[0]["ttft"] == pytest.approx(0.5) and windows[1]["ttft"] == pytest.approx(0.05)
    assert windows[1]["tpot"] == pytest.approx(0.2) and windows[2]["tpot"] is None
    by_order = convergence.windows_of(records, width=20, count=2, key="order")
    assert [w["window"] for w in by_order] == ["1–20", "21–40", "41+"]
    assert [w["n"] for w in by_order] == [20, 20, 5]


def test_verdict_judges_every_window_after_the_first_with_enough_samples() -> None:
    def window(n: int, ttft: float | None, tpot: float | None) -> dict:
        return {"n": n, "n_tpot": n, "ttft": ttft, "tpot": tpot}

    windows = [window(50, 0.9, 0.9), window(30, 0.08, 0.15), window(2, 0.5, 0.5), window(40, 0.09, 0.05)]
    assert convergence.verdict(windows, 0.1, min_samples=5) == {"ttft": True, "tpot": False}
    assert convergence.verdict(windows[:1], 0.1, min_samples=5) == {"ttft": None, "tpot": None}
    assert convergence.verdict([windows[0], window(3, 0.01, 0.01)], 0.1, min_samples=5) == {"ttft": None,
                                                                                             "tpot": None}


def test_relative_floor_is_zero_on_a_linear_law_and_the_noise_otherwise() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.uniform(0.1, 4.0, 400), rng.uniform(0, 1, 400), np.ones(400)])
    y = x @ np.array([40.0, 200.0, 10.0])
    assert convergence.relative_floor(x, y) == pytest.approx(0.0, abs=1e-3)
    noisy = y * rng.uniform(0.8, 1.2, 400)  # ±20% uniform noise: |error| has a median near 10%
    assert convergence.relative_floor(x, noisy) == pytest.approx(0.1, abs=0.03)
    assert convergence.relative_floor(x[:4], y[:4]) is None  # too few samples for three weights


def test_future_prefill_counts_the_prompts_sent_while_a_job_decoded() -> None:
    first = replace(record(0, 1.0, 1.0), sent_s=0.0, ttft_ms=100.0, done_s=1.1)  # decodes from 0.1 s to 1.1 s
    second = replace(record(0, 1.0, 1.0), sent_s=0.5, ttft_ms=50.0, done_s=3.0, uncached=5000)
    late = replace(record(0, 1.0, 1.0), sent_s=2.0, ttft_ms=50.0, done_s=2.5, uncached=1000)
    elsewhere = replace(record(0, 1.0, 1.0), worker="v", sent_s=0.6, uncached=9000)
    convergence.note_future_prefill([late, second, first, elsewhere])
    assert first.future_prefill == pytest.approx(0.5)  # 5,000 tokens over its 1 s of decoding, in 10k
    assert second.future_prefill == pytest.approx(1000 / 2.45 / 1e4)
    assert late.future_prefill == 0.0


def test_slow_down_divides_the_speed_from_the_next_step() -> None:
    def finish(slowed: bool) -> float:
        scheduler = BatchScheduler(get_profile("H100"), get_model(MODEL))
        if slowed:
            convergence.slow_down(scheduler, 2.0)
        scheduler.add(SimRequest("a", 2000, 200), 0.0)
        while (t := scheduler.next_event_time()) is not None:
            for event in scheduler.advance_to(t):
                if event.kind is EventKind.finished:
                    return event.time
        raise AssertionError("never finished")

    assert 1.7 < finish(True) / finish(False) < 2.0  # compute and bandwidth halved; the step overhead is not


def _outcomes(window: list, probe: bool) -> list:
    virtual = VirtualCluster(SMALL, MODEL, DispatcherSettings(policy="dio", seed=0))
    if probe:
        convergence.TokenProbe(virtual, None, float("inf"), 1.0)
    return virtual.run(window, max_tokens=512, ttft_slo_ms=2000, tpot_slo_ms=100)


def test_the_probe_reads_the_router_without_changing_its_decisions() -> None:
    window = convergence.token_workload(load_workload("azure-conv"), 200, 20.0, seed=1)
    assert [(o.status, o.worker, o.latency_ms) for o in _outcomes(window, True)] == \
        [(o.status, o.worker, o.latency_ms) for o in _outcomes(window, False)]


def test_token_workload_repeats_a_short_trace_at_the_rate() -> None:
    trace = load_workload("azure-conv", max_requests=50)
    window = convergence.token_workload(trace, 120, 10.0, seed=0)
    assert len(window) == 120 and window[0].arrival_s == 0.0
    assert window[-1].arrival_s / 119 == pytest.approx(0.1, rel=1e-6)  # 10 requests per second on average
    assert all(b.arrival_s >= a.arrival_s for a, b in zip(window, window[1:], strict=False))


def test_a_small_run_writes_its_results(tmp_path: Path) -> None:
    config = TokenConfig(cluster=SMALL, requests=400, repeats=1, window=5, windows=2, out_dir=tmp_path,
                         rate_rps=20.0, records=True)
    summary = convergence.run_token_convergence(config)
    assert set(summary["variants"]) == {"prior", "no-prior"}
    for phases in summary["variants"].values():
        assert set(phases) == {"cold", "drift"}
        assert set(phases["cold"]["ttft_after_window"]) == {"H100-1", "T4-1"}
    data = json.loads((tmp_path / "convergence-tokens.json").read_text())
    assert data["benchmark"] == "convergence-tokens" and (tmp_path / "convergence-tokens.png").exists()
    h100 = data["workers"]["prior"]["H100-1"]
    assert [w["window"] for w in h100["cold"]["windows"]] == ["0–4", "5–9", "10+"]
    run = data["runs"]["prior"][0]
    assert run["outcomes"].get("completed", 0) == sum(sum(c.values()) for c in run["completions"].values())
    assert h100["cold"]["completions"] + h100["drift"]["completions"] > 0
    lines = (tmp_path / "convergence-tokens.records.jsonl.gz").read_bytes()
    assert lines[:2] == b"\x1f\x8b"  # gzip
    with pytest.raises(ValueError):
        convergence.run_token_convergence(replace(config, drift_worker="A100-40GB-1"))
