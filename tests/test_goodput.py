"""``dio bench goodput``: the SLO check, presets, the max_tokens cap, the rate search, feasibility, a CLI run.

The pure pieces are table-driven; the virtual cluster's new counters (KV-admission holds,
preemptions, a cap with the true length inside the engine) run on one simulated T4; the CLI runs
two policies on a two-GPU cluster for a few seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dio.dispatcher.config import DispatcherSettings
from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.ops.bench import goodput as g
from dio.ops.bench.summary import render
from dio.ops.bench.virtual import VirtualCluster
from dio.ops.cli import app
from dio.ops.openloop import LOST, Outcome
from dio.ops.traces import TraceRequest

MODEL = "llama-3.2-3b"
CHAT = g.PRESETS["chat"]  # TTFT 2000 ms, TPOT 100 ms


def done(ttft: float, tpot: float, tokens: int) -> Outcome:
    """A completed request with this TTFT and mean TPOT (simulated ms)."""
    return Outcome("completed", "w", latency_ms=ttft + tpot * (tokens - 1), ttft_ms=ttft, output_tokens=tokens)


@pytest.mark.parametrize(
    ("outcome", "met"),
    [
        (done(1000, 50, 100), True),
        (done(2000, 100, 100), True),  # both exactly at their limit
        (done(2001, 50, 100), False),  # first token late
        (done(500, 101, 100), False),  # tokens too slow on average
        (done(1500, 0, 1), True),  # one token: no TPOT, any TPOT limit is met
        (done(2500, 0, 1), False),
        (Outcome("rejected", reason="overloaded"), False),  # every end but completed misses
        (Outcome("failed", "w", reason="KV cache exhausted"), False),
        (Outcome("cancelled"), False),
        (Outcome(LOST), False),
        (Outcome("completed", "w", latency_ms=900.0, ttft_ms=None, output_tokens=5), False),  # no first token seen
    ],
)
def test_a_request_meets_its_slo_when_ttft_and_tpot_are_within_their_limits(outcome: Outcome, met: bool) -> None:
    assert g.meets_slo(outcome, CHAT) is met


def test_attainment_counts_every_request_and_tpot_excludes_the_first_token() -> None:
    outcomes = [done(100, 10, 11), done(3000, 10, 11), Outcome("rejected"), Outcome(LOST)]
    assert g.attainment(outcomes, CHAT) == 0.25
    assert g.tpot_ms(done(100, 10, 11)) == pytest.approx(10.0)  # (latency - ttft) / (output - 1)
    assert g.tpot_ms(done(100, 0, 1)) is None and g.tpot_ms(Outcome("rejected")) is None
    assert g.attainment([], CHAT) == 0.0


@pytest.mark.parametrize(
    ("text", "trace", "name", "ttft", "tpot"),
    [
        (None, "azure-conv", "chat", 2000, 100),  # the trace's preset
        (None, "azure-code", "chat", 2000, 100),
        (None, "arxiv", "summarization", 15000, 150),
        (None, "mooncake", "long-context", 30000, 100),
        ("interactive", "arxiv", "interactive", 500, 30),  # a preset by name, whatever the trace
        ("1500:75", "azure-conv", "1500:75", 1500, 75),
        (" 250.5:20 ", "azure-conv", "250.5:20", 250.5, 20),
    ],
)
def test_parse_slo(text: str | None, trace: str, name: str, ttft: float, tpot: float) -> None:
    slo = g.parse_slo(text, trace)
    assert (slo.name, slo.ttft_ms, slo.tpot_ms) == (name, ttft, tpot)


@pytest.mark.parametrize("text", ["fast", "2000", "0:100", "2000:-1", "a:b", "2000:100:5", "1e20:1"])
def test_parse_slo_refuses_what_is_not_a_preset_or_two_positive_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="--slo"):
        g.parse_slo(text, "azure-conv")


def test_presets_have_sources_and_only_interactive_is_exempt_from_feasibility() -> None:
    assert {name for name, slo in g.PRESETS.items() if not slo.standard} == {"interactive"}
    assert all(slo.source for slo in g.PRESETS.values())


def test_a_mooncake_format_file_gets_the_long_context_preset(tmp_path: Path) -> None:
    path = tmp_path / "kimi.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 100, "output_length": 5}\n')
    assert g.default_preset(str(path)) == "long-context"


@pytest.mark.parametrize(
    ("outputs", "cap"),
    [
        ([10] * 100, 256),  # never below 256
        ([300] * 100, 512),  # the power of two at or above the p99
        ([512] * 100, 512),  # exactly a power of two
        ([513] * 100, 1024),
        (list(range(1, 1001)), 1024),  # p99 = 990.01
        ([100] * 980 + [3000] * 20, 4096),  # 2% of long outputs: the p99 is one of them
        ([100] * 995 + [3000] * 5, 256),  # 0.5%: the cap ignores them (they are cut at 256)
        ([200_000] * 10, 65_536),  # never above the largest max_tokens a request may carry
    ],
)
def test_max_tokens_cap_is_the_power_of_two_at_or_above_the_p99_output(outputs: list[int], cap: int) -> None:
    assert g.max_tokens_cap(outputs) == cap


def test_parse_max_tokens() -> None:
    outputs = [300] * 100
    assert g.parse_max_tokens("auto", outputs) == 512
    assert g.parse_max_tokens("oracle", outputs) is None  # each request's true length
    assert g.parse_max_tokens(" 128 ", outputs) == 128
    for bad in ("0", "-5", "lots", "100000"):
        with pytest.raises(ValueError, match="--max-tokens"):
            g.parse_max_tokens(bad, outputs)


# --- the rate search ----------------------------------------------------------------------------


def knee_evaluator(knees: dict[str, float], calls: list[list[tuple[str, float]]]):
    """Attainment 1.0 up to each key's knee, 0.5 past it; records every batch asked for."""
    def evaluate(points: list[tuple[str, float]]) -> list[float]:
        calls.append(points)
        return [1.0 if rate <= knees[key] else 0.5 for key, rate in points]
    return evaluate


