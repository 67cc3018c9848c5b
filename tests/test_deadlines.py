"""Deadline protection, the roofline prior and the prefill backlog (pure: no Redis)."""

import math

import numpy as np
import pytest

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.deadlines import NO_CEILING, load_ceiling, would_breach
from dio.dispatcher.policies import make_policy
from dio.dispatcher.predictors import VectorNLMS
from dio.dispatcher.prior import roofline_prior
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.sim.profiles import match_profile
from dio.gpu_worker.vllm_engine import read_model_config, weight_bytes
from dio.protocol.models import Request, WorkerInfo, WorkerTelemetry


def sim_info(worker_id: str, profile: str) -> WorkerInfo:
    """The WorkerInfo a simulated GPU registers (datasheet included)."""
    engine = SimEngine(profile, "llama-3.2-3b")
    return engine.capacity().worker_info(worker_id, engine.name)


def sim_cluster(*profiles: str) -> Cluster:
    cluster = Cluster()
    for i, profile in enumerate(profiles):
        row = cluster.upsert(sim_info(f"{profile}-{i}", profile))
        cluster.set_telemetry(row, WorkerTelemetry(), alive=True)
    return cluster


def ask(deadline_ms: float | None = None, prompt: int = 1000, max_tokens: int = 200, rid: str = "r",
        sheddable: bool = True) -> Request:
    return Request(id=rid, model="llama-3.2-3b", prompt="x", num_prompt_tokens=prompt, max_tokens=max_tokens,
                   submitted_at=1000.0, deadline_ms=deadline_ms, sheddable=sheddable)


def test_load_ceiling_is_the_load_where_slack_runs_out():
    assert load_ceiling(1.0, slack_ms=300.0, sensitivity_ms=100.0) == pytest.approx(4.0)
    assert load_ceiling(1.0, slack_ms=-5.0, sensitivity_ms=100.0) == NO_CEILING  # late anyway: nothing to protect
    assert load_ceiling(1.0, slack_ms=50.0, sensitivity_ms=0.0) == NO_CEILING  # no load term learned
    assert would_breach(np.array([1.0, 5.0]), np.array([2.0, 4.0])).tolist() == [False, True]


def test_cluster_keeps_the_lowest_ceiling_of_its_jobs():
    cluster = sim_cluster("H100")
    cluster.reserve(0, "a", 1000, ceiling=3.0, prompt_tokens=500)
    cluster.reserve(0, "b", 1000, ceiling=2.0, prompt_tokens=700)
    assert cluster.ceiling[0] == 2.0 and cluster.prompt_in_flight[0] == 1200
    held = cluster.release(0, "b")
    assert held is not None and held.prompt_tokens == 700
    assert cluster.ceiling[0] == 3.0 and cluster.prompt_in_flight[0] == 500
    cluster.release(0, "a")
    assert math.isinf(cluster.ceiling[0]) and cluster.outstanding[0] == 0


def test_a_request_goes_elsewhere_rather_than_make_a_job_late():
    """Two equal GPUs: the first job's tight deadline steers a second long job to the other GPU."""
    cluster = sim_cluster("H100", "H100")
    policy = make_policy("dio", seed=0)
    first = policy.decide(ask(deadline_ms=None, max_tokens=200, rid="first"), cluster, now=1000.0)
    cluster.reserve(first.row, "first", 1200, ceiling=cluster.load_with(1200)[first.row] + 0.01)
    second = policy.decide(ask(deadline_ms=None, prompt=20_000, max_tokens=2000, rid="second"), cluster, now=1000.0)
    assert second.row != first.row


def test_shed_late_rejects_with_a_retry_after_and_can_be_turned_off():
    cluster = sim_cluster("T4")
    hopeless = ask(deadline_ms=1.0, prompt=8000, max_tokens=500)
    decision = make_policy("dio", seed=0).decide(hopeless, cluster, now=1000.0)
    assert decision.reject and "deadline" in decision.reason and decision.retry_after_s > 0
    assert make_policy("dio", seed=0, shed_late=False).decide(hopeless, cluster, now=1000.0).row == 0


def test_only_a_sheddable_request_is_shed_on_a_prediction():
    cluster = sim_cluster("T4")
    policy = make_policy("dio", seed=0)
    assert policy.decide(ask(deadline_ms=1.0, prompt=8000, max_tokens=500), cluster, now=1000.0).reject
    kept = policy.decide(ask(deadline_ms=1.0, prompt=8000, max_tokens=500, sheddable=False), cluster, now=1000.0)
    assert kept.row == 0  # routed: it runs late rather than being refused on a prediction


