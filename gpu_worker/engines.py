"""Build the engine a worker runs, by name (heavy engines are imported only when chosen)."""

from __future__ import annotations

from gpu_worker.config import WorkerSettings
from gpu_worker.engine import Engine

ENGINES = ("sim", "vllm", "instant")


def make_engine(settings: WorkerSettings) -> Engine:
    """Return the engine named by ``settings.engine``, configured from the settings."""
    if settings.engine == "sim":
        from gpu_worker.sim.engine import SimEngine

        return SimEngine(
            gpu=settings.profile,
            model=settings.model,
            time_scale=settings.time_scale,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            kv_capacity_tokens=settings.kv_capacity_tokens,
        )
    if settings.engine == "instant":
        from gpu_worker.instant import InstantEngine

        return InstantEngine(model=settings.model, max_num_seqs=settings.max_num_seqs)
    if settings.engine == "vllm":
        from gpu_worker.vllm_engine import VllmEngine

        return VllmEngine(
            model=settings.model,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enforce_eager=settings.enforce_eager,
            load_format=settings.load_format,
        )
    raise ValueError(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")
