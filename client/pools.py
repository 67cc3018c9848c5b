"""One client per model pool, for front ends that serve several models (the gateway, the batch runner).

Sharded by model (``DIO_SHARD_BY_MODEL``), a ``Client`` serves one pool: its reply stream, reader
and scripts live in that pool's slot, and a request for another model is refused. ``ClientPools``
(sync) and ``AsyncClientPools`` (asyncio) hold one client per model, made on first use:

    pools = ClientPools()
    handle = pools.for_model("llama-3.1-8b").submit("hello", model="llama-3.1-8b")
    owner = pools.find(job_id)   # the client of the pool that holds the job (None: no pool does)
    pools.close()

Not sharded, ``for_model`` returns the one ordinary client for every model, as before.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar

from dio.client.aio import AsyncClient
from dio.client.client import Client
from dio.client.handle import JobHandle
from dio.client.settings import ClientSettings
from dio.protocol.keys import pool_keys
from dio.protocol.models import Request
from dio.protocol.pools import read_pools, read_pools_async

C = TypeVar("C", Client, AsyncClient)

UNSHARDED = ""  # the one client's place when not sharded by model
REGISTRY_MAX_AGE_S = 1.0  # ClientPools.registered() re-reads the pool registry this often


class _Pools(Generic[C]):
    """The clients by model; ``client`` (if given) serves its own pool and stays its owner's to close."""

    def __init__(self, make: Callable[[ClientSettings], C], settings: ClientSettings | None, client: C | None) -> None:
        self.settings = client.settings if client is not None else (settings or ClientSettings())
        self._make: Callable[[ClientSettings], C] = make
        self._clients: dict[str, C] = {}
        self._given: C | None = client
        if client is not None:
            self._clients[client.pool or UNSHARDED] = client
        self._lock = threading.Lock()  # the gateway's thread pool and the batch runner's threads share one
        self._closed = False

    @property
    def sharded(self) -> bool:
        return self.settings.shard_by_model

    def for_model(self, model: str | None = None) -> C:
        """The client of ``model``'s pool (default: the settings' model), made on first use.

        ValueError for a model name that cannot name a pool (braces, whitespace) when sharded.
        """
        model = model or self.settings.model
        place = model if self.sharded else UNSHARDED
        with self._lock:
            if self._closed:
                raise RuntimeError("these ClientPools are closed")
            client = self._clients.get(place)
            if client is None:
                client = self._clients[place] = self._make(self.settings.model_copy(update={"model": model}))
        return client

    @property
    def home(self) -> C:
        """The client of the settings' own model: the one to use for the deployment's keys (batches, files)."""
        return self.for_model()

    def _candidates(self, registered: list[str]) -> list[str]:
        """The pools to look in: those registered and those a client was made for, in that order."""
        return list(dict.fromkeys([*registered, *(m for m in self._clients if m != UNSHARDED)]))

    def _made(self) -> list[C]:
        with self._lock:
            self._closed = True
            return [c for c in self._clients.values() if c is not self._given]


class ClientPools(_Pools[Client]):
    """Sync clients by model pool (thread-safe)."""

    def __init__(self, settings: ClientSettings | None = None, *, client: Client | None = None) -> None:
        super().__init__(Client, settings, client)
        self._registered: list[str] = []
        self._read_at = -math.inf

    def models(self) -> list[str]:
        """The pools registered in the deployment (empty when not sharded)."""
        return read_pools(self.home.redis, self.settings.keys) if self.sharded else []

    def registered(self) -> list[str] | None:
        """The registered pools, read at most every REGISTRY_MAX_AGE_S (None: not sharded, one pool for all).

        Redis errors propagate (the last answer is kept for the next call).
        """
        if not self.sharded:
            return None
        if time.monotonic() - self._read_at >= REGISTRY_MAX_AGE_S:
            self._registered, self._read_at = self.models(), time.monotonic()
        return self._registered

    def serves(self, model: str) -> bool:
        """Tell whether ``model`` has a registered pool; always True when not sharded (its dispatcher answers).

        Sharded, a job for a model without a pool would wait in an intake no dispatcher reads.
        """
        pools = self.registered()
        return pools is None or model in pools

    def submit_many(self, requests: Iterable[Request | Mapping[str, Any]]) -> list[JobHandle]:
        """Submit each request through its model's pool (``Client.submit_many`` per pool); handles in order.

        Not sharded: the one client's ``submit_many``, as it is.
        """
        items = list(requests)
        if not self.sharded:
            return self.home.submit_many(items)
        by_model: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            by_model.setdefault(self._model_of(item), []).append(index)
        handles: dict[int, JobHandle] = {}
        for model, indexes in by_model.items():
            submitted = self.for_model(model).submit_many([items[i] for i in indexes])
            handles.update(zip(indexes, submitted, strict=True))
        return [handles[i] for i in range(len(items))]

    def _model_of(self, item: Request | Mapping[str, Any]) -> str:
        model = item.model if isinstance(item, Request) else item.get("model")
        return str(model or self.settings.model)

    def find(self, job_id: str) -> Client | None:
        """The client of the pool whose job hash ``job_id`` is (None: no pool holds it, or it expired)."""
        home = self.home
        if not self.sharded:
            return home if home.redis.exists(home.keys.job(job_id)) else None
        models = self._candidates(read_pools(home.redis, self.settings.keys))
        pipe = home.redis.pipeline(transaction=False)  # on a cluster, split by node: one round trip to each
        for model in models:
            pipe.exists(pool_keys(self.settings.keys, model).job(job_id))
        found = [model for model, exists in zip(models, pipe.execute(), strict=True) if exists]
        return self.for_model(found[0]) if found else None

    def close(self) -> None:
        """Close every client made here (not one given to the constructor)."""
        for client in self._made():
            client.close()

    def __enter__(self) -> ClientPools:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClientPools(_Pools[AsyncClient]):
    """Asyncio clients by model pool."""

    def __init__(self, settings: ClientSettings | None = None, *, client: AsyncClient | None = None,
                 make: Callable[[ClientSettings], AsyncClient] = AsyncClient) -> None:
        """``make`` builds each pool's client from its settings (the gateway bounds its connections)."""
        super().__init__(make, settings, client)

    async def models(self) -> list[str]:
        """The pools registered in the deployment (empty when not sharded)."""
        return await read_pools_async(self.home.redis, self.settings.keys) if self.sharded else []

    async def find(self, job_id: str) -> AsyncClient | None:
        """The client of the pool whose job hash ``job_id`` is (None: no pool holds it, or it expired)."""
        home = self.home
        if not self.sharded:
            return home if await home.redis.exists(home.keys.job(job_id)) else None
        models = self._candidates(await read_pools_async(home.redis, self.settings.keys))
        pipe = home.redis.pipeline(transaction=False)
        for model in models:
            pipe.exists(pool_keys(self.settings.keys, model).job(job_id))
        found = [model for model, exists in zip(models, await pipe.execute(), strict=True) if exists]
        return self.for_model(found[0]) if found else None

    async def close(self) -> None:
        """Close every client made here (not one given to the constructor)."""
        for client in self._made():
            await client.close()

    async def __aenter__(self) -> AsyncClientPools:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