def test_the_prior_ranks_gpus_by_their_datasheet_before_any_completion():
    cluster = sim_cluster("T4", "L4", "A100-40GB", "H100")
    assert cluster.predictor.warm.all() and (cluster.predictor.seen == 0).all()
    predicted = cluster.predictor.predict_all(1000, 200, cluster.load_with(1200), cluster.backlogs())
    assert list(np.argsort(predicted))[:2] == [3, 2]  # H100, then A100; L4 and T4 far behind
    assert min(predicted[:2]) > 3 * predicted[3]
    # The simulated H100 itself takes about what the prior says (within 2x, before learning anything).
    from dio.gpu_worker.sim.profiles import get_model, get_profile
    from dio.gpu_worker.sim.roofline import unloaded_service_time_s
    actual_ms = 1000 * unloaded_service_time_s(get_profile("H100"), get_model("llama-3.2-3b"), 1000, 200)
    assert actual_ms / 2 < predicted[3] < actual_ms * 2


def test_no_prior_without_a_datasheet_and_the_first_completion_warms_up():
    info = WorkerInfo(id="w", engine="vllm", model="m", gpu="unknown", kv_capacity_tokens=1000,
                      kv_bytes_per_token=1, max_num_seqs=4, max_model_len=1000)
    assert roofline_prior(info) is None
    cluster = Cluster()
    cluster.upsert(info)
    assert not cluster.predictor.warm[0]
    cluster.learn(0, 100, 10, 50.0, 0.0)
    assert cluster.predictor.warm[0]


def test_prior_scales_with_the_simulated_time_scale():
    slow = roofline_prior(sim_info("a", "H100"))
    fast = roofline_prior(WorkerInfo(**{**sim_info("a", "H100").model_dump(), "time_scale": 10.0}))
    assert fast == pytest.approx(slow / 10)


def test_the_backlog_feature_learns_prefill_queueing():
    """Latency that grows with the prompt tokens queued ahead is learned through the backlog feature."""
    pred = VectorNLMS()
    pred.add_row()
    rng = np.random.default_rng(0)
    for _ in range(400):
        p, o, backlog = rng.integers(100, 4000), rng.integers(10, 300), rng.uniform(0, 3)
        pred.update(0, p, o, 0.05 * p + 2 * o + 400 * backlog * (1 + o / 100) + 20, 0.0, backlog)
    assert pred.predict(0, 1000, 100, 0.0, 2.0) - pred.predict(0, 1000, 100, 0.0, 0.0) == pytest.approx(1600, rel=0.15)


@pytest.mark.parametrize(("name", "profile"), [("NVIDIA H100 80GB HBM3", "H100-80GB"), ("Tesla T4", "T4"),
                                               ("NVIDIA A100-SXM4-40GB", "A100-40GB"), ("NVIDIA L4", "L4"),
                                               ("NVIDIA GeForce RTX 4090", None)])
def test_match_profile_reads_driver_names(name, profile):
    found = match_profile(name)
    assert (found.name if found else None) == profile


def test_weight_bytes_from_a_llama_config():
    config = read_model_config("gpu_worker/models/llama-3.1-8b")
    assert weight_bytes(config) == pytest.approx(16.06e9, rel=0.01)  # 8.03B parameters in bf16
    assert weight_bytes({}) == 0


def test_dispatcher_settings_reach_the_policy(monkeypatch):
    from dio.dispatcher.config import DispatcherSettings
    from dio.dispatcher.service import Dispatcher

    monkeypatch.setenv("DIO_SHED_LATE", "false")
    monkeypatch.setenv("DIO_SHED_MARGIN", "1.5")
    settings = DispatcherSettings()
    import fakeredis

    dispatcher = Dispatcher(settings, client=fakeredis.FakeRedis(decode_responses=True))
    assert dispatcher.policy.shed_late is False and dispatcher.policy.shed_margin == 1.5


def test_shed_margin_gives_the_prediction_room():
    cluster = sim_cluster("H100")
    request = ask(prompt=1000, max_tokens=200)
    predicted = float(cluster.predictor.predict_all(1000, 200, cluster.load_with(1200), cluster.backlogs())[0])
    tight = ask(deadline_ms=predicted / 1.2, prompt=1000, max_tokens=200)
    assert make_policy("dio", seed=0).decide(tight, cluster, now=1000.0).reject
    assert make_policy("dio", seed=0, shed_margin=1.5).decide(tight, cluster, now=1000.0).row == 0
    assert make_policy("dio", seed=0).decide(request, cluster, now=1000.0).row == 0
