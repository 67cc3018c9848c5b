"""TTFT/TPOT predictors, learned output lengths, and DIO's SLO-headroom scoring (pure, no Redis)."""

from __future__ import annotations

import numpy as np
import pytest

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policies import make_policy
from dio.dispatcher.policy import Ask
from dio.dispatcher.prior import token_priors
from dio.dispatcher.scorers import INFEASIBLE_MS, SloHeadroom
from dio.dispatcher.token_latency import LinearBank, OutputLengths, TokenLatency
from dio.gpu_worker.sim.engine import SimEngine
from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.models import Request, WorkerTelemetry


def test_linear_bank_learns_a_linear_cost_within_a_few_percent() -> None:
    bank = LinearBank(3)
    bank.add_row()
    truth = np.array([40.0, 300.0, 12.0])  # ms per 1k prompt tokens, per 10k backlog, fixed
    rng = np.random.default_rng(0)
    for _ in range(300):
        x = np.array([rng.uniform(0.1, 8.0), rng.uniform(0.0, 2.0), 1.0])
        bank.learn(0, x, float(truth @ x))
    x = np.array([[2.0, 0.5, 1.0]])
    assert bank.predict(x)[0] == pytest.approx(float(truth @ x[0]), rel=0.05)


def test_token_latency_learns_ttft_and_tpot_from_completions() -> None:
    tokens = TokenLatency()
    tokens.add_row()
    for i in range(200):
        prompt, output, load = 500 + 37 * (i % 50), 50 + i % 100, 0.1 * (i % 7)
        ttft = 20.0 + 30.0 * prompt / 1000.0
        tpot = 8.0 * (1.0 + load)
        tokens.learn(0, prompt, output, ttft, ttft + tpot * (output - 1), load, 0.0, 0.0)
    assert tokens.predict_ttft(np.array([2000.0]), np.array([0.0]))[0] == pytest.approx(80.0, rel=0.1)
    assert tokens.predict_tpot(np.array([0.5]), np.array([0.0]))[0] == pytest.approx(12.0, rel=0.1)
    assert tokens.tpot_per_load()[0] == pytest.approx(8.0, rel=0.25)


@pytest.mark.parametrize(
    "outputs, q, expected",
    [
        ([], 0.9, 1.0),  # nothing seen yet: plan for the whole max_tokens
        ([10] * 19, 0.9, 1.0),  # still fewer than MIN_SAMPLES
        (list(range(1, 101)), 0.5, 0.51),  # outputs of 1..100 out of 100
        (list(range(1, 101)), 0.9, 0.91),
    ],
)
def test_output_lengths_quantiles(outputs: list[int], q: float, expected: float) -> None:
    lengths = OutputLengths()
    for out in outputs:
        lengths.learn(out, 100)
    assert lengths.quantile(q) == pytest.approx(expected)
    assert lengths.expected(512, q) == int(np.ceil(expected * 512))


def _sim_cluster(*profiles: str) -> Cluster:
    cluster = Cluster()
    for i, profile in enumerate(profiles):
        engine = SimEngine(profile, DEFAULT_MODEL)
        row = cluster.upsert(engine.capacity().worker_info(f"{profile}-{i}", engine.name))
        cluster.set_telemetry(row, WorkerTelemetry(), alive=True)
    return cluster


def test_every_simulated_gpu_starts_with_ttft_and_tpot_priors_in_the_right_order() -> None:
    cluster = _sim_cluster("H100", "T4")
    assert cluster.tokens.warm.all() and token_priors(cluster.infos[0]) is not None
    ttft = cluster.tokens.predict_ttft(np.array([2000.0, 2000.0]), np.zeros(2))
    tpot = cluster.tokens.predict_tpot(np.zeros(2), np.zeros(2))
    assert ttft[0] < ttft[1] / 5 and tpot[0] < tpot[1] / 3  # the H100 is many times faster than the T4


