"""DIO: a Distributed Inference Orchestrator for LLM serving on Redis.

The import root over the repository's top-level folders (``pyproject.toml``'s ``package-dir``):
``dio.protocol`` (wire models, keys, scripts), ``dio.client`` (the SDK), ``dio.dispatcher``,
``dio.gpu_worker`` and ``dio.ops`` (the ``dio`` command, local cluster, demo). The benchmarks
(``dio.ops.bench``) and the GPU lab (``dio.ops.gpu``) run from a checkout; a wheel leaves them out.

``from dio import Client, AsyncClient`` is the short form of ``from dio.client import ...``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AsyncClient", "Client"]

if TYPE_CHECKING:
    from dio.client import AsyncClient, Client


def __getattr__(name: str) -> Any:
    # Lazy, so that ``import dio.dispatcher`` does not load the client SDK.
    if name in __all__:
        from dio import client

        return getattr(client, name)
    raise AttributeError(f"module 'dio' has no attribute {name!r}")
