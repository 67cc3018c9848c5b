"""DIO's client SDK: submit LLM requests, wait for results, run offline batches.

    from dio.client import Client

    with Client(redis_url="redis://localhost:6379/0") as dio:
        print(dio.submit("Hello", max_tokens=32).result(timeout=60).output)
"""

from dio.client.aio import AsyncClient, AsyncJobHandle
from dio.client.client import Client
from dio.client.exceptions import (
    DIOError,
    DuplicateJobId,
    JobCancelled,
    JobError,
    JobFailed,
    JobNotFound,
    JobRejected,
    RedisUnavailable,
    ResultTimeout,
)
from dio.client.handle import JobHandle
from dio.client.settings import ClientSettings
from dio.client.stream import AsyncTokenStream, StreamEvent, TokenStream
from dio.protocol.models import JobResult, JobStatus, Request, Tier

__all__ = [
    "AsyncClient",
    "AsyncJobHandle",
    "AsyncTokenStream",
    "Client",
    "ClientSettings",
    "DIOError",
    "DuplicateJobId",
    "JobCancelled",
    "JobError",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRejected",
    "JobResult",
    "JobStatus",
    "RedisUnavailable",
    "Request",
    "ResultTimeout",
    "StreamEvent",
    "Tier",
    "TokenStream",
]
