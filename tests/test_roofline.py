"""The roofline cost model: prefill is compute-bound, decode memory-bound, KV capacity from memory."""

from __future__ import annotations

import pytest

from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.profiles import GPU_PROFILES, GpuProfile, get_model, get_profile

H100 = get_profile("H100-80GB")
T4 = get_profile("T4")
LLAMA_3B = get_model("llama-3.2-3b")
LLAMA_8B = get_model("llama-3.1-8b")
TINY = get_model("tiny-llama-1b")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("H100", "H100-80GB"),
        ("h100-80gb", "H100-80GB"),
        ("A100", "A100-80GB"),
        ("a100-40GB", "A100-40GB"),
        (" t4 ", "T4"),
        ("l4", "L4"),
        ("A10G", "A10G"),
    ],
)
def test_get_profile_accepts_aliases_and_any_case(name: str, expected: str) -> None:
    assert get_profile(name).name == expected


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="H100-80GB.*T4"):
        get_profile("B200")
    with pytest.raises(ValueError, match="llama-3.2-3b"):
        get_model("gpt-5")


@pytest.mark.parametrize(
    "model, kv_bytes, weight_gb",
    [
        (LLAMA_3B, 114_688, 6.4),  # 28 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes
        (LLAMA_8B, 131_072, 16.0),
        (TINY, 65_536, 1.772),  # 1.65 GiB, as vLLM loaded it on the H100
    ],
)
def test_model_shapes(model, kv_bytes: int, weight_gb: float) -> None:
    assert model.kv_bytes_per_token == kv_bytes
    assert model.weight_bytes / 1e9 == pytest.approx(weight_gb, rel=1e-3)


@pytest.mark.parametrize(
    "gpu, model, util, expected",
    [
        (H100, LLAMA_3B, 0.9, 604_064),  # (0.9 x 79.6 GiB - 6.4 GB - 1.2 GiB) / 114,688 B
        (T4, LLAMA_3B, 0.9, 59_344),  # a T4 holds a tenth of an H100's KV
        (get_profile("L4"), LLAMA_8B, 0.9, 33_936),  # an 8B fits a 24 GB card, barely
    ],
)
def test_kv_capacity(gpu: GpuProfile, model, util: float, expected: int) -> None:
    tokens = roofline.kv_capacity_tokens(gpu, model, util)
    assert tokens == expected
    assert tokens % roofline.KV_BLOCK_TOKENS == 0


def test_kv_capacity_matches_vllm_on_the_h100() -> None:
    # vllm-on-device.md: gpu_memory_utilization=0.5 gave "GPU KV cache size: 605,824 tokens".
    assert roofline.kv_capacity_tokens(H100, TINY, 0.5) == pytest.approx(605_824, rel=1e-3)


def test_model_that_does_not_fit_raises() -> None:
    with pytest.raises(roofline.ModelDoesNotFit, match="llama-3.1-8b does not fit on T4"):
        roofline.kv_capacity_tokens(T4, LLAMA_8B)


def _busy(seconds: float, gpu: GpuProfile = H100) -> float:
    """Return a step's time without the fixed per-step overhead."""
    return seconds - gpu.step_overhead_s


@pytest.mark.parametrize("tokens", [1024, 2048, 4096])
def test_prefill_is_compute_bound_and_grows_linearly(tokens: int) -> None:
    one = roofline.prefill_chunk_time_s(H100, LLAMA_3B, 0, tokens)
    two = roofline.prefill_chunk_time_s(H100, LLAMA_3B, 0, 2 * tokens)
    compute = 2 * LLAMA_3B.params * tokens / (H100.peak_flops * H100.compute_efficiency)
    assert _busy(one) >= compute  # compute time, not weight reads, sets the pace
    assert _busy(two) / _busy(one) == pytest.approx(2.0, rel=0.1)  # attention adds a little more


@pytest.mark.parametrize("gpu", [H100, T4])
def test_decode_is_memory_bound_batch_32_costs_about_batch_1(gpu: GpuProfile) -> None:
    context = 128
    one = roofline.step_time_s(gpu, LLAMA_3B, 0, 1, context)
    many = roofline.step_time_s(gpu, LLAMA_3B, 0, 32, 32 * context)
    assert many / one < 1.15  # 32x the tokens for <15% more time: the weights are read once
    tok_s_1 = roofline.decode_capacity_tok_s(gpu, LLAMA_3B, 1, context)
    tok_s_32 = roofline.decode_capacity_tok_s(gpu, LLAMA_3B, 32, context)
    assert tok_s_32 > 25 * tok_s_1


