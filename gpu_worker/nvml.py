"""Read the GPU's name and free/total memory through NVML, or nothing when there is no GPU.

Every function returns ``None`` instead of raising: a machine without a GPU, without the
``nvidia-ml-py`` package or with a broken driver simply reports no VRAM figures, and the worker's
heartbeat goes on. ``pynvml`` is imported lazily (vLLM also ships a copy, used as a fallback).
"""

from __future__ import annotations

import os
from typing import Any

_state: dict[str, Any] = {}


def _import_pynvml() -> Any:
    """Import pynvml from nvidia-ml-py, else vLLM's vendored copy; raise ImportError without either."""
    try:
        import pynvml  # package nvidia-ml-py
    except ImportError:
        from vllm.third_party import pynvml  # vLLM's vendored copy
    return pynvml


def _pynvml() -> Any | None:
    """Import and initialise pynvml once; return the module, or None when NVML is unusable."""
    if "nvml" in _state:
        return _state["nvml"]
    module: Any | None
    try:
        module = _import_pynvml()
        module.nvmlInit()
    except Exception:  # no package, no driver, no GPU: report no VRAM figures
        module = None
    _state["nvml"] = module
    return module


def _device_selector() -> str:
    """Return the first entry of CUDA_VISIBLE_DEVICES (an index or a GPU UUID), default "0"."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return visible or "0"


def _handle() -> Any | None:
    """Return the NVML handle of the GPU this process uses, or None."""
    if "handle" in _state:
        return _state["handle"]
    nvml = _pynvml()
    handle = None
    if nvml is not None:
        selector = _device_selector()
        try:
            if selector.isdigit():
                handle = nvml.nvmlDeviceGetHandleByIndex(int(selector))
            else:
                handle = nvml.nvmlDeviceGetHandleByUUID(selector)
        except Exception:  # unknown index or UUID: report no VRAM figures
            handle = None
    _state["handle"] = handle
    return handle


def gpu_memory() -> tuple[int, int] | None:
    """Return (free, total) bytes of the GPU's memory, or None without a usable GPU."""
    handle = _handle()
    if handle is None:
        return None
    try:
        info = _state["nvml"].nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    except Exception:  # a transient NVML error: this heartbeat goes without VRAM figures
        return None


def gpu_name() -> str | None:
    """Return the GPU's name (e.g. "NVIDIA H100 80GB HBM3"), or None without a usable GPU."""
    handle = _handle()
    if handle is None:
        return None
    try:
        name = _state["nvml"].nvmlDeviceGetName(handle)
    except Exception:  # NVML error: the caller falls back to another source
        return None
    return name.decode() if isinstance(name, bytes) else str(name)
