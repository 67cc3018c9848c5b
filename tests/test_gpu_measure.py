"""The pure parts of the GPU measurements (ops/gpu): request sets, the simulator fit, predictor replay."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from dio.gpu_worker.sim.profiles import GPU_PROFILES
from dio.ops.gpu import report
from dio.ops.gpu.calibration import Point, calibrate, simulate
from dio.ops.gpu.calibration import main as calibration_main
from dio.ops.gpu.predictors import completions_to, evaluate
from dio.ops.gpu.scenarios import MAX_OUTPUT_TOKENS, MAX_PROMPT_TOKENS, azure_conv, fit_linear, prompt_ids


def test_prompt_ids_are_deterministic_per_tag_and_index():
    assert prompt_ids("ov", 3, 50, 32000) == prompt_ids("ov", 3, 50, 32000)
    assert prompt_ids("ov", 3, 50, 32000)[:16] != prompt_ids("ov", 4, 50, 32000)[:16]
    assert prompt_ids("ov", 3, 50, 32000)[:16] != prompt_ids("h-dio-70", 3, 50, 32000)[:16]
    assert all(3 <= t < 32000 for t in prompt_ids("x", 0, 1000, 32000))


def test_azure_conv_clamps_to_the_tiny_model_context():
    trace = azure_conv(400, seed=0)
    assert len(trace) == 400
    assert max(r.prompt_tokens for r in trace) <= MAX_PROMPT_TOKENS
    assert max(r.output_tokens for r in trace) <= MAX_OUTPUT_TOKENS
    assert trace[0].arrival_s == 0.0


def test_fit_linear_recovers_a_plane():
    rows = [(p, o, 5.0 + 0.01 * p + 7.0 * o) for p in (100, 1000, 3000) for o in (16, 128, 512)]
    assert fit_linear(rows) == pytest.approx([5.0, 0.01, 7.0], rel=1e-6)


@pytest.mark.slow
def test_calibration_recovers_known_efficiencies():
    truth = replace(GPU_PROFILES["H100-80GB"], compute_efficiency=0.3, bandwidth_efficiency=0.6, step_overhead_s=0.005)
    points = []
    for model in ("tiny-llama-1b", "llama-3.2-3b"):
        points += [Point(model, "prefill", p, 0.0, 16384) for p in (128, 1024, 8192)]
        points += [Point(model, "decode", b, 0.0) for b in (1, 16, 256)]
    points = [replace(p, measured_s=simulate(truth, p)) for p in points]
    result = calibrate(points)
    assert result["sim_error_max"] < 0.02
    assert result["error_before"]["max"] > 0.3
    assert result["fitted"]["step_overhead_s"] == pytest.approx(0.005, rel=0.05)
    assert set(result["scaled_profiles"]) == set(GPU_PROFILES)


@pytest.mark.slow
def test_refit_recovers_host_overheads_from_a_saved_result(tmp_path):
    """``python -m dio.ops.gpu.calibration FILE`` fits the saved measurements again, overheads included."""
    truth = replace(GPU_PROFILES["H100-80GB"], compute_efficiency=0.5, bandwidth_efficiency=0.9,
                    step_overhead_s=0.0012, seq_overhead_s=20e-6, prefill_overhead_s=0.005)
    models = {}
    for model in ("tiny-llama-1b", "llama-3.2-3b"):
        prefill = [{"prompt_tokens": p,
                    "ttft_median_ms": 1000 * simulate(truth, Point(model, "prefill", p, 0.0, 16384))}
                   for p in (128, 512, 2048, 8192)]
        decode = [{"batch": b, "step_median_ms": 1000 * simulate(truth, Point(model, "decode", b, 0.0))}
                  for b in (1, 8, 64, 256)]
        models[model] = {"engine_args": {"max_num_batched_tokens": 16384}, "prefill": prefill, "decode": decode}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"models": models, "fit": {"on": "device"}}))
    assert calibration_main([str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["fit_on_device"] == {"on": "device"}
    assert saved["sim_error_max"] < 0.05
    assert saved["fit"]["fitted"]["prefill_overhead_s"] == pytest.approx(0.005, rel=0.2)
    assert saved["fit"]["fitted"]["seq_overhead_s"] == pytest.approx(20e-6, rel=0.3)


def test_completions_to_threshold():
    assert completions_to([500.0] * 5 + [10.0] * 20) == 1  # windows after the 1st completion have median < 50
    assert completions_to([10.0] * 20) == 0
    assert completions_to([100.0] * 20) is None
    assert completions_to([10.0] * 5) is None  # fewer than one window


def _record(i: int, worker: str, service_ms: float) -> dict:
    return {"id": f"j{i}", "status": "completed", "worker": worker, "prompt_tokens": 100 + i, "output_tokens": 50,
            "dispatched_at": float(i), "started_at": float(i), "finished_at": i + service_ms / 1000.0,
            "service_ms": service_ms, "policy": "dio", "load": 0.7}


def test_predictors_learn_a_constant_service_time():
    records = [_record(i, f"w{i % 2}", 800.0) for i in range(60)]
    result = evaluate(records, {})
    assert result["rls"]["completions_to_50ms"] is not None
    assert result["rls"]["completions_to_50ms"] <= 10
    assert result["rls"]["completions"] == {"w0": 30, "w1": 30}


def test_summary_reads_the_measurements(tmp_path):
    env = {"gpu": "NVIDIA H100 80GB HBM3", "versions": {"vllm": "0.26.0"}}
    (tmp_path / "overhead.json").write_text(json.dumps({"environment": env, "throughput_ratio": 0.97,
                                                        "added_p50_ms": 3.0}))
    runs = [{"policy": "dio", "load": 0.7, "p99_ms": 900.0, "slo_attainment": 0.99, "failed": 0},
            {"policy": "dio", "load": 0.9, "p99_ms": 1500.0, "slo_attainment": 0.95, "failed": 0}]
    (tmp_path / "hetero.json").write_text(json.dumps({"environment": env, "runs": runs,
                                                      "predictor_real": {"rls": {"completions_to_50ms": 4}}}))
    data = report.summary(tmp_path)
    assert data["throughput_ratio"] == 0.97
    assert data["device"] == "NVIDIA H100 80GB HBM3" and data["vllm_version"] == "0.26.0"
    assert data["per_policy"]["dio"] == {"p99_ms": 1500.0, "slo_attainment": 0.95, "failed": 0, "by_load": {
        "0.7": {"p99_ms": 900.0, "slo_attainment": 0.99, "failed": 0},
        "0.9": {"p99_ms": 1500.0, "slo_attainment": 0.95, "failed": 0}}}
    assert data["nlms_completions_to_50ms"]["rls"] == 4