def test_the_search_locates_each_goodput_within_the_tolerance_below_its_knee() -> None:
    knees = {"fast": 37.3, "slow": 6.1, "tiny": 0.4, "huge": 1e9}
    calls: list[list[tuple[str, float]]] = []
    searches = g.locate_goodput(knee_evaluator(knees, calls), list(knees), start=2.0, ceiling=90.0)
    for key in ("fast", "slow", "tiny"):
        lo, hi = searches[key].bracket()
        assert lo is not None and hi is not None
        assert lo <= knees[key] < hi <= lo * (1 + g.RATE_TOLERANCE) * 1.001  # within 2% (rates have 4 digits)
        assert searches[key].goodput == lo
    # "tiny" failed at the start rate: the search went down (÷1.5 steps) before bisecting.
    assert min(searches["tiny"].tried) < 2.0
    # "huge" never failed up to the ceiling: its goodput is the ceiling, and only a lower bound.
    assert searches["huge"].goodput == 90.0 and searches["huge"].bracket()[1] is None
    # The sweep is shared: every key ran every swept rate until all had failed once (here: the ceiling).
    swept = g.sweep_rates(2.0, 90.0)
    assert swept[0] == 2.0 and swept[-1] == 90.0
    assert all(b / a <= 1.5 * 1.001 for a, b in zip(swept, swept[1:], strict=False))
    for rate in swept:
        assert all(rate in searches[k].tried for k in knees)


def test_goodput_counts_only_rates_below_the_first_failure() -> None:
    search = g.RateSearch(start=1.0, tried={1.0: True, 1.5: False, 2.25: True, 3.375: False})
    assert search.bracket() == (1.0, 1.5)  # 2.25 passed, but a lower rate (1.5) failed
    assert search.goodput == 1.0
    assert search.next_rate() == g.round_rate(math.sqrt(1.5))  # bisect between 1.0 and 1.5


def test_the_search_stops_going_down_after_a_few_steps() -> None:
    searches = g.locate_goodput(lambda points: [0.0] * len(points), ["never"], start=10.0, ceiling=100.0)
    search = searches["never"]
    assert search.goodput == 0.0 and search.bracket() == (None, min(search.tried))
    assert min(search.tried) == pytest.approx(10.0 / 1.5 ** g.DOWN_STEPS, rel=1e-3)


def test_sweep_rates_when_the_start_is_above_the_ceiling() -> None:
    assert g.sweep_rates(50.0, 30.0) == [50.0]


# --- feasibility --------------------------------------------------------------------------------


