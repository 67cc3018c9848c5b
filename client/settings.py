"""Client settings: where Redis is, request defaults, and how long to wait for results.

Every field can be set by an environment variable ``DIO_<FIELD>`` (``DIO_MODEL``,
``DIO_RESULT_TIMEOUT_S``, ...), or passed to ``ClientSettings(...)``.
"""

from __future__ import annotations

from pydantic import Field

from dio.protocol.defaults import DEFAULT_MODEL
from dio.protocol.models import Tier
from dio.protocol.settings import CommonSettings

DEFAULT_MAX_TOKENS = 256
DEFAULT_RESULT_TIMEOUT_S = 600.0  # JobHandle.result() gives up after this long unless told otherwise
CLIENT_RETRY_S = 30.0  # submit/get/status/cancel ride out a Redis outage this long, then raise RedisUnavailable
POLL_INTERVAL_S = 1.0  # a waiter re-reads the job hash this often, in case its notice was lost
POLLED_HASHES_PER_S = 1000  # bulk waiters slow their polling down to about this many hashes a second
SUBMIT_CHUNK = 500  # requests per pipeline round trip in submit_many
READER_BLOCK_MS = 2000  # the reply reader blocks this long per XREAD; below redis-py 8's 5 s socket timeout
READER_BATCH = 1000  # notices read per XREAD
EARLY_NOTICES_MAX = 100_000  # notices kept for handles not registered yet (oldest dropped first)

BATCH_HASH_TTL_S = 30 * 24 * 3600  # a finished batch's progress hash expires after this long
BATCH_JOB_TIMEOUT_S = 7 * 24 * 3600  # an RQ batch runner job is killed after this long
BATCH_CONCURRENCY = 256  # requests of one batch in flight at once
MAX_BATCH_LINE_BYTES = 1 << 20  # an input line longer than this is answered with an error line
MAX_BATCH_FILE_BYTES = 200 * (1 << 20)  # the largest Batch API file a client may upload (OpenAI's limit)
MAX_BATCH_LINES = 50_000  # requests in one Batch API input file at most (OpenAI's limit)
BATCH_FILE_TTL_S = BATCH_HASH_TTL_S  # Batch API files, and ended batches, expire after this long


class ClientSettings(CommonSettings):
    """Settings of the client SDK and the batch runner."""

    model: str = DEFAULT_MODEL
    max_tokens: int = Field(default=DEFAULT_MAX_TOKENS, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    tier: Tier = Tier.interactive
    # None waits forever.
    result_timeout_s: float | None = Field(default=DEFAULT_RESULT_TIMEOUT_S, gt=0)
    poll_interval_s: float = Field(default=POLL_INTERVAL_S, gt=0)
    client_retry_s: float = Field(default=CLIENT_RETRY_S, ge=0)  # DIO_CLIENT_RETRY_S
    submit_chunk: int = Field(default=SUBMIT_CHUNK, ge=1)
    max_batch_file_bytes: int = Field(default=MAX_BATCH_FILE_BYTES, ge=1)  # DIO_MAX_BATCH_FILE_BYTES
