"""Redis Cluster clients whose "no node answers" errors are ``redis.ConnectionError``s.

redis-py raises ``RedisClusterException`` — not a ``RedisError`` — when it cannot reach any node of
a cluster (every node down at once) or finds a slot not served (a cluster being reconfigured).
Every DIO process rides out a Redis outage by catching ``redis.RedisError``; without this module
such an outage would escape those handlers and stop the process. Other ``RedisClusterException``s
(a command redis-py refuses in cluster mode) are programming errors and stay as they are.

redis-py's sync cluster client also asks a node for the slot map as it is made, where a client of
one Redis connects on first use. ``LazyRedisCluster`` makes it on first use instead, so a process
started while no node answers waits for the cluster as it waits for a single Redis.

redis-py finds the keys of a command with "movable" keys (XREAD, XREADGROUP, and EVAL/EVALSHA in
a sync pipeline) by asking a node, ``COMMAND GETKEYS``: one more round trip before each blocking
read and each pipelined script — the commands DIO runs most. ``command_keys`` reads them from the
arguments instead, as the server would; other commands go the library's way.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis
import redis.asyncio.cluster as aiocluster
import redis.cluster
from redis._parsers.commands import AsyncCommandsParser
from redis.commands.core import Script
from redis.connection import Encoder
from redis.exceptions import RedisClusterException, SlotNotCoveredError

UNREACHABLE = "Redis Cluster cannot be connected"  # how redis-py words "no node answered"
SCRIPT_COMMANDS = ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO")  # name, script, numkeys, keys..., args...
STREAM_READS = ("XREAD", "XREADGROUP")  # ... STREAMS key [key ...] id [id ...]


def _upper(arg: Any) -> str:
    return (arg.decode() if isinstance(arg, bytes) else str(arg)).upper()


def command_keys(args: tuple[Any, ...]) -> list[Any] | None:
    """The keys of a script or stream-read command (``args[0]`` is its name); None: another command."""
    name = _upper(args[0]) if args else ""
    if name in SCRIPT_COMMANDS and len(args) >= 3:
        return list(args[3:3 + int(args[2])])
    if name in STREAM_READS:
        for at, arg in enumerate(args):
            if isinstance(arg, (str, bytes)) and _upper(arg) == "STREAMS":
                streams = args[at + 1:]
                return list(streams[:len(streams) // 2])
    return None


class LocalKeys:
    """Find the keys of scripts and stream reads locally (``command_keys``), not with ``COMMAND GETKEYS``."""

    def _get_command_keys(self, *args: Any) -> Any:
        keys = command_keys(args)
        return keys if keys is not None else super()._get_command_keys(*args)  # type: ignore[misc]


class AsyncLocalKeysParser(AsyncCommandsParser):
    """The asyncio client's parser, finding the keys of stream reads locally (``command_keys``)."""

    async def get_keys(self, *args: Any) -> Any:
        keys = command_keys(args)
        return keys if keys is not None else await super().get_keys(*args)


@contextmanager
def unreachable_as_connection_error() -> Iterator[None]:
    """Re-raise a cluster that cannot be reached (or a slot no node serves) as ``redis.ConnectionError``."""
    try:
        yield
    except SlotNotCoveredError as exc:
        raise redis.ConnectionError(f"the Redis Cluster does not serve a slot now: {exc}") from exc
    except RedisClusterException as exc:
        if UNREACHABLE not in str(exc):
            raise
        raise redis.ConnectionError(f"no Redis Cluster node answers: {exc}") from exc


class ClusterPipeline(LocalKeys, redis.cluster.ClusterPipeline):
    def execute(self, raise_on_error: bool = True) -> list[Any]:
        with unreachable_as_connection_error():
            return super().execute(raise_on_error)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:  # after WATCH, commands run at once
        with unreachable_as_connection_error():
            return super().execute_command(*args, **kwargs)


class RedisCluster(LocalKeys, redis.RedisCluster):
    """A sync cluster client (see the module docstring); its pipelines are ``ClusterPipeline``s."""

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with unreachable_as_connection_error():
            return super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = ClusterPipeline  # the same object, with the error mapping above
        return pipe


class AsyncClusterPipeline(aiocluster.ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        with unreachable_as_connection_error():
            return await super().execute(raise_on_error, allow_redirections)


class AsyncRedisCluster(aiocluster.RedisCluster):
    """An asyncio cluster client (see the module docstring); its pipelines are ``AsyncClusterPipeline``s."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = AsyncLocalKeysParser()  # made empty like the library's, filled as it connects

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        with unreachable_as_connection_error():
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> AsyncClusterPipeline:
        pipe = super().pipeline(transaction, shard_hint)
        pipe.__class__ = AsyncClusterPipeline
        return pipe


class LazyRedisCluster:
    """A ``RedisCluster`` made on its first use; until a node answers, each call raises ``redis.ConnectionError``.

    Every attribute is the real client's. Scripts registered before it is made get their SHA from
    the options' encoding (as the real client would) and run on it once it is.
    """

    def __init__(self, url: str, options: dict[str, Any]) -> None:
        self._url, self._options = url, options
        self._real: RedisCluster | None = None
        self._lock = threading.Lock()  # the SDK's reply reader and its caller may make it at once

    def _client(self) -> RedisCluster:
        with self._lock:
            if self._real is None:
                with unreachable_as_connection_error():
                    self._real = RedisCluster.from_url(self._url, **self._options)
            return self._real

    def get_encoder(self) -> Encoder:
        return Encoder(self._options.get("encoding", "utf-8"), self._options.get("encoding_errors", "strict"),
                       self._options.get("decode_responses", False))

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # it asks this object for its encoder only, until it runs

    def close(self) -> None:
        with self._lock:
            if self._real is not None:
                self._real.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client(), name)
