"""Benchmark helpers (pure): load scaling, SLOs, capacity, figures, convergence and decision maths."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dio.ops.bench import convergence, decision
from dio.ops.bench.calibrate import saturation_rps
from dio.ops.bench.cluster_run import RunConfig, RunRecord
from dio.ops.bench.cpu import machine_busy_s, process_cpu_s
from dio.ops.bench.metrics import counts, latency_figures, reason_key, slo_figures, summarize_run
from dio.ops.bench.replay import Plan, headline, offered
from dio.ops.bench.workload import (
    at_rate,
    auto_time_scale,
    deadline_ms,
    deadlines_ms,
    engine_saturation_rps,
    load_workload,
    nice_time_scale,
    span_s,
    unloaded_ms,
)
from dio.ops.local_cluster import WorkerSpec, parse_workers
from dio.ops.openloop import LOST, Outcome, request_fields
from dio.ops.traces import TraceRequest, mean_rate
from dio.protocol.keys import SIM_EOS_METADATA

MODEL = "llama-3.2-3b"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (0.3, 1.0),  # never slower than real time
        (1.0, 1.0),
        (3.3, 3.0),  # rounded down: the run takes at least the target
        (7.9, 6.0),
        (12.0, 10.0),
        (49.0, 40.0),
        (100.0, 100.0),
    ],
)
def test_nice_time_scale(raw: float, expected: float) -> None:
    assert nice_time_scale(raw) == expected


def test_auto_time_scale_plays_the_span_in_about_the_target() -> None:
    scale = auto_time_scale(300.0, 15.0)  # 300 simulated s in 15 wall s: 20x
    assert scale == 20.0
    with pytest.raises(ValueError):
        auto_time_scale(10.0, 0)


def test_at_rate_sets_the_mean_rate_and_keeps_bursts() -> None:
    trace = [TraceRequest(t, 100, 10) for t in (0.0, 0.1, 0.2, 10.0)]
    scaled = at_rate(trace, 3.0)
    assert mean_rate(scaled) == pytest.approx(3.0)
    gaps = np.diff([r.arrival_s for r in scaled])
    assert gaps[2] / gaps[0] == pytest.approx(98.0)  # the idle gap stays 98x the burst gap


def test_deadline_is_k_times_the_unloaded_latency_on_the_fastest_gpu() -> None:
    request = TraceRequest(0.0, 1000, 100)
    h100_only = deadline_ms([WorkerSpec("H100", 1)], MODEL, request, 5.0)
    mixed = deadline_ms(parse_workers("T4:3,H100:1"), MODEL, request, 5.0)
    assert mixed == pytest.approx(h100_only)  # the slow GPUs do not loosen the SLO
    assert deadline_ms([WorkerSpec("H100", 1)], MODEL, request, 10.0) == pytest.approx(2 * h100_only)
    assert unloaded_ms([WorkerSpec("T4", 1)], MODEL, request) > unloaded_ms([WorkerSpec("H100", 1)], MODEL, request)


def test_deadlines_follow_each_request() -> None:
    trace = [TraceRequest(0.0, 100, 10), TraceRequest(1.0, 4000, 500), TraceRequest(2.0, 100, 10)]
    deadlines = deadlines_ms([WorkerSpec("H100", 1)], MODEL, trace, 5.0)
    assert deadlines[0] == deadlines[2] < deadlines[1]


def test_load_workload_gives_length_only_traces_arrivals() -> None:
    poisson = load_workload("arxiv", max_requests=50)
    assert len(poisson) == 50 and span_s(poisson) > 0
    borrowed = load_workload("arxiv", arrivals="azure-code", max_requests=50)
    code = load_workload("azure-code", max_requests=50)
    assert [r.arrival_s for r in borrowed] == pytest.approx([r.arrival_s for r in code])
    assert load_workload("azure-conv", arrivals="poisson", max_requests=10)[0].arrival_s == 0.0
    with pytest.raises(ValueError, match="no trace file"):
        load_workload("/nonexistent/trace.csv")


def test_engine_saturation_is_faster_on_faster_gpus() -> None:
    trace = load_workload("azure-conv", max_requests=200)
    h100 = engine_saturation_rps("H100", MODEL, trace, sample=200)
    t4 = engine_saturation_rps("T4", MODEL, trace, sample=200)
    assert h100 > 5 * t4 > 0


def test_request_fields_carry_lengths_prefix_and_deadline() -> None:
    fields = request_fields(TraceRequest(0.0, 700, 30, [1, 2]), 3, MODEL, deadline_wall_ms=250.0)
    assert fields["num_prompt_tokens"] == 700 and fields["max_tokens"] == 30
    assert fields["prefix_hashes"] == [1, 2] and fields["deadline_ms"] == 250.0
    assert "deadline_ms" not in request_fields(TraceRequest(0.0, 700, 30), 3, MODEL)


@pytest.mark.parametrize(("cap", "max_tokens", "ignore_eos", "eos"), [
    (None, 30, True, None),  # no cap given: it asks for exactly its true length (the router knows it)
    (256, 256, None, "30"),  # a cap: the router sees the cap, the simulated engine the true length
])
def test_request_fields_keep_the_true_length_inside_the_engine(cap, max_tokens, ignore_eos, eos) -> None:
    fields = request_fields(TraceRequest(0.0, 700, 30), 3, MODEL, max_tokens=cap)
    assert fields["max_tokens"] == max_tokens and fields.get("ignore_eos") == ignore_eos
    assert (fields.get("metadata") or {}).get(SIM_EOS_METADATA) == eos


def _outcomes() -> list[Outcome]:
    return [
        Outcome("completed", "H100-1", latency_ms=100.0, ttft_ms=10.0, output_tokens=50),
        Outcome("completed", "T4-1", latency_ms=900.0, ttft_ms=90.0, output_tokens=50),
        Outcome("rejected", None, reason="no capacity before its deadline: 12 waiting", retry_after_s=1.0),
        Outcome("failed", "T4-1", reason="KV cache exhausted: preempted 2 times on T4"),
        Outcome(LOST),
    ]


def test_counts_add_up_to_submitted() -> None:
    c = counts(_outcomes())
    assert c["submitted"] == 5
    assert c["completed"] + c["rejected"] + c["failed"] + c["cancelled"] + c[LOST] == c["submitted"]
    assert c["rejected_with_retry_after"] == 1


def test_slo_counts_every_request_and_goodput_only_good_tokens() -> None:
    # deadlines: the first request met its SLO (100 <= 200), the second missed it (900 > 500).
    figures = slo_figures(_outcomes(), [200.0, 500.0, 1e9, 1e9, 1e9], span_s=10.0)
    assert figures["slo_attainment"] == pytest.approx(1 / 5)  # rejected, failed and lost all miss
    assert figures["goodput_tok_s"] == pytest.approx(5.0)  # 50 good tokens over 10 s
    assert figures["throughput_tok_s"] == pytest.approx(10.0)


def test_latency_percentiles_describe_completed_requests() -> None:
    figures = latency_figures(_outcomes())
    assert figures["p50_ms"] == pytest.approx(500.0)
    assert figures["ttft_p50_ms"] == pytest.approx(50.0)


def test_reason_key_groups_equal_causes() -> None:
    assert reason_key("needs 1234 KV tokens") == reason_key("needs 99 KV tokens") == "needs # KV tokens"
    assert reason_key(None) == "(none)"


def test_summarize_run_scales_predictor_error_to_simulated_ms() -> None:
    record = RunRecord(_outcomes(), wall_s=2.0, predictors={"T4-1": {"error_p50_ms": 3.0, "seen": 4}},
                       worker_gpus={"H100-1": "H100", "T4-1": "T4"})
    figures = summarize_run(record, [200.0, 500.0, 1e9, 1e9, 1e9], time_scale=10.0)
    assert figures["makespan_s"] == 20.0
    assert figures["workers"]["T4-1"]["predictor_error_p50_ms"] == 30.0
    assert figures["gpu_share"] == {"H100": pytest.approx(1 / 3, abs=1e-3), "T4": pytest.approx(2 / 3, abs=1e-3)}


def test_run_config_scales_wall_clock_settings_to_simulated_time() -> None:
    env = RunConfig(parse_workers("H100:1"), time_scale=10.0, max_wait_s=60.0).env()
    assert float(env["DIO_MAX_WAIT_S"]) == pytest.approx(6.0)
    assert float(env["DIO_HEARTBEAT_INTERVAL_S"]) == pytest.approx(0.05)


def test_saturation_rate_counts_completions_while_requests_arrive() -> None:
    arrivals = [i * 0.1 for i in range(100)]  # 10 s of arrivals
    latencies = [1000.0 * (i * 0.2 - i * 0.1 + 1.0) for i in range(100)]  # finishes every 0.2 s: 5 per s
    assert saturation_rps(arrivals, latencies) == pytest.approx(5.0, rel=0.1)
    assert saturation_rps(arrivals[:5], latencies[:5]) is None


def test_offered_keeps_the_first_duration_of_arrivals() -> None:
    trace = [TraceRequest(float(i), 100, 10) for i in range(100)]
    the_plan = Plan(trace, [float(i) for i in range(100)], capacity_rps=1.0, capacity={}, time_scale=1.0,
                    drain_wall_s=10.0)
    requests, deadlines = offered(the_plan, 2.0, duration_s=10.0)  # 2 requests/s for 10 s
    assert len(requests) == 20 and deadlines == [float(i) for i in range(20)]


def test_headline_picks_the_baseline_with_the_best_slo() -> None:
    def figures(p99: float, slo: float) -> dict:
        return {"p99_ms": p99, "slo_attainment": slo, "failed": 0, "lost": 0, "goodput_tok_s": 1.0}

    runs = {"dio": {"0.7": figures(100, 0.99)}, "round-robin": {"0.7": figures(800, 0.4)},
            "least-loaded": {"0.7": figures(300, 0.8)}, "random": {"0.7": figures(200, 0.8)}}
    top = headline(runs)["0.7"]
    assert top["best_baseline"]["policy"] == "random"  # equal SLO: the lower p99 wins
    assert top["rr_over_dio_p99"] == 8.0


def test_completions_to_threshold_needs_the_curve_to_stay_under() -> None:
    curve = np.array([500, 40, 300, 45, 40, 30, 20, 20, 20, 20, 20, 20, 20])
    assert convergence.completions_to(curve, 50.0, hold=5) == 3
    assert convergence.completions_to(curve, 10.0, hold=5) is None


def test_convergence_simulation_is_deterministic() -> None:
    config = convergence.ConvergenceConfig(completions=15, repeats=1)
    trace = load_workload("azure-conv", max_requests=300)
    first = convergence.simulate("H100", MODEL, trace, config, seed=1)
    again = convergence.simulate("H100", MODEL, trace, config, seed=1)
    assert len(first) == 30
    assert [y for _, y in first] == [y for _, y in again]
    assert all(y > 0 for _, y in first)
    assert convergence.errors(first, "vector").shape == (30,)


def test_drain_rate_between_ten_and_ninety_percent() -> None:
    samples = [(0.0, 0), (1.0, 100), (2.0, 500), (3.0, 900), (4.0, 1000)]
    assert decision.drain_rate(samples, 1000) == pytest.approx(400.0)
    assert decision.drain_rate([(0.0, 50)], 1000) is None
    # Too quick to resolve the window: from the last sample before any hand-off to the end.
    assert decision.drain_rate([(0.0, 0), (0.5, 0), (1.0, 1000)], 1000) == pytest.approx(2000.0)


def test_pure_decision_timing_on_a_synthetic_cluster() -> None:
    lengths = [(r.prompt_tokens, r.output_tokens) for r in load_workload("azure-conv", max_requests=50)]
    cluster = decision.synthetic_cluster(8, MODEL, "vector", lengths)
    assert len(cluster) == 8 and (cluster.predictor.seen > 0).all()
    timing = decision.time_decisions("dio", cluster, decision.requests(lengths, 50, MODEL))
    assert timing["score_us"] > 0
    assert cluster.outstanding.sum() == 0  # every reservation released again


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs Linux /proc")
def test_cpu_counters_read_this_process() -> None:
    assert process_cpu_s(os.getpid()) is not None
    assert machine_busy_s() > 0
    assert process_cpu_s(2**22 + 7) is None  # no such process
