"""Open Redis connections from settings (URL, ACL user/password, TLS)."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
import redis.asyncio as aioredis

from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings


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
    if settings.redis_url.startswith("rediss://"):
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


def connect(settings: CommonSettings) -> redis.Redis:
    """Open a client that decodes replies to str (bytes that are not UTF-8 as lone surrogates)."""
    return redis.Redis.from_url(settings.redis_url, **_options(settings))


def connect_async(settings: CommonSettings) -> aioredis.Redis:
    """Open an asyncio client that decodes replies to str (bytes that are not UTF-8 as lone surrogates)."""
    return aioredis.Redis.from_url(settings.redis_url, **_options(settings))


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
