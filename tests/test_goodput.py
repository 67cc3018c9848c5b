"""``dio bench goodput``: the SLO check, presets, the max_tokens cap, the rate search, feasibility, a CLI run.

The pure pieces are table-driven; the virtual cluster's new counters (KV-admission holds,
preemptions, a cap with the true length inside the engine) run on one simulated T4; the CLI runs
two policies on a two-GPU cluster for a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dio.dispatcher.config import DispatcherSettings
from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.ops.bench import goodput as g
from dio.ops.bench.peers import as_outcomes, peer_command, replay_http, request_body, start_sim_servers, stop_processes
from dio.ops.bench.sim_server import EOS_FIELD, ServerSpec, start_servers
from dio.ops.bench.summary import render
from dio.ops.bench.virtual import VirtualCluster
from dio.ops.cli import app
from dio.ops.openloop import LOST, Outcome
from dio.ops.slo import PRESETS
from dio.ops.traces import TraceRequest

MODEL = "llama-3.2-3b"
CHAT = PRESETS["chat"]  # TTFT 2000 ms, TPOT 100 ms


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
    assert {name for name, slo in PRESETS.items() if not slo.standard} == {"interactive"}
    assert all(slo.source for slo in PRESETS.values())


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


# --- peers: the cap over HTTP, the true length to the sim-server only, attainment as for DIO ----------


def test_a_peer_request_carries_the_cap_and_the_true_length_only_in_the_simulation_field() -> None:
    request = TraceRequest(0.0, 12, 40)
    capped = request_body(request, 0, MODEL, max_tokens=1024)
    assert (capped["max_tokens"], capped["ignore_eos"], capped[EOS_FIELD]) == (1024, False, 40)
    oracle = request_body(request, 0, MODEL)  # dio bench replay: the true length as max_tokens
    assert (oracle["max_tokens"], oracle["ignore_eos"]) == (40, True) and EOS_FIELD not in oracle


async def _complete(url: str, body: dict) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(f"{url}/v1/completions", json=body) as response:
        return response.status, await response.json()


async def test_the_sim_server_stops_at_dio_eos_tokens_and_counts_load_polls() -> None:
    runners = await start_servers([ServerSpec(SimEngine("H100", MODEL, time_scale=50.0), 0)])
    url = f"http://127.0.0.1:{runners[0].addresses[0][1]}"
    base = {"model": MODEL, "prompt": "x" * 40, "max_tokens": 64}
    try:
        answers = [await _complete(url, base | extra) for extra in (
            {EOS_FIELD: 5}, {EOS_FIELD: 500}, {EOS_FIELD: 5, "ignore_eos": True}, {}, {EOS_FIELD: 0})]
        import aiohttp

        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{url}/get_load") as response:
                    assert response.status == 200
            async with session.get(f"{url}/metrics") as response:
                metrics = await response.text()
    finally:
        for runner in runners:
            await runner.cleanup()
    tokens = [body["usage"]["completion_tokens"] if status == 200 else status for status, body in answers]
    assert tokens == [5, 64, 64, 64, 400]  # EOS; the cap caps it; ignore_eos overrides it; none; not positive
    assert 'dio_sim:get_load_requests_total{engine="0",model_name="llama-3.2-3b"} 3.0' in metrics


def test_peer_attainment_over_http_uses_the_cap_the_true_lengths_and_the_same_slo() -> None:
    # Straight to a sim-server (no router): the client's TTFT and output tokens give TPOT as for DIO.
    trace = [TraceRequest(0.05 * i, 300, 3 + i) for i in range(6)]
    servers = start_sim_servers("H100:1", MODEL, 20.0)
    try:
        records = asyncio.run(replay_http(servers[0][0], trace, model=MODEL, time_scale=20.0, max_tokens=1024,
                                          drain_wall_s=10.0))
    finally:
        stop_processes([proc for _, proc in servers])
    outcomes = as_outcomes(records)
    assert [o.output_tokens for o in outcomes] == [3, 4, 5, 6, 7, 8]  # stopped at the true length, not the cap
    assert all(0 < o.ttft_ms <= o.latency_ms for o in outcomes)
    assert g.eos_honoured(outcomes, trace, 1024) == 1.0
    assert g.attainment(outcomes, CHAT) == 1.0 and g.attainment(outcomes, g.Slo("x", 0.001, 100.0)) == 0.0


def _result(policy: str, seed: int, rate: float, att: float, **figures: object) -> g.RunResult:
    base = {"attainment": att, "completed": 10, "rejected": 0, "failed": 1, "lost": 2, "preemptions": None,
            "time_scale": 1.0, "load_poll_staleness_s": None, "eos_honoured": 1.0}
    return g.RunResult(policy, seed, rate, base | figures, {})


def test_a_peer_summary_gives_attainment_per_rate_and_the_goodput_on_that_grid() -> None:
    peer = "vllm-router:round_robin"
    results = {(peer, s, r): _result(peer, s, r, a) for s, r, a in
               [(0, 8.0, 0.95), (0, 10.0, 0.85), (1, 8.0, 0.91), (1, 10.0, 0.93)]}
    results[("other:x", 0, 8.0)] = _result("other:x", 0, 8.0, 0.1)
    summary = g.peer_summary(peer, [0, 1], [8.0, 10.0], results, capacity=20.0)
    assert summary["attainment_at"] == {"8": 0.93, "10": 0.89}
    assert summary["attainment_at_seeds"] == {"8": {"0": 0.95, "1": 0.91}, "10": {"0": 0.85, "1": 0.93}}
    assert summary["goodput_rps_seeds"] == [8.0, 10.0] and summary["goodput_lower_bound"] is True
    assert summary["failed_at"] == {"8": 1, "10": 1} and summary["lost_at"] == {"8": 2, "10": 2}
    assert summary["time_scale"] == 1.0 and summary["eos_honoured"] == 1.0 and "preemptions" not in summary
    assert set(summary["runs"]) == {"8", "10"} and set(summary["runs"]["8"]) == {"0", "1"}


def test_peers_run_at_given_rates_or_around_dios_median_goodput() -> None:
    searches = {("dio", s): g.RateSearch(1.0, tried={40.0: True, 50.0: s < 2, 60.0: False}) for s in range(3)}
    searches |= {("queue-kv", s): g.RateSearch(1.0, tried={70.0: True, 80.0: False}) for s in range(3)}
    config = g.GoodputConfig(trace="azure-conv", policies=["dio", "queue-kv"])
    rates, rule = g.peer_rates(config, searches, [0, 1, 2], fallback=5.0)
    assert rates == [40.0, 50.0] and "dio's median virtual goodput (50 req/s)" in rule  # 0.8x and 1.0x of 50
    rates, _ = g.peer_rates(g.GoodputConfig(trace="azure-conv", policies=["queue-kv"]), searches, [0], 5.0)
    assert rates == [56.0, 70.0]  # no dio: the best policy's
    assert g.peer_rates(g.GoodputConfig(trace="azure-conv", rates=[9, 3]), searches, [0], 5.0) == ([3.0, 9.0],
                                                                                                   "--rates")


def test_peer_time_scale_is_real_time_unless_the_arrivals_take_too_long() -> None:
    config = g.GoodputConfig(trace="azure-conv")
    short = [TraceRequest(float(i), 10, 10) for i in range(60)]  # 59 s of arrivals
    long = [TraceRequest(10.0 * i, 10, 10) for i in range(100)]  # 990 s
    assert g.peer_time_scale(config, short, CHAT) == 1.0
    assert g.peer_time_scale(config, long, CHAT) == 8.0  # ~990 / 120, rounded down to a nice step
    assert g.peer_time_scale(config, long, PRESETS["interactive"]) == 5.0  # bounded as DIO's full runs
    assert g.peer_time_scale(g.GoodputConfig(trace="azure-conv", peer_time_scale=3.0), short, CHAT) == 3.0


def test_full_against_virtual_confirms_within_ten_percent_and_the_same_verdict() -> None:
    full = {("dio", 0, 10.0): _result("dio", 0, 10.0, 0.93), ("dio", 0, 12.0): _result("dio", 0, 12.0, 0.88),
            ("wlc", 0, 10.0): _result("wlc", 0, 10.0, 0.5)}
    virtual = {("dio", 0, 10.0): _result("dio", 0, 10.0, 0.95), ("dio", 0, 12.0): _result("dio", 0, 12.0, 0.91),
               ("wlc", 0, 10.0): _result("wlc", 0, 10.0, 0.6)}
    out = g.full_vs_virtual(full, virtual)
    assert out["dio"]["full_vs_virtual"]["10"]["0"] == {"full": 0.93, "virtual": 0.95, "diff": -0.02, "confirms": True}
    assert out["dio"]["full_vs_virtual"]["12"]["0"]["confirms"] is False  # within 10%, but it fails the 90% target
    assert out["dio"]["virtual_attainment_at"] == {"10": 0.95, "12": 0.91} and not out["dio"]["full_confirms_virtual"]
    assert out["wlc"]["full_vs_virtual"]["10"]["0"]["confirms"] is False  # 0.5 against 0.6: more than 10% apart


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


def test_goodput_refuses_unknown_peers_and_policies(tmp_path: Path) -> None:
    for extra, message in ((["--peers", "nginx:round_robin"], "unknown peer"),
                           (["--peers", "sglang-router:kv_aware"], "no policy"),
                           (["--cluster", "H100:1", "--peers", "vllm-router:power_of_two"], "at least 2 GPUs"),
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


def _router_runs(name: str) -> bool:
    launcher = peer_command(name, "round_robin", ["http://127.0.0.1:1", "http://127.0.0.1:2"], 1)
    launcher = launcher[: launcher.index("--worker-urls")]
    try:
        return subprocess.run([*launcher, "--help"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_goodput_measures_a_peer_router_over_http_at_the_given_rates(tmp_path: Path) -> None:
    if not _router_runs("vllm-router"):
        pytest.skip("vllm-router cannot run here")
    summary = _goodput(tmp_path, "--trace", "azure-conv", "--cluster", "H100:1,T4:1", "--policies", "dio",
                       "--peers", "vllm-router:round_robin", "--seeds", "1", "--max-requests", "20", "--rates", "4",
                       "--jobs", "1", "--peer-time-scale", "2", "--drain-wall-s", "5")
    assert set(summary["peers"]["vllm-router:round_robin"]["attainment_at"]) == {"4"}
    data = json.loads((tmp_path / "goodput-azure-conv-chat.json").read_text())
    peer = data["peers"]["vllm-router:round_robin"]
    run = peer["runs"]["4"]["0"]
    assert run["submitted"] == 20 and run["completed"] == 20 and run["time_scale"] == 2.0
    assert run["eos_honoured"] == 1.0  # the router forwarded dio_eos_tokens; the sim-servers stopped there
    assert sum(w["jobs"] for w in run["workers"].values()) == 20 and set(run["gpu_share"]) == {"H100", "T4"}
    assert data["peer_rates"] == [4.0] and data["runs"]["dio"]["4"]["0"]["submitted"] == 20
    records = g.load_records(tmp_path / data["records_file"])
    cols = records["runs"][("vllm-router:round_robin", 0, 4.0)]
    outcomes = g.outcomes_of(cols, records["header"]["workers"])
    assert g.attainment(outcomes, CHAT) == pytest.approx(run["attainment"], abs=1e-4)
    trace = records["windows"][0]
    assert [o.output_tokens for o in outcomes] == [min(t, 1024) for t in trace["output_tokens"]]
