"""Every ``dio bench`` command, for a few seconds on a tiny cluster, through the real CLI.

Checks the last stdout line (one JSON object), the result file's schema, and that the figures add
up: completed + rejected + failed + cancelled + lost = submitted, for every policy and load.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dio.ops.bench.peers import peer_command
from dio.ops.bench.summary import render
from dio.ops.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_KEYS = {"p50_ms", "p99_ms", "slo_attainment", "goodput_tok_s", "completed", "rejected", "failed", "lost"}


@pytest.fixture
def bench(redis_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Run ``dio bench ARGS --out tmp --json``; return (the last stdout line as JSON, the results folder)."""
    monkeypatch.setenv("DIO_REDIS_URL", redis_url)

    def run(*args: str) -> dict:
        result = CliRunner().invoke(app, ["bench", *args, "--out", str(tmp_path), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    run.out = tmp_path
    return run


def _saved(out: Path, name: str) -> dict:
    data = json.loads((out / f"{name}.json").read_text())
    assert data["command"] and data["argv"] and data["machine"]["cpu_count"] >= 1
    return data


def _adds_up(figures: dict) -> None:
    ended = sum(figures[k] for k in ("completed", "rejected", "failed", "cancelled", "lost"))
    assert ended == figures["submitted"]


def test_replay(bench) -> None:
    summary = bench("replay", "--trace", "azure-conv", "--cluster", "H100:1,T4:1", "--load", "0.5", "0.8",
                    "--policies", "dio,round-robin", "--max-requests", "30", "--time-scale", "20",
                    "--drain-wall-s", "15")
    assert set(summary["policies"]) == {"dio", "round-robin"}
    for by_load in summary["policies"].values():
        assert set(by_load) == {"0.5", "0.8"}
        for figures in by_load.values():
            assert RUN_KEYS <= set(figures)
    data = _saved(bench.out, "replay-azure-conv")
    assert data["latency_unit"].startswith("simulated ms") and data["capacity"]["source"] == "engine"
    for by_load in data["runs"].values():
        for figures in by_load.values():
            _adds_up(figures)
            assert figures["submitted"] == 30
            assert sum(w["jobs"] for w in figures["workers"].values()) <= 30
    assert (bench.out / "replay-azure-conv.png").stat().st_size > 0
    assert set(data["headline"]["0.8"]) >= {"dio", "best_baseline", "round-robin"}
    tables = render(bench.out)  # dio bench summary
    assert "replay headline" in tables and "| replay-azure-conv | 0.8 |" in tables


def test_virtual_replay_runs_every_policy_in_simulated_time(bench) -> None:
    summary = bench("replay", "--trace", "azure-conv", "--cluster", "H100:1,A100-40GB:1,T4:1", "--load", "0.7",
                    "--max-requests", "300", "--virtual")
    assert set(summary["policies"]) == {"dio", "round-robin", "random", "least-loaded", "power-of-two", "queue-kv"}
    data = _saved(bench.out, "replay-virtual-azure-conv")
    assert data["virtual"] is True and data["latency_unit"] == "simulated ms"
    for by_load in data["runs"].values():
        for figures in by_load.values():
            _adds_up(figures)
            assert figures["submitted"] == 300 and figures["lost"] == 0
    dio, rr = data["runs"]["dio"]["0.7"], data["runs"]["round-robin"]["0.7"]
    assert dio["failed"] == 0 and dio["gpu_share"]["H100"] > rr["gpu_share"]["H100"]  # DIO favours the fast GPU


def test_virtual_replay_refuses_peers() -> None:
    result = CliRunner().invoke(app, ["bench", "replay", "--trace", "azure-conv", "--virtual",
                                      "--peers", "vllm-router:round_robin"])
    assert result.exit_code != 0 and "virtual" in result.output


def test_replay_with_a_peer_router(bench) -> None:
    launcher = peer_command("vllm-router", "round_robin", ["http://127.0.0.1:1"], 1)[0]
    try:
        runs = subprocess.run([launcher, "--help"], capture_output=True, check=False, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        runs = False
    if not runs:
        pytest.skip("vllm-router does not run here")
    peer = "vllm-router:round_robin"
    summary = bench("replay", "--trace", "azure-conv", "--cluster", "H100:1,T4:1", "--load", "0.6",
                    "--policies", "dio", "--peers", peer, "--max-requests", "20", "--time-scale", "20",
                    "--drain-wall-s", "10", "--name", "peers-smoke")
    assert set(summary["policies"]) == {"dio", peer}
    assert RUN_KEYS <= set(summary["policies"][peer]["0.6"])
    data = _saved(bench.out, "peers-smoke")
    assert data["peers"] == [peer]
    figures = data["runs"][peer]["0.6"]
    _adds_up(figures)
    assert figures["submitted"] == 20 and figures["completed"] == 20 and figures["failed"] == 0
    assert figures["p99_ms"] > 0 and figures["ttft_p50_ms"] > 0 and figures["slo_attainment"] is not None
    assert sum(w["jobs"] for w in figures["workers"].values()) == 20  # read back from each sim-server's /metrics
    assert set(figures["gpu_share"]) == {"H100", "T4"}  # round-robin: both GPUs served
    assert data["headline"]["0.6"]["best_peer"]["policy"] == peer
    assert peer in data["cdf_at_top_load"] and (bench.out / "peers-smoke.png").stat().st_size > 0


def test_replay_refuses_an_unknown_peer() -> None:
    result = CliRunner().invoke(app, ["bench", "replay", "--trace", "azure-conv", "--cluster", "H100:1",
                                      "--policies", "dio", "--peers", "vllm-router:power_of_two"])
    assert result.exit_code == 2 and "at least 2 GPUs" in result.output
    result = CliRunner().invoke(app, ["bench", "replay", "--trace", "azure-conv", "--peers", "nginx:round_robin"])
    assert result.exit_code == 2 and "unknown peer" in result.output


def test_overload(bench) -> None:
    summary = bench("overload", "--cluster", "H100:1", "--load", "1", "2", "--duration-s", "2",
                    "--policies", "dio", "--time-scale", "20", "--drain-wall-s", "10")
    assert set(summary["policies"]["dio"]) == {"1", "2"}
    assert set(summary["overload_headline"]["dio"]["goodput_kept"]) == {"1", "2"}
    data = _saved(bench.out, "overload-azure-conv")
    assert data["deadlines_sent"] is True
    for figures in data["runs"]["dio"].values():
        _adds_up(figures)
        assert figures["rejected_with_retry_after"] <= figures["rejected"]


def test_convergence(bench) -> None:
    summary = bench("convergence", "--gpus", "H100,T4", "--completions", "20", "--repeats", "2",
                    "--cluster", "H100:1,T4:1", "--requests", "300", "--token-repeats", "1", "--window", "5",
                    "--windows", "2")
    assert set(summary["predictors"]) == {"seed", "vector", "rls", "vector+prior"}
    for entry in summary["predictors"].values():
        assert set(entry["completions_to_50ms"]) == {"cold", "drift"}
    data = _saved(bench.out, "convergence")
    assert len(data["curves"]["vector"]["H100"]["cold"]["median_ms"]) > 0
    assert (bench.out / "convergence.png").exists()
    assert set(summary["tokens"]["variants"]) == {"prior", "no-prior"}
    data = _saved(bench.out, "convergence-tokens")
    assert set(data["workers"]["prior"]) == {"H100-1", "T4-1"}
    assert (bench.out / "convergence-tokens.png").exists()


def test_decision(bench) -> None:
    summary = bench("decision", "--workers", "1,8", "--policies", "dio,round-robin", "--e2e-policies", "dio",
                    "--batch", "50", "--e2e-requests", "300")
    assert set(summary["workers"]) == {"1", "8"}
    for figures in summary["workers"].values():
        assert figures["score_us"] > 0 and figures["e2e_decisions_per_s"] > 0
        assert figures["e2e_handed_off"] == 300
    assert "e2e_decisions_per_s" not in _saved(bench.out, "decision")["by_policy"]["round-robin"]["8"]


def test_pipeline(bench) -> None:
    summary = bench("pipeline", "--requests", "300", "--half-load-s", "1", "--rq-requests", "20",
                    "--xadd-requests", "2000", "--low-rates", "50")
    assert summary["completed"] == 300 and summary["rq_finished"] == 20
    assert summary["dio_rps"] > 0 and summary["rq_rps"] > 0 and summary["added_p50_ms"] > 0
    assert summary["dio_over_rq"] == pytest.approx(summary["dio_rps"] / summary["rq_rps"], rel=0.01)
    assert "stages_p50_ms" in _saved(bench.out, "pipeline")
