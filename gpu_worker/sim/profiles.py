"""GPU profiles and model shapes for the simulated engine, from datasheets and model configs.

The efficiency fields are plain numbers on purpose: they are calibrated against a real H100
(per-token prefill and decode times measured with vLLM) and may be overridden per profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

MIB = 1024**2


@dataclass(frozen=True)
class GpuProfile:
    """One GPU model: datasheet peaks and the fraction of them a serving engine reaches."""

    name: str
    peak_flops: float  # dense bf16/fp16 tensor-core FLOP/s
    mem_bandwidth_bytes_s: float
    vram_bytes: int  # total memory as the driver reports it (what gpu_memory_utilization multiplies)
    compute_efficiency: float = 0.5  # fraction of peak FLOP/s a prefill reaches (MFU)
    bandwidth_efficiency: float = 0.8  # fraction of peak bandwidth a decode step reaches
    step_overhead_s: float = 0.001  # per engine step: scheduling, sampling, kernel launches
    seq_overhead_s: float = 0.0  # per decoding sequence per step: the host's sampling and output work
    prefill_overhead_s: float = 0.0  # extra for a step that computes prompt tokens (no full CUDA graph)


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, enough to cost its prefill, decode and KV cache."""

    name: str
    params: float
    num_layers: int
    hidden_size: int  # also the query width (heads x head_dim) in every model listed here
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # bf16
    max_context: int = 131_072

    @property
    def kv_bytes_per_token(self) -> int:
        """Return the KV-cache bytes one token takes (K and V, every layer)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Return the bytes the weights take in memory (and that every forward pass reads)."""
        return int(self.params * self.dtype_bytes)

    @property
    def attention_flops_per_pair(self) -> float:
        """Return the FLOPs of one (query, key) pair over all layers: QK^T and AV, 2 FLOPs per MAC."""
        return 4.0 * self.num_layers * self.hidden_size


# Memory totals are the driver's figures (nvidia-smi), not the marketing GB: an "80 GB" H100 SXM
# reports 81,559 MiB, and vLLM's gpu_memory_utilization is a fraction of that number.
# Overheads are guesses until calibrated: ~1 ms per step with CUDA graphs on datacenter cards.
GPU_PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("H100-80GB", 989e12, 3.35e12, 81_559 * MIB),
        GpuProfile("A100-80GB", 312e12, 2.0e12, 81_920 * MIB),
        GpuProfile("A100-40GB", 312e12, 1.555e12, 40_960 * MIB),
        GpuProfile("A10G", 125e12, 600e9, 23_028 * MIB, step_overhead_s=0.0015),
        GpuProfile("L4", 121e12, 300e9, 23_034 * MIB, step_overhead_s=0.0015),
        # T4 has no bf16: its 65 TFLOP/s are fp16, and no FlashAttention-2 kernels (Turing).
        GpuProfile("T4", 65e12, 320e9, 15_360 * MIB, compute_efficiency=0.4, step_overhead_s=0.002),
    )
}

GPU_ALIASES = {"h100": "H100-80GB", "a100": "A100-80GB"}


def _tiny_llama_params() -> int:
    """Count the parameters of the tiny Llama measured on the H100 (random weights, 1.65 GiB)."""
    hidden, inter, layers, vocab, kv_dim = 2048, 5632, 16, 32_000, 8 * 128
    attention = 2 * hidden * hidden + 2 * hidden * kv_dim  # q, o, k, v
    mlp = 3 * hidden * inter  # gate, up, down
    per_layer = attention + mlp + 2 * hidden  # + two RMSNorms
    return layers * per_layer + 2 * vocab * hidden + hidden  # + embeddings, lm_head, final norm


MODEL_SHAPES: dict[str, ModelShape] = {
    m.name: m
    for m in (
        ModelShape("llama-3.2-3b", 3.2e9, num_layers=28, hidden_size=3072, num_kv_heads=8, head_dim=128),
        ModelShape("llama-3.1-8b", 8.0e9, num_layers=32, hidden_size=4096, num_kv_heads=8, head_dim=128),
        # The config of /work/shared/gpu/vllm-on-device.md (hidden 2048, 16 layers): 0.886e9 params,
        # which is the 1.65 GiB vLLM loaded; max_context is the max_model_len used there.
        ModelShape(
            "tiny-llama-1b",
            float(_tiny_llama_params()),
            num_layers=16,
            hidden_size=2048,
            num_kv_heads=8,
            head_dim=128,
            max_context=4096,
        ),
    )
}

MODEL_ALIASES = {"tiny-llama": "tiny-llama-1b", "llama-3b": "llama-3.2-3b", "llama-8b": "llama-3.1-8b"}

T = TypeVar("T")


def _lookup(kind: str, name: str, table: dict[str, T], aliases: dict[str, str]) -> T:
    """Find ``name`` in ``table`` case-insensitively, through ``aliases``, or raise ValueError."""
    key = name.strip().lower()
    by_lower = {k.lower(): v for k, v in table.items()}
    if key in aliases:
        key = aliases[key].lower()
    if key not in by_lower:
        valid = ", ".join(sorted(table)) + " (aliases: " + ", ".join(sorted(aliases)) + ")"
        raise ValueError(f"unknown {kind} {name!r}; valid names: {valid}")
    return by_lower[key]


def get_profile(name: str) -> GpuProfile:
    """Return the GPU profile called ``name`` ("H100" and "A100" mean the 80 GB cards)."""
    return _lookup("GPU profile", name, GPU_PROFILES, GPU_ALIASES)


def match_profile(device_name: str) -> GpuProfile | None:
    """Return the profile of a GPU named as the driver names it ("NVIDIA H100 80GB HBM3"), or None.

    The first profile whose family ("H100", "A100", "L4", ...) is a word of the name wins; for
    the A100 the memory size in the name picks the 40 GB or 80 GB card.
    """
    words = device_name.upper().replace("-", " ").split()
    for profile in GPU_PROFILES.values():
        family, _, memory = profile.name.upper().partition("-")
        if family in words and (not memory or memory in words or memory.replace("GB", "") in words
                                or family != "A100"):
            return profile
    return None


def get_model(name: str) -> ModelShape:
    """Return the model shape called ``name``."""
    return _lookup("model", name, MODEL_SHAPES, MODEL_ALIASES)