def _ask(cluster: Cluster, ttft_ms: float, tpot_ms: float, prompt: int = 2000) -> Ask:
    request = Request(id="r", model=DEFAULT_MODEL, prompt="x", num_prompt_tokens=prompt, max_tokens=256,
                      ttft_slo_ms=ttft_ms, tpot_slo_ms=tpot_ms, submitted_at=1000.0)
    return Ask(request, cluster, now=1000.0)


def test_slo_headroom_best_fit_picks_the_slowest_gpu_that_meets_the_slo() -> None:
    cluster = _sim_cluster("H100", "A100-40GB", "T4")
    rows = np.arange(3)
    relaxed = _ask(cluster, ttft_ms=20_000.0, tpot_ms=500.0)  # every GPU meets it
    best = SloHeadroom(fit="best").cost(relaxed, cluster, rows, 1000.0)
    most = SloHeadroom(fit="most-headroom").cost(relaxed, cluster, rows, 1000.0)
    assert int(np.argmin(best)) == 2  # T4: the fast GPUs stay free for requests only they can serve
    assert int(np.argmin(most)) == 0  # H100: the most headroom
    tight = _ask(cluster, ttft_ms=20_000.0, tpot_ms=0.001)  # nobody meets it: every worker pays the miss
    assert (SloHeadroom().cost(tight, cluster, rows, 1000.0) >= INFEASIBLE_MS).all()


def test_dio_routes_an_slo_request_where_it_meets_both_limits() -> None:
    cluster = _sim_cluster("H100", "T4")
    ttft = cluster.tokens.predict_ttft(np.array([2000.0, 2000.0]), np.zeros(2))
    # A TTFT limit only the H100 meets (T4's prefill of 2,000 tokens is far slower).
    ask_ttft = float(ttft[0] * 3)
    assert ttft[1] > ask_ttft
    request = Request(id="r", model=DEFAULT_MODEL, prompt="x", num_prompt_tokens=2000, max_tokens=256,
                      ttft_slo_ms=ask_ttft, tpot_slo_ms=1000.0, submitted_at=1000.0)
    decision = make_policy("dio", seed=0).decide(request, cluster, now=1000.0)
    assert decision.row == 0
    # Its TPOT limit sets a load ceiling on the H100 (the load at which its TPOT would reach the limit).
    assert np.isfinite(decision.ceiling) and decision.ceiling > 0


def test_dio_reserves_kv_for_the_outputs_requests_really_produce() -> None:
    cluster = _sim_cluster("H100")
    policy = make_policy("dio", seed=0)
    request = Request(id="r", model=DEFAULT_MODEL, prompt="x", num_prompt_tokens=1000, max_tokens=1024)
    assert policy.decide(request, cluster, now=0.0).kv_tokens == 1000 + 1024  # nothing learned: the cap
    for i in range(50):
        cluster.outputs_of(DEFAULT_MODEL).learn(100 + i, 1024)
    assert policy.decide(request, cluster, now=0.0).kv_tokens == 1000 + int(np.ceil(1024 * 145 / 1024))
    assert make_policy("least-loaded").decide(request, cluster, now=0.0).kv_tokens == 1000 + 1024


def test_a_sheddable_request_that_cannot_meet_its_slo_anywhere_is_rejected_and_others_are_routed() -> None:
    cluster = _sim_cluster("H100", "T4")
    fields = dict(model=DEFAULT_MODEL, prompt="x", num_prompt_tokens=4000, max_tokens=256, ttft_slo_ms=1.0,
                  tpot_slo_ms=100.0, submitted_at=1000.0)
    hopeless = Request(id="shed-me", sheddable=True, **fields)
    decision = make_policy("dio", seed=0).decide(hopeless, cluster, now=1000.0)
    assert decision.reject and "cannot meet its SLO" in (decision.reason or "") and decision.retry_after_s
    served = make_policy("dio", seed=0).decide(Request(id="serve-me", **fields), cluster, now=1000.0)
    assert served.row is not None  # not sheddable: routed, late
