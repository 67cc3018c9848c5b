"""Open Redis connections from settings (URL, ACL user/password, TLS, Redis Cluster).

A Redis Cluster is named by a ``redis+cluster://`` (or ``rediss+cluster://``) URL, or by
``DIO_REDIS_CLUSTER=true`` with a plain one: every process then opens a ``RedisCluster`` client,
which finds the other nodes from the one the URL names. DIO needs nothing else from a cluster:
every key of a deployment shares one hash tag (``dio.protocol.keys``), so each multi-key script,
pipeline and XREADGROUP stays in one slot.
"""

from __future__ import annotations

from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio as aioredis

from dio.protocol.cluster import AsyncRedisCluster, LazyRedisCluster
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}  # -> the scheme redis-py parses


def is_cluster(settings: CommonSettings) -> bool:
    """Return True when the settings name a Redis Cluster (the URL's scheme, or ``redis_cluster``)."""
    return settings.redis_cluster or urlsplit(settings.redis_url).scheme in CLUSTER_SCHEMES


def server_url(url: str) -> str:
    """Return ``url`` with a ``+cluster`` scheme replaced by the plain one (``redis``, ``rediss``)."""
    parts = urlsplit(url)
    plain = CLUSTER_SCHEMES.get(parts.scheme)
    return url if plain is None else parts._replace(scheme=plain).geturl()


def _is_tls(url: str) -> bool:
    return urlsplit(url).scheme in ("rediss", "rediss+cluster")


def _options(settings: CommonSettings) -> dict[str, Any]:
    # Replies are decoded to str; bytes that are not UTF-8 (anyone can XADD to the intake) become
    # lone surrogates instead of a UnicodeDecodeError that would fail the whole read. Whoever parses
    # the value refuses them (``dio.dispatcher.intake``), and writing such a string back stores the
    # original bytes (a dead-lettered entry is kept byte for byte).
    options: dict[str, Any] = {"decode_responses": True, "encoding_errors": "surrogateescape",
                               "health_check_interval": 30}
    return {**options, **connection_options(settings)}


def connection_options(settings: CommonSettings) -> dict[str, Any]:
    """Return the redis-py options that reach the server named by ``settings``: ACL user and password, TLS."""
    options: dict[str, Any] = {}
    if settings.redis_username:
        options["username"] = settings.redis_username
    if settings.redis_password:
        options["password"] = settings.redis_password
    if _is_tls(settings.redis_url):
        if settings.redis_ca_certs:
            options["ssl_ca_certs"] = settings.redis_ca_certs
        if settings.redis_certfile:
            options["ssl_certfile"] = settings.redis_certfile
        if settings.redis_keyfile:
            options["ssl_keyfile"] = settings.redis_keyfile
    return options


def redact_url(url: str) -> str:
    """Return ``url`` with its password (in the user part or a ``password=`` parameter) shown as ``***``."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    in_query = any(name == "password" for name, _ in query)
    if parts.password is None and not in_query:
        return url
    if parts.password is not None:
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hostinfo}")
    if in_query:
        masked = [(name, "***" if name == "password" else value) for name, value in query]
        parts = parts._replace(query=urlencode(masked, safe="*/"))
    return parts.geturl()


def _cluster_url(settings: CommonSettings) -> str:
    """Return the plain URL of a cluster's seed node; refuse a database other than 0 (a cluster has one)."""
    url = server_url(settings.redis_url)
    db = urlsplit(url).path.strip("/")
    if db not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only database 0; the URL names database {db}: {redact_url(url)}")
    return url


def connect(settings: CommonSettings, *, client_name: str | None = None) -> redis.Redis:
    """Open a client that decodes replies to str (bytes that are not UTF-8 as lone surrogates).

    On a cluster it is a ``redis.RedisCluster``, made on first use (``dio.protocol.cluster``: an
    unreachable cluster is a ``redis.ConnectionError``), typed as ``redis.Redis``: it has every
    command and pipeline DIO uses (all keys in one slot), so callers need not tell the two apart.

    Args:
        client_name: the name CLIENT LIST shows for each of its connections.
    """
    options = _options(settings)
    if client_name is not None:
        options["client_name"] = client_name
    if is_cluster(settings):
        return cast(redis.Redis, LazyRedisCluster(_cluster_url(settings), options))
    return redis.Redis.from_url(settings.redis_url, **options)


def connect_async(settings: CommonSettings, *, client_name: str | None = None) -> aioredis.Redis:
    """Open an asyncio client, like ``connect`` (on a cluster an asyncio ``RedisCluster``, typed as Redis)."""
    options = _options(settings)
    if client_name is not None:
        options["client_name"] = client_name
    if is_cluster(settings):
        return cast(aioredis.Redis, AsyncRedisCluster.from_url(_cluster_url(settings), **options))
    return aioredis.Redis.from_url(settings.redis_url, **options)


def delete_keys(client: redis.Redis, keys: Keys, batch: int = 500) -> int:
    """Delete every key under ``keys.prefix`` (SCAN, then DEL in batches); return how many."""
    found = list(client.scan_iter(match=keys.all_keys_pattern(), count=1000))
    for start in range(0, len(found), batch):
        client.delete(*found[start:start + batch])
    return len(found)


def ensure_group(client: redis.Redis, stream: str, group: str) -> None:
    """Create a consumer group (and its stream) if it does not exist yet."""
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise
