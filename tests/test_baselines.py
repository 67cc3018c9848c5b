"""The production routers' rules as baselines: weighted least connections, llm-d's prefix affinity
with token load, NVIDIA Dynamo's KV block cost (pure, table-driven: no Redis)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dio.dispatcher import policies, scorers
from dio.dispatcher.cluster import Cluster
from dio.dispatcher.config import DispatcherSettings
from dio.dispatcher.filters import PrefixAffinity, prefill_rate_tokens_s
from dio.dispatcher.policies import make_policy
from dio.dispatcher.policy import Ask
from dio.dispatcher.prefix import PrefixIndex
from dio.dispatcher.router import Router
from dio.dispatcher.scorers import CapacityShare, KvBlockCost, TokenLoad, WeightedConnections, capacity_weight
from dio.gpu_worker.sim.engine import SimEngine
from dio.protocol.models import Request, WorkerInfo, WorkerTelemetry

MODEL = "llama-3.2-3b"
H100_DECODE_RATE = 0.7 * 3.35e12 / 6.4e9  # 70% of 3.35 TB/s over a 3B model's 6.4 GB of weights: 366 tokens/s
H100_PREFILL_RATE = 989e12 * 0.4 / 6.4e9  # 40% of 989 TFLOP/s over 2 x 3.2B params: 61,812 tokens/s


def sim_info(worker_id: str, profile: str, **changes: object) -> WorkerInfo:
    """The WorkerInfo a simulated GPU registers (its datasheet included)."""
    engine = SimEngine(profile, MODEL)
    info = engine.capacity().worker_info(worker_id, engine.name)
    return info.model_copy(update=changes)


def bare_info(worker_id: str) -> WorkerInfo:
    """A worker that registered no datasheet (an unknown GPU)."""
    return WorkerInfo(id=worker_id, engine="vllm", model=MODEL, gpu="unknown", kv_capacity_tokens=500_000,
                      kv_bytes_per_token=1, max_num_seqs=256, max_model_len=100_000)


def cluster_of(*infos: WorkerInfo) -> Cluster:
    cluster = Cluster()
    for info in infos:
        row = cluster.upsert(info)
        cluster.set_telemetry(row, WorkerTelemetry(), alive=True)
    return cluster


def request(prompt: int = 2048, max_tokens: int = 100, prefix_hashes: list[int] | None = None) -> Request:
    return Request(id="r", model=MODEL, prompt="x", num_prompt_tokens=prompt, max_tokens=max_tokens,
                   prefix_hashes=prefix_hashes)


def load(cluster: Cluster, worker_id: str, jobs: int = 1, kv_tokens: int = 0, prompt_tokens: int = 0) -> None:
    """Put ``jobs`` jobs on a worker, the first holding ``kv_tokens`` KV and ``prompt_tokens`` unfinished prefill."""
    row = cluster.index[worker_id]
    for j in range(jobs):
        first = j == 0
        cluster.reserve(row, f"{worker_id}-{j}", kv_tokens if first else 0, prompt_tokens=prompt_tokens if first else 0)


def picked(policy_name: str, cluster: Cluster, req: Request, **options: object) -> str:
    decision = make_policy(policy_name, seed=0, **options).decide(req, cluster, now=0.0)
    assert decision.row is not None, decision.reason
    return cluster.ids[decision.row]


# --- weighted least connections ---------------------------------------------------------------------

@pytest.mark.parametrize(("info", "weights", "expected"), [
    (sim_info("h1", "H100"), {"H100-80GB": 4.0}, 4.0),  # configured by GPU name
    (sim_info("h1", "H100"), {"H100-80GB": 4.0, "h1": 9.0}, 9.0),  # the worker id is more specific: it wins
    (sim_info("h1", "H100"), {"L4": 1.0}, H100_DECODE_RATE),  # not configured: the datasheet's decode rate
    (sim_info("h1", "H100", time_scale=10.0), {}, 10 * H100_DECODE_RATE),  # 10x simulated time: 10x per wall s
    (bare_info("u1"), {"H100-80GB": 4.0}, 1.0),  # neither configured nor a datasheet
])
def test_capacity_weight(info, weights, expected):
    assert capacity_weight(info, weights) == pytest.approx(expected)


@pytest.mark.parametrize(("weights", "h100_jobs", "l4_jobs", "expected"), [
    ({"H100-80GB": 4.0, "L4": 1.0}, 0, 0, "h"),  # 1/4 < 1/1: an idle fast GPU beats an idle slow one
    ({"H100-80GB": 4.0, "L4": 1.0}, 4, 0, "l"),  # 5/4 > 1/1
    ({"H100-80GB": 4.0, "L4": 1.0}, 6, 1, "h"),  # 7/4 < 2/1
    ({}, 10, 0, "h"),  # datasheet weights, 366 vs 33 tokens/s: 11/366 < 1/33
    ({}, 11, 0, "l"),  # 12/366 > 1/33
])
def test_weighted_least_connections(weights, h100_jobs, l4_jobs, expected):
    cluster = cluster_of(sim_info("h", "H100"), sim_info("l", "L4"))
    load(cluster, "h", jobs=h100_jobs, kv_tokens=h100_jobs)
    load(cluster, "l", jobs=l4_jobs, kv_tokens=l4_jobs)
    assert picked("weighted-least-connections", cluster, request(), weights=weights) == expected


def test_weighted_connections_recomputes_weights_when_a_worker_reregisters():
    cluster = cluster_of(sim_info("h", "H100"), sim_info("l", "L4"))
    scorer = WeightedConnections({"h": 2.0})
    ask = Ask(request(), cluster)
    rows = np.arange(2)
    assert scorer.cost(ask, cluster, rows, 0.0) == pytest.approx([1 / 2.0, 1 / (0.7 * 300e9 / 6.4e9)])
    cluster.upsert(bare_info("l"))  # the L4 worker came back without a datasheet
    assert scorer.cost(ask, cluster, rows, 0.0) == pytest.approx([1 / 2.0, 1.0])


def test_capacity_share_is_weighted_connections_over_the_most_loaded_candidate():
    cluster = cluster_of(sim_info("h", "H100"), sim_info("l", "L4"))
    ask, rows = Ask(request(), cluster), np.arange(2)
    h100, l4 = 0.7 * 3.35e12 / 6.4e9, 0.7 * 300e9 / 6.4e9  # datasheet decode rates (tokens/s)
    # Idle: the L4's single share is the largest (it is 11x slower), so it costs 1 and the H100 l4/h100.
    assert CapacityShare().cost(ask, cluster, rows, 0.0) == pytest.approx([l4 / h100, 1.0])
    load(cluster, "h", jobs=5)  # 6 shares of the H100 weigh less than 1 of the L4 (each 11x larger)
    assert CapacityShare().cost(ask, cluster, rows, 0.0) == pytest.approx([(6 / h100) / (1 / l4), 1.0])
    load(cluster, "h", jobs=15)  # 21 on the H100: now it is the most loaded for its speed
    assert CapacityShare().cost(ask, cluster, rows, 0.0) == pytest.approx([1.0, (1 / l4) / (21 / h100)])


def test_dio_weighs_live_state_and_capacity_share_above_a_predicted_miss():
    dio = make_policy("dio")
    weights = {type(s.inner).__name__: w for s, w in dio.scorers if isinstance(s, scorers.WithSlo)}
    assert weights == {"QueueAndKv": policies.LIVE_STATE_WEIGHT_MS, "CapacityShare": policies.CAPACITY_SHARE_WEIGHT_MS}
    # A fully loaded worker (queue 1 + KV 1 + share 1) outweighs one predicted miss; a tenth-loaded one does not.
    full = 2 * policies.LIVE_STATE_WEIGHT_MS + policies.CAPACITY_SHARE_WEIGHT_MS
    assert full > scorers.INFEASIBLE_MS > 0.1 * full


# --- llm-d: prefix affinity until saturated, then token load ----------------------------------------

@pytest.mark.parametrize(("info", "penalty_s", "tau"), [
    (sim_info("h", "H100"), 1.0, H100_PREFILL_RATE),  # one second of the GPU's peak prefill
    (sim_info("h", "H100"), 0.5, H100_PREFILL_RATE / 2),
    (sim_info("h", "H100", time_scale=10.0), 1.0, H100_PREFILL_RATE),  # tokens, in the engine's own time
    (bare_info("u"), 1.0, math.inf),  # no datasheet: never saturated
])
def test_saturation_threshold(info, penalty_s, tau):
    assert PrefixAffinity(penalty_s).thresholds(cluster_of(info))[0] == pytest.approx(tau)


def test_prefill_rate_needs_a_datasheet():
    assert prefill_rate_tokens_s(sim_info("h", "H100")) == pytest.approx(H100_PREFILL_RATE)
    assert prefill_rate_tokens_s(bare_info("u")) == 0.0


PREFIX = [11, 12, 13, 14]  # four 512-token blocks: the request's first 2,048 tokens


@pytest.mark.parametrize(("loads", "dead", "expected"), [
    # loads: worker -> (KV tokens in flight, uncached prefill in flight). a holds the whole prefix,
    # b its first half, c nothing; τ = 61,812 tokens on these H100s.
    ({}, (), "a"),  # a holds the longest prefix
    ({"a": (50_000, 50_000)}, (), "a"),  # sticky: more token load than b and c, but under τ
    ({"a": (61_000, 61_000)}, (), "a"),  # still just under τ
    ({"a": (62_000, 62_000)}, (), "b"),  # a saturated: the next longest holder, though c is idle
    ({"a": (62_000, 62_000), "b": (70_000, 70_000), "c": (1_000, 0)}, (), "c"),  # every holder saturated:
    # the least token load (c: 1,000 + 4,096 uncached < a: 62,000 + 2,048 < b: 70,000 + 3,072)
    ({"a": (100_000, 0)}, (), "a"),  # KV load alone does not saturate: only queued prefill does
    ({}, ("a",), "b"),  # a is dead: the longest holder among the live workers
])
def test_token_load_prefix(loads, dead, expected):
    cluster = cluster_of(sim_info("a", "H100"), sim_info("b", "H100"), sim_info("c", "H100"))
    cluster.prefix.record(PREFIX, "a")
    cluster.prefix.record(PREFIX[:2], "b")
    for worker_id, (kv, prefill) in loads.items():
        load(cluster, worker_id, jobs=1, kv_tokens=kv, prompt_tokens=prefill)
    for worker_id in dead:
        cluster.alive[cluster.index[worker_id]] = False
    assert picked("token-load-prefix", cluster, request(prompt=4096, prefix_hashes=PREFIX)) == expected


def test_token_load_prefix_without_prefix_hashes_is_least_token_load():
    cluster = cluster_of(sim_info("a", "H100"), sim_info("b", "L4"))
    load(cluster, "a", jobs=1, kv_tokens=5_000)
    load(cluster, "b", jobs=3, kv_tokens=4_000)
    assert picked("token-load-prefix", cluster, request()) == "b"  # 4,000 KV tokens < 5,000, whatever the jobs


def test_a_smaller_ttft_penalty_lets_go_sooner():
    cluster = cluster_of(sim_info("a", "H100"), sim_info("b", "H100"))
    cluster.prefix.record(PREFIX, "a")
    load(cluster, "a", jobs=1, kv_tokens=40_000, prompt_tokens=40_000)  # 0.65 s of a's peak prefill
    req = request(prompt=4096, prefix_hashes=PREFIX)
    assert picked("token-load-prefix", cluster, req) == "a"
    assert picked("token-load-prefix", cluster, req, ttft_penalty_s=0.5) == "b"


@pytest.mark.parametrize(("kv", "cached_blocks", "expected"), [
    (0, 0, 4096),  # idle, nothing cached: the whole prompt
    (10_000, 0, 14_096),
    (10_000, 4, 10_000 + 4096 - 2048),  # the cached prefix is not prefilled again
])
def test_token_load(kv, cached_blocks, expected):
    cluster = cluster_of(sim_info("a", "H100"))
    cluster.prefix.record(PREFIX[:cached_blocks], "a")
    load(cluster, "a", jobs=1, kv_tokens=kv)
    ask = Ask(request(prompt=4096, prefix_hashes=PREFIX), cluster)
    assert TokenLoad().cost(ask, cluster, np.arange(1), 0.0) == pytest.approx([expected])


# --- NVIDIA Dynamo: uncached prefill blocks + active decode blocks ------------------------------------

DYNAMO_BLOCKS = list(range(100, 110))  # a 160-token prompt: ten 16-token blocks


def dynamo_cluster() -> Cluster:
    """Dynamo's documented example: (cached, decode) blocks = w1 (2, 10), w2 (5, 5), w3 (8, 9)."""
    cluster = cluster_of(sim_info("w1", "H100"), sim_info("w2", "H100"), sim_info("w3", "H100"))
    cluster.prefix = PrefixIndex(block_tokens=16)  # hash blocks of Dynamo's size, to mirror its example
    for worker_id, cached, decode in (("w1", 2, 10), ("w2", 5, 5), ("w3", 8, 9)):
        cluster.prefix.record(DYNAMO_BLOCKS[:cached], worker_id)
        load(cluster, worker_id, jobs=1, kv_tokens=16 * decode)
    return cluster


