"""The models the gateway serves, from the live worker registry: ``GET /v1/models`` and the model check.

Read from Redis (``dio.protocol.served_models``) at most every ``DIO_GATEWAY_MODELS_CACHE_S``
(1 s) per gateway process, so a request costs no registry read. A model no registered worker serves
is unknown (404); one whose workers are all dead or draining, or a cluster with no worker at all,
is unavailable (503). Sharded by model, the models are those of every registered pool.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis

from dio.ops.gateway.errors import ApiError, redis_unavailable
from dio.protocol.keys import Keys
from dio.protocol.pools import read_pools_async
from dio.protocol.served_models import ServedModel, read_served_in_async


class ModelCatalog:
    """A short-lived cache of the served models."""

    def __init__(self, client: Any, keys: Keys, max_age_s: float, sharded: bool = False) -> None:
        self.redis = client
        self.keys = keys  # the deployment's base keys
        self.max_age_s = max_age_s
        self.sharded = sharded
        self._models: dict[str, ServedModel] = {}
        self._read_at = -float("inf")
        self._reading = asyncio.Lock()  # one read at a time: a burst of requests shares it

    async def models(self) -> dict[str, ServedModel]:
        """Return the served models, re-read when the cache is older than ``max_age_s``; 503 without Redis."""
        if self._fresh():
            return self._models
        async with self._reading:
            if self._fresh():  # read by the request that held the lock
                return self._models
            started = time.monotonic()
            try:
                pools = await read_pools_async(self.redis, self.keys) if self.sharded else None
                self._models = await read_served_in_async(self.redis, self.keys, pools)
            except redis.RedisError as exc:
                raise redis_unavailable(f"reading the worker registry: {type(exc).__name__}") from None
            self._read_at = started
        return self._models

    def _fresh(self) -> bool:
        return time.monotonic() - self._read_at < self.max_age_s

    async def require(self, model: str) -> ServedModel:
        """Return the served model ``model``; raise ApiError 404 (unknown) or 503 (no live worker)."""
        models = await self.models()
        served = models.get(model)
        if served is None and not models:
            raise ApiError(503, "no worker is registered with DIO yet", "service_unavailable",
                           "model_unavailable", retry_after_s=1.0)
        if served is None:
            raise ApiError(404, f"the model {model!r} does not exist: no DIO worker serves it (served: "
                           f"{', '.join(sorted(models))})", "invalid_request_error", "model_not_found", param="model")
        if not served.available:
            raise ApiError(503, f"no live worker serves {model!r} now (its {len(served.workers)} registered workers "
                           "are down or draining)", "service_unavailable", "model_unavailable", retry_after_s=1.0)
        return served
