"""Settings every process shares: where Redis is and how keys are named.

Each process has one pydantic settings object (``DispatcherSettings``, ``WorkerSettings``, ...)
that extends this one; every field can be set by an environment variable ``DIO_<FIELD>``.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict

from dio.protocol.keys import DEFAULT_PREFIX, Keys

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DIO_", extra="ignore")

    # redis://[user:password@]host:port/db, or rediss:// for TLS; unix:///path/to/socket works too.
    redis_url: str = DEFAULT_REDIS_URL
    # ACL user and password, when not in the URL.
    redis_username: str | None = None
    redis_password: str | None = None
    # TLS: a CA bundle to verify the server, and an optional client certificate.
    redis_ca_certs: str | None = None
    redis_certfile: str | None = None
    redis_keyfile: str | None = None
    key_prefix: str = DEFAULT_PREFIX

    @property
    def keys(self) -> Keys:
        return Keys(self.key_prefix)
