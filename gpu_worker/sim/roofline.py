"""Roofline cost model of one GPU serving one model: KV capacity and engine-step durations.

Pure functions, no I/O and no clock. An engine step (one forward pass over a batch) costs a fixed
overhead plus the larger of its compute time and its memory time:

- compute: 2 FLOPs per parameter per token in the batch, plus attention (4 FLOPs per layer and
  query width for every (query, key) pair), over the peak FLOP/s times the compute efficiency;
- memory: every step reads all the weights once plus the KV cache its sequences attend to, over
  the peak bandwidth times the bandwidth efficiency.

A prefill of hundreds of tokens is compute-bound; a decode step (one token per sequence) is
memory-bound, so its cost is shared by every sequence in the batch (continuous batching).
"""

from __future__ import annotations

import math

from dio.gpu_worker.sim.profiles import GpuProfile, ModelShape

GIB = 1024**3
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Memory vLLM keeps outside weights and KV (activations, CUDA context, allocator slack): measured on
# the H100 as 0.5 x 79.65 GiB - 1.65 GiB weights - 36.98 GiB KV = 1.19 GiB (vllm-on-device.md).
DEFAULT_ACTIVATION_RESERVE_BYTES = int(1.2 * GIB)
DEFAULT_MAX_BATCHED_TOKENS = 8192
KV_BLOCK_TOKENS = 16  # vLLM's default block size: capacity is a whole number of blocks


class ModelDoesNotFit(ValueError):
    """The model's weights leave no room for a KV cache on this GPU."""