def test_empty_step_takes_no_time() -> None:
    assert roofline.step_time_s(H100, LLAMA_3B, 0, 0, 0) == 0.0


# A GPU with little compute: a decode run starts memory-bound, turns compute-bound as context grows.
SLOW_FLOPS = GpuProfile("slow", 2e12, 3e12, 80 * 1024**3, step_overhead_s=0.0)


@pytest.mark.parametrize(
    "gpu, batch, kv_first, steps",
    [
        (H100, 1, 1001, 199),
        (H100, 64, 64 * 500, 300),
        (T4, 8, 8 * 2000, 1000),
        (SLOW_FLOPS, 16, 16, 4000),  # lines cross inside the run
        (SLOW_FLOPS, 256, 256 * 3000, 50),
    ],
)
def test_decode_run_closed_form_equals_step_sum(gpu: GpuProfile, batch: int, kv_first: int, steps: int) -> None:
    loop = sum(
        roofline.step_time_s(gpu, LLAMA_3B, 0, batch, kv_first + batch * k, attention_pairs=kv_first + batch * k)
        for k in range(steps)
    )
    assert roofline.decode_steps_time_s(gpu, LLAMA_3B, batch, kv_first, steps) == pytest.approx(loop, rel=1e-9)


@pytest.mark.parametrize("k", [0, 1, 7, 99])
def test_decode_steps_started_inverts_the_cumulative_time(k: int) -> None:
    start_k = roofline.decode_steps_time_s(H100, LLAMA_3B, 8, 8000, k)
    # Just after step k starts, k + 1 steps have started; exactly at its start, only k.
    assert roofline.decode_steps_started(H100, LLAMA_3B, 8, 8000, 100, start_k + 1e-6) == k + 1
    assert roofline.decode_steps_started(H100, LLAMA_3B, 8, 8000, 100, start_k) == max(k, 0)


def test_unloaded_service_time_is_prefill_then_one_step_per_token() -> None:
    ttft = roofline.prefill_time_s(H100, LLAMA_3B, 1000)
    total = roofline.unloaded_service_time_s(H100, LLAMA_3B, 1000, 200)
    decode_step = roofline.step_time_s(H100, LLAMA_3B, 0, 1, 1100)
    assert total - ttft == pytest.approx(199 * decode_step, rel=0.01)


def test_long_prompt_is_prefilled_in_chunks_of_the_token_budget() -> None:
    chunks = [
        roofline.prefill_chunk_time_s(H100, LLAMA_3B, offset, tokens)
        for offset, tokens in ((0, 8192), (8192, 8192), (16384, 3616))
    ]
    assert roofline.prefill_time_s(H100, LLAMA_3B, 20_000) == pytest.approx(sum(chunks))


def test_cached_prefix_shortens_prefill() -> None:
    cold = roofline.prefill_time_s(H100, LLAMA_3B, 4096)
    warm = roofline.prefill_time_s(H100, LLAMA_3B, 4096, cached_tokens=3584)
    assert warm < cold / 4


def test_faster_gpus_serve_sooner() -> None:
    times = {name: roofline.unloaded_service_time_s(gpu, LLAMA_3B, 1000, 200) for name, gpu in GPU_PROFILES.items()}
    assert times["H100-80GB"] < times["A100-80GB"] < times["A100-40GB"] < times["A10G"]
    assert times["A10G"] < min(times["L4"], times["T4"])
    assert times["T4"] / times["H100-80GB"] > 5


def test_capacity_estimate_ranks_gpus() -> None:
    h100 = roofline.estimate_capacity_rps(H100, LLAMA_3B, 1000, 200)
    t4 = roofline.estimate_capacity_rps(T4, LLAMA_3B, 1000, 200)
    assert h100 > 10 * t4 > 0
    # A single sequence cannot beat its unloaded service time.
    assert roofline.estimate_capacity_rps(H100, LLAMA_3B, 1000, 200, max_num_seqs=1) <= (
        1 / roofline.unloaded_service_time_s(H100, LLAMA_3B, 1000, 200) * 1.05
    )
