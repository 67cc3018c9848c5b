"""Routing: filters, scorers, pickers and every named policy, table-driven (no Redis)."""

import numpy as np
import pytest

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policies import POLICIES, make_policy
from dio.dispatcher.prefix import PrefixIndex
from dio.protocol.models import Request, WorkerInfo, WorkerTelemetry


def make_cluster(*workers: tuple[str, int, float], model: str = "m") -> Cluster:
    """Workers as (id, KV capacity, ms per token learned by its predictor)."""
    cluster = Cluster(predictor_kind="vector")
    for worker_id, kv, ms_per_token in workers:
        row = cluster.upsert(WorkerInfo(id=worker_id, engine="sim", model=model, gpu=worker_id,
                                        kv_capacity_tokens=kv, kv_bytes_per_token=1, max_num_seqs=8,
                                        max_model_len=kv))
        cluster.set_telemetry(row, WorkerTelemetry(), alive=True)
        if ms_per_token:
            for p, o in ((100, 10), (1000, 100), (2000, 50), (500, 200)):
                cluster.learn(row, p, o, ms_per_token * (p / 10 + o), 0.0)
    return cluster


def request(prompt: int = 1000, max_tokens: int = 100, **kw) -> Request:
    return Request(id=kw.pop("id", "r"), model=kw.pop("model", "m"), prompt="x", num_prompt_tokens=prompt,
                   max_tokens=max_tokens, **kw)


def test_dio_picks_the_fastest_worker():
    cluster = make_cluster(("slow", 100_000, 10.0), ("fast", 100_000, 1.0))
    decision = make_policy("dio", seed=0).decide(request(), cluster, now=0)
    assert cluster.ids[decision.row] == "fast"
    assert decision.predicted_ms == pytest.approx(1.0 * (100 + 100), rel=0.2)


def test_dio_moves_to_a_slower_worker_when_the_fast_one_queues():
    cluster = make_cluster(("slow", 100_000, 2.0), ("fast", 100_000, 1.0))
    fast = cluster.index["fast"]
    for i in range(30):  # 30 jobs outstanding on an engine with 8 slots
        cluster.reserve(fast, f"j{i}", 10)
    decision = make_policy("dio", seed=0).decide(request(), cluster, now=0)
    assert cluster.ids[decision.row] == "slow"


@pytest.mark.parametrize("policy", list(POLICIES))
def test_a_request_too_large_for_every_worker_is_never_dispatched_by_dio(policy):
    cluster = make_cluster(("a", 4_000, 1.0), ("b", 8_000, 1.0))
    decision = make_policy(policy, seed=0).decide(request(prompt=9_000, max_tokens=100), cluster, now=0)
    if policy == "dio":
        assert decision.reject and "too large for every worker" in decision.reason
        assert "9100 KV tokens" in decision.reason and "holds 8000" in decision.reason
    else:  # baselines are blind to KV: they send it, and the engine fails it
        assert decision.row is not None


def test_kv_admission_respects_reservations_then_waits():
    cluster = make_cluster(("only", 10_000, 1.0))
    policy = make_policy("dio", seed=0)
    cluster.reserve(0, "big", 9_000)
    decision = policy.decide(request(prompt=1_500, max_tokens=100), cluster, now=0)
    assert decision.wait and "free KV tokens" in decision.reason
    cluster.release(0, "big")
    assert policy.decide(request(prompt=1_500, max_tokens=100), cluster, now=0).row == 0


@pytest.mark.parametrize(
    "alive, model, expect",
    [
        (False, "m", "wait"),  # the only worker is dead: wait for it (or another) to come
        (True, "other", "reject"),  # nobody serves that model: a permanent refusal
    ],
)
def test_dead_or_wrong_model(alive, model, expect):
    cluster = make_cluster(("w", 10_000, 1.0))
    cluster.alive[0] = alive
    decision = make_policy("dio").decide(request(model=model), cluster, now=0)
    assert (decision.wait if expect == "wait" else decision.reject)


def test_queue_bound_keeps_queues_shallow_for_every_policy():
    for name in POLICIES:
        cluster = make_cluster(("w", 1_000_000, 1.0))
        for i in range(8 + 2):  # slots + prefetch
            cluster.reserve(0, f"j{i}", 1)
        assert make_policy(name, prefetch=2).decide(request(), cluster, now=0).wait, name


def test_round_robin_cycles_and_least_loaded_balances():
    cluster = make_cluster(("a", 100_000, 1.0), ("b", 100_000, 1.0), ("c", 100_000, 1.0))
    rr = make_policy("round-robin")
    assert [cluster.ids[rr.decide(request(), cluster, 0).row] for _ in range(4)] == ["a", "b", "c", "a"]
    cluster.reserve(0, "x", 1)
    cluster.reserve(1, "y", 1)
    assert cluster.ids[make_policy("least-loaded").decide(request(), cluster, 0).row] == "c"