def test_alone_matches_the_roofline_of_one_request_on_an_idle_gpu() -> None:
    gpu, model = get_profile("T4"), get_model(MODEL)
    ttft, tpot = g.alone("T4", MODEL, 1200, 200, cap=1024)  # stops at 200 of its 1,024 cap
    assert ttft == pytest.approx(1000 * roofline.prefill_time_s(gpu, model, 1200), rel=1e-9)
    assert tpot == pytest.approx(1000 * roofline.decode_steps_time_s(gpu, model, 1, 1201, 199) / 199, rel=1e-9)


def test_feasibility_per_gpu_type_counts_only_the_requests_that_fit_it() -> None:
    trace = [TraceRequest(0.0, 1000, 100), TraceRequest(0.0, 2000, 50), TraceRequest(0.0, 70_000, 20)]
    table = g.feasibility("H100:2,T4:1", MODEL, trace, cap=1024, slo=CHAT)
    assert list(table) == ["H100", "T4"]  # one row per GPU type
    assert table["H100"]["fit"] == 3 and table["T4"]["fit"] == 2  # 70,000 + 1,024 > the T4's 59,344 tokens
    assert table["H100"]["profile"] == "H100-80GB"
    # The 70,000-token prompt takes more than 2 s to prefill even alone on the H100.
    assert table["H100"]["ttft_p99_ms"] > 2000 and table["H100"]["meets_both"] == pytest.approx(2 / 3, abs=1e-4)
    assert table["H100"]["feasible"] is False
    assert table["T4"]["meets_both"] == 1.0 and table["T4"]["feasible"] is True
    tight = g.feasibility("T4:1", MODEL, trace, cap=1024, slo=g.Slo("tight", 10.0, 1.0))
    assert tight["T4"]["meets_both"] == 0.0 and tight["T4"]["feasible"] is False


# --- the virtual cluster's cap, holds and counters ----------------------------------------------


def test_virtual_run_sends_the_cap_and_stops_each_request_at_its_true_length() -> None:
    # Five 8,000-token prompts at once on one T4 (59,344 KV tokens): dio reserves prompt + cap
    # (24,384 tokens) per request, so only two fit at a time and the others wait for KV.
    trace = [TraceRequest(0.001 * i, 8000, 30 + i) for i in range(5)]
    virtual = VirtualCluster("T4:1", MODEL, DispatcherSettings(policy="dio", seed=0))
    outcomes = virtual.run(trace, max_tokens=16_384, ttft_slo_ms=2000.0, tpot_slo_ms=100.0)
    assert [o.status for o in outcomes] == ["completed"] * 5
    assert [o.output_tokens for o in outcomes] == [30, 31, 32, 33, 34]  # stopped at EOS, not at the cap
    counters = virtual.counters
    assert sum(counters.kv_held) >= 1 and counters.kv_hold_decisions >= sum(counters.kv_held)
    assert counters.preemptions == [0] * 5 and counters.gpu_preemptions == [0]
    assert 0.0 < counters.kv_used[0] < counters.kv_reserved[0] <= 1.0  # reserved for the cap, used far less


def test_virtual_run_without_a_cap_is_the_oracle() -> None:
    trace = [TraceRequest(0.0, 500, 40), TraceRequest(0.0, 500, 7)]
    virtual = VirtualCluster("H100:1", MODEL, DispatcherSettings(policy="round-robin", seed=0))
    outcomes = virtual.run(trace)
    assert [o.output_tokens for o in outcomes] == [40, 7]
    assert virtual.counters.kv_held == [False, False]  # round-robin has no KV admission to hold anything


def test_records_round_trip_to_the_same_figures() -> None:
    outcomes = [done(100, 10, 11), Outcome("rejected", reason="x"), done(3000, 5, 3), Outcome(LOST)]
    cols = g.columns(outcomes, ["w"], [0, 0, 2, 0], [False, True, False, False])
    again = g.outcomes_of(cols, ["w"])
    assert g.attainment(again, CHAT) == g.attainment(outcomes, CHAT) == 0.25
    assert [o.status for o in again] == ["completed", "rejected", "completed", "lost"]
    figures = g.run_figures(outcomes, CHAT, [0, 0, 2, 0], [False, True, False, False])
    assert (figures["preemptions"], figures["kv_held"], figures["rejected"], figures["lost"]) == (2, 1, 1, 1)


# --- the command ----------------------------------------------------------------------------------


