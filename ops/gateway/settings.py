"""The gateway's settings: where it listens, its API keys, its limits (``DIO_GATEWAY_*``, ``DIO_API_KEYS``)."""

from __future__ import annotations

from pydantic import Field, SecretStr

from dio.client.settings import ClientSettings

DEFAULT_PORT = 8000
MAX_BODY_BYTES = 16 << 20  # a completion request's body: room for the largest prompt DIO takes, JSON-escaped
FILE_BODY_OVERHEAD_BYTES = 64 << 10  # an upload's multipart framing and form fields beyond the file itself
TIMEOUT_S = 600.0  # a request whose jobs have not ended by then gets 504 (its jobs are cancelled)
REDIS_CONNECTIONS = 1000  # the gateway's Redis connections at most (redis-py's asyncio default is 100)
MODELS_CACHE_S = 1.0  # the worker registry is re-read at most this often per gateway process


class GatewaySettings(ClientSettings):
    """Settings of one gateway process (it is also a DIO client: ``DIO_REDIS_URL``, ``DIO_MAX_TOKENS``, ...)."""

    gateway_host: str = "127.0.0.1"  # DIO_GATEWAY_HOST; 0.0.0.0 to listen on every interface
    gateway_port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)  # DIO_GATEWAY_PORT
    # Comma-separated keys a client must send as "Authorization: Bearer <key>"; unset: no key needed.
    api_keys: SecretStr | None = None  # DIO_API_KEYS
    gateway_max_body_bytes: int = Field(default=MAX_BODY_BYTES, ge=1024)  # DIO_GATEWAY_MAX_BODY_BYTES
    gateway_timeout_s: float = Field(default=TIMEOUT_S, gt=0)  # DIO_GATEWAY_TIMEOUT_S
    gateway_models_cache_s: float = Field(default=MODELS_CACHE_S, ge=0)  # DIO_GATEWAY_MODELS_CACHE_S
    # Redis connections of the gateway's client at most: each stream in flight holds one while it waits.
    gateway_redis_connections: int = Field(default=REDIS_CONNECTIONS, ge=10)  # DIO_GATEWAY_REDIS_CONNECTIONS

    def key_set(self) -> frozenset[str]:
        """Return the accepted API keys (empty: none required)."""
        if self.api_keys is None:
            return frozenset()
        return frozenset(k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip())
