"""Shared fixtures: a real Redis under a unique key prefix, cleaned up after each test.

Integration tests use the server at ``DIO_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``);
when none answers there, a private ``redis-server`` is started for the session (``dio.ops.redis_server``),
so a fresh machine runs every test instead of skipping them. Every test gets its own prefix, a Cluster hash tag such as
``{t1a2b3c4d}:``, so tests never see each other's keys and can run against a shared server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from dio.ops.redis_server import ensure_redis
from dio.protocol.connection import delete_keys
from dio.protocol.keys import Keys
from dio.protocol.settings import CommonSettings

TEST_REDIS_URL = os.environ.get("DIO_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """Return the test server's URL, starting a private server when none answers there."""
    with ensure_redis(TEST_REDIS_URL) as server:
        yield server.url


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """Yield a unique key prefix; delete every key under it after the test."""
    prefix = f"{{t{uuid.uuid4().hex[:8]}}}:"
    yield prefix
    conn = redis.Redis.from_url(redis_url)
    try:
        delete_keys(conn, Keys(prefix))
    finally:
        conn.close()


@pytest.fixture
def settings(redis_url: str, redis_prefix: str) -> CommonSettings:
    """Settings pointing at the test server and prefix (extend with ``Cls(**settings.model_dump())``)."""
    return CommonSettings(redis_url=redis_url, key_prefix=redis_prefix)


@pytest.fixture
def client_settings(settings: CommonSettings):
    """Client settings on the test server; a short poll interval keeps lost-notice tests fast."""
    from dio.client import ClientSettings

    return ClientSettings(**settings.model_dump(), poll_interval_s=0.2)


@pytest.fixture
def backend(client_settings):
    """A fake backend thread that ends every request through the real finish script."""
    from dio.client.testing import EchoBackend

    with EchoBackend(client_settings) as echo:
        yield echo


@pytest.fixture
def client(client_settings):
    """A sync client on the test server."""
    from dio.client import Client

    with Client(client_settings) as dio:
        yield dio
