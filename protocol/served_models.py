"""Which models the registered workers serve, read from the worker registry (``Keys.workers``).

Readers that are not the dispatcher (the gateway's ``/v1/models`` and its model check, the batch
runner's chat templates) need the registry's answer to "who serves model M, and is any of them
alive?" without the dispatcher's routing state. One pipeline reads every registered worker's
model fields and alive key; ``parse_served`` turns the replies into one ``ServedModel`` per model.
Sharded by model, each pool has its own registry: ``read_served_in`` reads those of the pools named.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dio.protocol.keys import Keys, pool_keys

# The worker-hash fields read per worker (WorkerInfo's and WorkerTelemetry's names).
FIELDS = ("model", "chat_template", "eos_token", "max_model_len", "started_at", "draining")


@dataclass
class ServedModel:
    """One model and the workers registered for it."""

    id: str
    workers: list[str] = field(default_factory=list)  # registered worker ids
    live: list[str] = field(default_factory=list)  # of those, alive and not draining: they take new jobs
    chat_template: str | None = None  # a live worker's registered template (None: the fallback renders chat)
    eos_token: str | None = None
    max_model_len: int = 0  # the longest context among its workers
    created: int = 0  # when its first worker registered (epoch s)

    @property
    def available(self) -> bool:
        return bool(self.live)


def queue_reads(pipe: Any, keys: Keys, worker_ids: list[str]) -> None:
    """Add the reads of ``worker_ids``' model fields and alive keys to a pipeline (sync or async)."""
    for worker_id in worker_ids:
        pipe.hmget(keys.worker(worker_id), list(FIELDS))
        pipe.exists(keys.alive(worker_id))


def parse_served(worker_ids: list[str], replies: list[Any]) -> dict[str, ServedModel]:
    """Group the pipeline's replies (``queue_reads``) by model; workers without a hash are skipped."""
    models: dict[str, ServedModel] = {}
    for i, worker_id in enumerate(worker_ids):
        values, alive = replies[2 * i], bool(replies[2 * i + 1])
        row = dict(zip(FIELDS, values, strict=True))
        if not row["model"]:
            continue  # registered in the set, hash gone (expired or being replaced): not serving
        served = models.setdefault(row["model"], ServedModel(row["model"], created=_int(row["started_at"])))
        served.workers.append(worker_id)
        served.max_model_len = max(served.max_model_len, _int(row["max_model_len"]))
        served.created = min(served.created, _int(row["started_at"])) or served.created
        if alive and row["draining"] not in ("1", "true", "True"):
            served.live.append(worker_id)
            if served.chat_template is None and row["chat_template"]:
                served.chat_template, served.eos_token = row["chat_template"], row["eos_token"] or None
    return models


def _int(raw: str | None) -> int:
    try:
        return int(float(raw)) if raw else 0
    except ValueError:
        return 0


def read_served(client: Any, keys: Keys) -> dict[str, ServedModel]:
    """Read the served models with a sync Redis client."""
    worker_ids = sorted(client.smembers(keys.workers))
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe, keys, worker_ids)
    return parse_served(worker_ids, pipe.execute())


async def read_served_async(client: Any, keys: Keys) -> dict[str, ServedModel]:
    """Read the served models with an asyncio Redis client."""
    worker_ids = sorted(await client.smembers(keys.workers))
    pipe = client.pipeline(transaction=False)
    queue_reads(pipe, keys, worker_ids)
    return parse_served(worker_ids, await pipe.execute())


def read_served_in(client: Any, base: Keys, pools: list[str] | None) -> dict[str, ServedModel]:
    """Read the served models of an unsharded deployment (``pools`` None), or of each pool of a sharded one."""
    if pools is None:
        return read_served(client, base)
    served: dict[str, ServedModel] = {}
    for model in pools:  # a pool's workers serve its model only
        served.update(read_served(client, pool_keys(base, model)))
    return served


async def read_served_in_async(client: Any, base: Keys, pools: list[str] | None) -> dict[str, ServedModel]:
    """``read_served_in`` with an asyncio client."""
    if pools is None:
        return await read_served_async(client, base)
    served: dict[str, ServedModel] = {}
    for model in pools:
        served.update(await read_served_async(client, pool_keys(base, model)))
    return served
