"""Settings every process shares: where Redis is and how keys are named.

Each process has one pydantic settings object (``DispatcherSettings``, ``WorkerSettings``, ...)
that extends this one; every field can be set by an environment variable ``DIO_<FIELD>``.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dio.protocol.keys import DEFAULT_PREFIX, Keys, pool_keys, pool_prefix

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def _database(url: str) -> str:
    """Return the database a redis:// URL's path names ("" for none)."""
    return urlsplit(url).path.strip("/")


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
    # A Redis Cluster (a RedisCluster client, seeded by the URL's node); a redis+cluster:// or
    # rediss+cluster:// URL says the same.
    redis_cluster: bool = False
    # One deployment, one pool of keys (and one slot) per model: see dio.protocol.keys.pool_keys. The
    # key prefix must then begin with a hash tag, which each pool's tag extends.
    shard_by_model: bool = False
    key_prefix: str = DEFAULT_PREFIX

    @field_validator("redis_url")
    @classmethod
    def _cluster_url_names_database_0(cls, url: str) -> str:
        if urlsplit(url).scheme.endswith("+cluster") and _database(url) not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only database 0, not {_database(url)}")
        return url

    @field_validator("redis_cluster")
    @classmethod
    def _cluster_has_database_0(cls, on: bool, info: ValidationInfo) -> bool:
        url = info.data.get("redis_url", "")
        if on and _database(url) not in ("", "0"):
            raise ValueError(f"a Redis Cluster has only database 0; DIO_REDIS_URL names database {_database(url)}")
        return on

    @field_validator("key_prefix")
    @classmethod
    def _sharding_needs_a_hash_tag(cls, prefix: str, info: ValidationInfo) -> str:
        if info.data.get("shard_by_model"):
            pool_prefix(prefix, "model")  # ValueError, saying why, for a prefix without a leading hash tag
        return prefix

    @property
    def keys(self) -> Keys:
        """The deployment's base keys: every key when not sharded; the Batch API's and the pool registry if sharded."""
        return Keys(self.key_prefix)

    def keys_for(self, model: str) -> Keys:
        """The keys of ``model``'s jobs, workers and dispatcher: its pool's when sharded by model, else the base keys.

        ValueError for a model name that cannot name a pool (``dio.protocol.keys.check_model_name``).
        """
        return pool_keys(self.keys, model) if self.shard_by_model else self.keys
