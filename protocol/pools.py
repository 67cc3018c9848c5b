"""The pool registry of a deployment sharded by model (``Keys.pools``, under the base prefix).

Sharded by model (``DIO_SHARD_BY_MODEL``), each model's keys live under their own hash tag
(``dio.protocol.keys.pool_keys``). Whoever needs every pool — the gateway's model list, the batch
runner's lookups by job id, ``dio top``, ``dio inspect``, ``dio reset`` — reads the models from one
set that each worker adds its model to when it registers: a single-key SADD, in the base slot.

A model stays in the set after its last worker left (``dio reset`` clears it): a pool with no
workers reads as one with no workers, as an unsharded deployment with none does.
"""

from __future__ import annotations

from typing import Any

from dio.protocol.keys import BAD_MODEL_NAME, Keys, pool_keys


def _valid(models: set[str]) -> list[str]:
    # Workers register only names that can name a pool; anything else in the set was written by hand.
    return sorted(m for m in models if m and not BAD_MODEL_NAME.search(m))


def read_pools(client: Any, base: Keys) -> list[str]:
    """The models registered as pools under ``base``, sorted (a sync client)."""
    return _valid(client.smembers(base.pools))


async def read_pools_async(client: Any, base: Keys) -> list[str]:
    """The models registered as pools under ``base``, sorted (an asyncio client)."""
    return _valid(await client.smembers(base.pools))


def pool_key_sets(client: Any, base: Keys) -> dict[str, Keys]:
    """Each registered pool's keys by model (empty for a deployment that was never sharded)."""
    return {model: pool_keys(base, model) for model in read_pools(client, base)}


def key_spaces(client: Any, base: Keys) -> dict[str, Keys]:
    """What ``dio top`` and ``dio inspect`` show: each registered pool's keys by model, or ``{"": base}`` unsharded."""
    return pool_key_sets(client, base) or {"": base}


def delete_deployment(client: Any, base: Keys) -> int:
    """Delete every key of a deployment: each registered pool's, then the base prefix's; return how many."""
    from dio.protocol.connection import delete_keys

    pools = pool_key_sets(client, base)  # read before the registry itself goes
    return sum(delete_keys(client, keys) for keys in pools.values()) + delete_keys(client, base)


def count_deployment_keys(client: Any, base: Keys) -> int:
    """Count the keys ``delete_deployment`` would delete."""
    spaces = [*pool_key_sets(client, base).values(), base]
    return sum(1 for keys in spaces for _ in client.scan_iter(match=keys.all_keys_pattern(), count=1000))
