"""Build the engine a worker runs: ``make_engine(settings)`` picks it by ``settings.engine`` (``DIO_ENGINE``).

Each engine's module is imported only when it is chosen, so a simulated worker never loads vLLM.

Dry runs of the GPU measurements (``ops/gpu``) on a machine without a GPU set
``DIO_VLLM_STANDIN=<seconds per token>``: ``--engine vllm`` then runs DIO's real ``VllmEngine`` on
the CPU stand-in of vLLM that the tests use (``gpu_worker/vllm_standin.py``), in every worker process.
"""

from __future__ import annotations

import os
from typing import Any

from dio.gpu_worker.config import WorkerSettings
from dio.gpu_worker.engine import Engine

ENGINES = ("sim", "vllm", "instant")
STANDIN_ENV = "DIO_VLLM_STANDIN"  # seconds per output token of the stand-in; unset: the real vLLM
STANDIN_BLOCKS_PER_UTILIZATION = 40_000  # stand-in KV blocks (16 tokens) per unit of gpu_memory_utilization


def standin_backend(step_s: float, gpu_memory_utilization: float) -> Any:
    """Return the CPU stand-in of vLLM (a VllmBackend), its KV cache sized by the memory share."""
    from dio.gpu_worker.vllm_standin import StandinBackend

    blocks = max(64, int(gpu_memory_utilization * STANDIN_BLOCKS_PER_UTILIZATION))
    return StandinBackend(step_s=step_s, num_gpu_blocks=blocks)


def make_engine(settings: WorkerSettings) -> Engine:
    """Return the engine named by ``settings.engine``, configured from the settings."""
    if settings.engine == "sim":
        from dio.gpu_worker.sim.engine import SimEngine

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
        from dio.gpu_worker.instant import InstantEngine

        return InstantEngine(model=settings.model, max_num_seqs=settings.max_num_seqs)
    if settings.engine == "vllm":
        from dio.gpu_worker.vllm_engine import VllmEngine

        return VllmEngine(
            model=settings.model,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            max_model_len=settings.max_model_len,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            enforce_eager=settings.enforce_eager,
            load_format=settings.load_format,
            backend=_standin_from_env(settings),
        )
    raise ValueError(f"unknown engine {settings.engine!r}; choose one of {', '.join(ENGINES)}")


def _standin_from_env(settings: WorkerSettings) -> Any:
    """Return the stand-in backend when ``DIO_VLLM_STANDIN`` is set (dry runs), else None (real vLLM)."""
    step = os.environ.get(STANDIN_ENV)
    return standin_backend(float(step), settings.gpu_memory_utilization) if step else None