def test_kv_block_cost_reproduces_dynamos_example():
    cluster = dynamo_cluster()
    ask = Ask(request(prompt=160, prefix_hashes=DYNAMO_BLOCKS), cluster)
    # w1: 8 prefill + 10 decode; w2: 5 + 5 (the lowest); w3: 2 + 9.
    assert KvBlockCost().cost(ask, cluster, np.arange(3), 0.0) == pytest.approx([18, 10, 11])
    assert picked("kv-cost", cluster, request(prompt=160, prefix_hashes=DYNAMO_BLOCKS)) == "w2"


@pytest.mark.parametrize(("prompt", "kv", "cached_blocks", "expected"), [
    (1600, 0, 0, 100),  # 100 prefill blocks of 16 tokens, no decode load
    (1600, 800, 0, 150),  # + 50 active decode blocks
    (1600, 800, 2, 150 - 64),  # two 512-token prefix blocks cached = 64 of Dynamo's blocks not prefilled
    (1000, 0, 2, 1000 / 16 - 62),  # the cache is capped below the prompt: 999 tokens, 62 whole blocks
])
def test_kv_block_cost(prompt, kv, cached_blocks, expected):
    cluster = cluster_of(sim_info("a", "H100"))
    cluster.prefix.record(PREFIX[:cached_blocks], "a")
    load(cluster, "a", jobs=1, kv_tokens=kv)
    ask = Ask(request(prompt=prompt, prefix_hashes=PREFIX if cached_blocks else None), cluster)
    assert KvBlockCost().cost(ask, cluster, np.arange(1), 0.0) == pytest.approx([expected])