def kv_capacity_tokens(
    gpu: GpuProfile,
    model: ModelShape,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    activation_reserve_bytes: int = DEFAULT_ACTIVATION_RESERVE_BYTES,
) -> int:
    """Return how many tokens the KV cache holds, rounded down to whole 16-token blocks.

    Raises:
        ModelDoesNotFit: the weights and the reserve take all the memory vLLM may use.
    """
    budget = gpu.vram_bytes * gpu_memory_utilization
    free = budget - model.weight_bytes - activation_reserve_bytes
    tokens = int(free // model.kv_bytes_per_token) // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
    if tokens <= 0:
        raise ModelDoesNotFit(
            f"model {model.name} does not fit on {gpu.name}: {model.weight_bytes / GIB:.1f} GiB of weights"
            f" + {activation_reserve_bytes / GIB:.1f} GiB reserve > {budget / GIB:.1f} GiB"
            f" ({gpu_memory_utilization:.0%} of {gpu.vram_bytes / GIB:.1f} GiB)"
        )
    return tokens


def _compute_rate(gpu: GpuProfile) -> float:
    return gpu.peak_flops * gpu.compute_efficiency


def _memory_rate(gpu: GpuProfile) -> float:
    return gpu.mem_bandwidth_bytes_s * gpu.bandwidth_efficiency


def step_time_s(
    gpu: GpuProfile,
    model: ModelShape,
    prefill_tokens: int,
    decode_seqs: int,
    kv_tokens_read: int,
    attention_pairs: float | None = None,
) -> float:
    """Return the duration of one engine step; 0 for an empty step.

    Args:
        prefill_tokens: prompt tokens computed in this step (all chunks together).
        decode_seqs: sequences that decode one token in this step.
        kv_tokens_read: KV tokens the step's attention reads (every scheduled sequence's context,
            the new tokens included).
        attention_pairs: (query, key) pairs attention computes. None estimates them as one pair per
            KV token read by decode queries plus one fresh prefill chunk attending causally to itself.
    """
    tokens = prefill_tokens + decode_seqs
    if tokens <= 0:
        return 0.0
    if attention_pairs is None:
        attention_pairs = max(0, kv_tokens_read - prefill_tokens) + prefill_tokens * (prefill_tokens + 1) / 2
    flops = 2.0 * model.params * tokens + model.attention_flops_per_pair * attention_pairs
    memory = model.weight_bytes + kv_tokens_read * model.kv_bytes_per_token
    overhead = gpu.step_overhead_s + gpu.seq_overhead_s * decode_seqs
    if prefill_tokens > 0:
        overhead += gpu.prefill_overhead_s
    return overhead + max(flops / _compute_rate(gpu), memory / _memory_rate(gpu))


def _decode_lines(
    gpu: GpuProfile, model: ModelShape, batch: int, kv_tokens_first: int
) -> tuple[float, float, float, float]:
    """Return (a_c, b_c, a_m, b_m): step k of a decode run costs max(a_c + b_c k, a_m + b_m k)."""
    # Each decode query attends to its whole context, so attention pairs equal the KV tokens read.
    c_rate, m_rate, kvb = _compute_rate(gpu), _memory_rate(gpu), model.kv_bytes_per_token
    pair_flops = model.attention_flops_per_pair
    a_c = (2.0 * model.params * batch + pair_flops * kv_tokens_first) / c_rate
    a_m = (model.weight_bytes + kvb * kv_tokens_first) / m_rate
    return a_c, pair_flops * batch / c_rate, a_m, kvb * batch / m_rate


def _sum_linear(a: float, b: float, lo: int, hi: int) -> float:
    """Return the sum of a + b k for k in [lo, hi)."""
    count = hi - lo
    return count * a + b * (lo + hi - 1) * count / 2.0


def _sum_max_linear(a1: float, b1: float, a2: float, b2: float, n: int) -> float:
    """Return the sum over k in [0, n) of max(a1 + b1 k, a2 + b2 k), in closed form."""
    if n <= 0:
        return 0.0
    # The two lines cross at most once: split there and sum each side's upper line.
    split = n
    if b1 != b2:
        split = min(n, max(0, math.ceil((a2 - a1) / (b1 - b2))))
    total = 0.0
    for lo, hi in ((0, split), (split, n)):
        if hi > lo:
            mid = (lo + hi - 1) / 2.0
            upper = (a1, b1) if a1 + b1 * mid >= a2 + b2 * mid else (a2, b2)
            total += _sum_linear(*upper, lo, hi)
    return total


def decode_steps_time_s(gpu: GpuProfile, model: ModelShape, batch: int, kv_tokens_first: int, steps: int) -> float:
    """Return the duration of ``steps`` decode steps of a constant batch, in closed form.

    The batch's KV read is ``kv_tokens_first`` in the first step and grows by ``batch`` per step.
    Equals the sum of ``step_time_s(gpu, model, 0, batch, kv_k)`` for those steps.
    """
    if steps <= 0 or batch <= 0:
        return 0.0
    overhead = steps * (gpu.step_overhead_s + gpu.seq_overhead_s * batch)
    return overhead + _sum_max_linear(*_decode_lines(gpu, model, batch, kv_tokens_first), steps)


def decode_steps_started(
    gpu: GpuProfile, model: ModelShape, batch: int, kv_tokens_first: int, steps: int, elapsed_s: float
) -> int:
    """Return how many of ``steps`` decode steps (as in decode_steps_time_s) start before ``elapsed_s``."""
    if elapsed_s <= 0:
        return 0
    lo, hi = 1, steps  # step 0 starts at 0 < elapsed; find the last step k whose start < elapsed
    while lo <= hi:
        mid = (lo + hi) // 2
        if decode_steps_time_s(gpu, model, batch, kv_tokens_first, mid) < elapsed_s:
            lo = mid + 1
        else:
            hi = mid - 1
    return min(lo, steps)


def prefill_chunk_time_s(gpu: GpuProfile, model: ModelShape, offset: int, chunk: int) -> float:
    """Return the duration of a step that prefills ``chunk`` tokens after ``offset`` computed ones."""
    pairs = chunk * offset + chunk * (chunk + 1) / 2
    return step_time_s(gpu, model, chunk, 0, offset + chunk, attention_pairs=pairs)


def prefill_time_s(
    gpu: GpuProfile,
    model: ModelShape,
    prompt_tokens: int,
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    cached_tokens: int = 0,
) -> float:
    """Return the time to first token of a request alone: its prompt in chunks of the token budget."""
    offset, total = min(cached_tokens, prompt_tokens - 1), 0.0
    while offset < prompt_tokens:
        chunk = min(max_batched_tokens, prompt_tokens - offset)
        total += prefill_chunk_time_s(gpu, model, offset, chunk)
        offset += chunk
    return total


def unloaded_service_time_s(
    gpu: GpuProfile,
    model: ModelShape,
    prompt_tokens: int,
    output_tokens: int,
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS,
    cached_tokens: int = 0,
) -> float:
    """Return the latency of one request alone: chunked prefill (first token), then one step per token."""
    ttft = prefill_time_s(gpu, model, prompt_tokens, max_batched_tokens, cached_tokens)
    # The first decode step attends to the prompt plus the token the prefill sampled.
    return ttft + decode_steps_time_s(gpu, model, 1, prompt_tokens + 1, output_tokens - 1)


def decode_capacity_tok_s(gpu: GpuProfile, model: ModelShape, batch: int, context_tokens: int) -> float:
    """Return the output tokens/s of a decode batch of ``batch`` sequences at ``context_tokens`` each."""
    kv = batch * context_tokens
    return batch / step_time_s(gpu, model, 0, batch, kv, attention_pairs=kv)


def estimate_capacity_rps(
    gpu: GpuProfile,
    model: ModelShape,
    mean_prompt: float,
    mean_output: float,
    max_num_seqs: int = 256,
    kv_capacity: int | None = None,
) -> float:
    """Return a rough saturation throughput in requests/s, for scaling benchmark load.

    The batch is as large as max_num_seqs and the KV cache allow (a sequence holds its prompt and
    half its output on average); each request adds its prefill compute and its share of the decode
    steps it takes part in.
    """
    if kv_capacity is None:
        kv_capacity = kv_capacity_tokens(gpu, model)
    context = mean_prompt + mean_output / 2.0
    batch = max(1, min(max_num_seqs, int(kv_capacity // max(context, 1.0))))
    prefill_flops = 2.0 * model.params * mean_prompt + model.attention_flops_per_pair * mean_prompt**2 / 2
    prefill_s = prefill_flops / _compute_rate(gpu)
    kv = int(batch * context)
    decode_s = mean_output * step_time_s(gpu, model, 0, batch, kv, attention_pairs=kv) / batch
    return 1.0 / (prefill_s + decode_s)