def _goodput(tmp_path: Path, *args: str) -> dict:
    result = CliRunner().invoke(app, ["bench", "goodput", *args, "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_goodput_command_searches_every_policy_and_saves_records(tmp_path: Path) -> None:
    summary = _goodput(tmp_path, "--trace", "azure-conv", "--cluster", "H100:1,T4:1", "--policies",
                       "dio,round-robin", "--seeds", "2", "--max-requests", "200")
    assert {"trace", "slo", "capacity_rps", "feasibility", "policies"} <= set(summary)
    assert summary["slo"] == {"name": "chat", "ttft_ms": 2000.0, "tpot_ms": 100.0}
    assert set(summary["feasibility"]) == {"H100", "T4"} and summary["max_tokens"] == 1024
    assert set(summary["policies"]) == {"dio", "round-robin"}
    for figures in summary["policies"].values():
        assert {"goodput_rps", "goodput_rps_seeds", "attainment_at", "preemptions",
                "rejected_below_goodput"} <= set(figures)
        assert len(figures["goodput_rps_seeds"]) == 2
        passing = [float(r) for r, a in figures["attainment_at"].items() if a >= 0.9]
        assert figures["goodput_rps"] == 0 or passing
    data = json.loads((tmp_path / "goodput-azure-conv-chat.json").read_text())
    assert data["benchmark"] == "goodput" and data["command"] and data["machine"]["git"]
    assert (tmp_path / "goodput-azure-conv-chat.png").stat().st_size > 0
    # Every run's per-request records are saved: any figure recomputes from them.
    records = g.load_records(tmp_path / data["records_file"])
    workers = records["header"]["workers"]
    assert set(records["windows"]) == {0, 1} and len(records["windows"][0]["prompt_tokens"]) == 200
    slo = g.Slo("chat", 2000.0, 100.0)
    for (policy, seed, rate), cols in records["runs"].items():
        run = data["runs"][policy][g.rate_key(rate)][str(seed)]
        assert g.attainment(g.outcomes_of(cols, workers), slo) == pytest.approx(run["attainment"], abs=1e-4)
        assert sum(run[k] for k in ("completed", "rejected", "failed", "cancelled", "lost")) == 200
    assert "| round-robin |" in render(tmp_path)  # dio bench summary shows it


@pytest.mark.slow
def test_goodput_command_at_given_rates_with_the_oracle(tmp_path: Path) -> None:
    summary = _goodput(tmp_path, "--trace", "arxiv", "--cluster", "H100:1", "--policies", "least-loaded",
                       "--seeds", "1", "--max-requests", "100", "--rates", "0.5,2", "--max-tokens", "oracle",
                       "--slo", "interactive", "--jobs", "1")
    assert summary["max_tokens"] == "oracle" and summary["slo"]["name"] == "interactive"
    assert set(summary["policies"]["least-loaded"]["attainment_at"]) == {"0.5", "2"}
    assert (tmp_path / "goodput-arxiv-interactive-oracle.json").exists()


def test_goodput_refuses_peers_and_unknown_policies(tmp_path: Path) -> None:
    for extra, message in ((["--peers", "vllm-router:round_robin"], "not implemented with goodput"),
                           (["--policies", "telepathy"], "unknown policies"),
                           (["--slo", "soon"], "--slo")):
        result = CliRunner().invoke(app, ["bench", "goodput", "--trace", "azure-conv", "--out", str(tmp_path),
                                          *extra])
        assert result.exit_code == 2 and message in result.output


@pytest.mark.integration
@pytest.mark.slow
def test_goodput_full_runs_the_whole_system_with_the_cap(redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: Path) -> None:
    monkeypatch.setenv("DIO_REDIS_URL", redis_url)
    summary = _goodput(tmp_path, "--trace", "azure-conv", "--cluster", "H100:1", "--policies", "least-loaded",
                       "--seeds", "1", "--max-requests", "20", "--rates", "10", "--full", "--time-scale", "4")
    assert summary["mode"] == "full" and set(summary["policies"]["least-loaded"]["attainment_at"]) == {"10"}
    run = json.loads((tmp_path / "goodput-full-azure-conv-chat.json").read_text())["runs"]["least-loaded"]["10"]["0"]
    assert run["completed"] == 20 and run["time_scale"] == 4
    assert run["eos_honoured"] == 1.0  # the workers stopped each request at its true length, below the cap