def test_power_of_two_never_picks_the_most_loaded_of_two():
    cluster = make_cluster(("a", 100_000, 1.0), ("b", 100_000, 1.0))
    for i in range(5):
        cluster.reserve(0, f"j{i}", 1)
    p2c = make_policy("power-of-two", seed=1)
    assert {cluster.ids[p2c.decide(request(), cluster, 0).row] for _ in range(20)} == {"b"}


def test_queue_kv_prefers_low_kv_usage():
    cluster = make_cluster(("a", 100_000, 1.0), ("b", 100_000, 1.0))
    cluster.kv_usage[:] = (0.9, 0.1)
    assert cluster.ids[make_policy("queue-kv").decide(request(), cluster, 0).row] == "b"


def test_random_spreads():
    cluster = make_cluster(("a", 100_000, 1.0), ("b", 100_000, 1.0))
    rnd = make_policy("random", seed=0)
    assert {rnd.decide(request(), cluster, 0).row for _ in range(50)} == {0, 1}


def test_prefix_affinity_prefers_the_holder_until_its_queue_costs_more():
    cluster = make_cluster(("a", 1_000_000, 1.0), ("b", 1_000_000, 1.0))
    policy = make_policy("dio", seed=0)
    hashes = [1, 2, 3, 4]
    cluster.prefix.record(hashes, "b")
    req = request(prompt=2048, max_tokens=10, prefix_hashes=hashes)
    assert cluster.ids[policy.decide(req, cluster, 0).row] == "b"
    for i in range(40):  # b is now far busier than the prefill the cache saves
        cluster.reserve(cluster.index["b"], f"j{i}", 1)
    assert cluster.ids[policy.decide(req, cluster, 0).row] == "a"


def test_prefix_index_matches_leading_blocks_only():
    index = PrefixIndex(max_blocks=10)
    index.record([1, 2, 3], "a")
    index.record([1, 9], "b")
    matched = index.matched_blocks([1, 2, 3, 4], ["a", "b"], np.array([0, 1]))
    assert matched.tolist() == [3, 1]
    index.record(list(range(100, 120)), "c")  # evicts the oldest blocks
    assert len(index) == 10


def test_deadline_prefers_a_feasible_worker():
    cluster = make_cluster(("slow", 100_000, 10.0), ("fast", 100_000, 1.0))
    cluster.reserve(cluster.index["fast"], "x", 1)
    req = request(deadline_ms=500.0, submitted_at=0.0)
    assert cluster.ids[make_policy("dio", seed=0).decide(req, cluster, now=0.0).row] == "fast"


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest")


def test_dio_sheds_a_request_that_would_finish_past_its_deadline():
    cluster = make_cluster(("only", 100_000, 1.0))
    late = request(deadline_ms=50.0, submitted_at=0.0, sheddable=True)  # predicted ≈ 200 ms
    decision = make_policy("dio", seed=0).decide(late, cluster, now=0.0)
    assert decision.reject and "cannot finish before its deadline" in decision.reason
    assert decision.retry_after_s and decision.retry_after_s > 0
    not_sheddable = request(deadline_ms=50.0, submitted_at=0.0)  # shedding is opt-in: it runs late
    assert make_policy("dio", seed=0).decide(not_sheddable, cluster, now=0.0).row == 0
    on_time = request(deadline_ms=5_000.0, submitted_at=0.0)
    assert make_policy("dio", seed=0).decide(on_time, cluster, now=0.0).row == 0
    assert make_policy("least-loaded").decide(late, cluster, now=0.0).row == 0  # baselines run it late


def test_dio_sheds_a_waiting_request_that_can_no_longer_make_its_deadline():
    cluster = make_cluster(("only", 10_000, 1.0))
    cluster.reserve(0, "big", 9_500)  # full: the request would have to wait
    hopeless = request(prompt=1_000, deadline_ms=50.0, submitted_at=0.0, sheddable=True)
    decision = make_policy("dio", seed=0).decide(hopeless, cluster, now=0.0)
    assert decision.reject and "deadline" in decision.reason
    not_sheddable = request(prompt=1_000, deadline_ms=50.0, submitted_at=0.0)  # waits; the backlog expires it
    assert make_policy("dio", seed=0).decide(not_sheddable, cluster, now=0.0).wait
    patient = request(prompt=1_000, deadline_ms=60_000.0, submitted_at=0.0)
    assert make_policy("dio", seed=0).decide(patient, cluster, now=0.0).wait


def test_prefix_index_forgets_what_a_worker_cache_cannot_hold():
    index = PrefixIndex(block_tokens=512)
    index.set_capacity("small", 2)  # its cache holds two blocks
    index.record([1, 2, 3], "small")
    index.record([1, 2, 3], "big")
    matched = index.matched_blocks([1, 2, 3], ["small", "big"], np.array([0, 1]))
    assert matched.tolist() == [0, 3]  # block 1 was evicted from the small worker: no leading match
    index.record([1], "small")  # sent again: cached again, evicting block 2
    assert index.matched_blocks([1, 2, 3], ["small", "big"], np.array([0, 1])).tolist() == [1, 3]