# --- plumbing ----------------------------------------------------------------------------------------

def test_weights_and_the_ttft_penalty_come_from_the_settings(monkeypatch):
    monkeypatch.setenv("DIO_POLICY_WEIGHTS", '{"H100-80GB": 4, "L4-3": 0.5}')
    monkeypatch.setenv("DIO_AFFINITY_TTFT_PENALTY_S", "0.25")
    settings = DispatcherSettings(policy="weighted-least-connections")
    assert settings.policy_weights == {"H100-80GB": 4.0, "L4-3": 0.5}
    scorer = Router(settings).policy.scorers[0][0]
    assert isinstance(scorer, WeightedConnections) and scorer.weights == {"H100-80GB": 4.0, "L4-3": 0.5}
    affinity = Router(settings.model_copy(update={"policy": "token-load-prefix"})).policy.filters[-1]
    assert isinstance(affinity, PrefixAffinity) and affinity.ttft_penalty_s == 0.25


def test_weights_must_be_positive(monkeypatch):
    monkeypatch.setenv("DIO_POLICY_WEIGHTS", '{"L4": 0}')
    with pytest.raises(ValueError, match="greater than 0"):
        DispatcherSettings()


@pytest.mark.parametrize("name", ["weighted-least-connections", "token-load-prefix", "kv-cost"])
def test_baselines_keep_the_common_filters(name):
    policy = make_policy(name)
    assert [f.name for f in policy.filters][:3] == ["serves-model", "alive", "queue-bound"]
    assert not policy.shed_late  # baselines run every request, late or not
