"""What the sync and async clients share: building requests, queueing them, reading job hashes.

Nothing here does I/O of its own: functions add commands to a pipeline the caller executes, or
turn what Redis returned into models, so both clients run the same code.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from dio.client.exceptions import JobCancelled, JobFailed, JobRejected
from dio.client.settings import ClientSettings
from dio.protocol.keys import STATUS_FIELD
from dio.protocol.models import JobResult, JobStatus, Request, from_hash

CANCEL_REASON = "cancelled by the client"


def new_job_id() -> str:
    """Return a fresh job id (a uuid4 in hex)."""
    return uuid.uuid4().hex


def build_request(settings: ClientSettings, reply_to: str, data: Request | Mapping[str, Any]) -> Request:
    """Validate one request, filling the id, the reply address and the settings' defaults.

    Raises pydantic's ValidationError (a ValueError) for anything the protocol forbids, before any
    command reaches Redis. A Request that already names a reply address keeps it (that client
    gets the notice; this one then finds the result by polling the job hash).
    """
    if isinstance(data, Request):
        return data if data.reply_to else data.model_copy(update={"reply_to": reply_to})
    if not isinstance(data, Mapping):
        raise TypeError(f"expected a Request or a dict, got {type(data).__name__}")
    fields: dict[str, Any] = {
        "id": new_job_id(),
        "model": settings.model,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "tier": settings.tier,
        "reply_to": reply_to,
    }
    fields.update(data)
    return Request.model_validate(fields)


def check_unique(requests: list[Request]) -> None:
    """Refuse two requests with one id in one submission (``submit.lua`` would refuse the second)."""
    seen: set[str] = set()
    for req in requests:
        if req.id in seen:
            raise ValueError(f"job id {req.id!r} appears twice in one submission")
        seen.add(req.id)


def check_pool(pool: str | None, requests: list[Request]) -> None:
    """Refuse a request for another model than the client's pool (``pool`` None: not sharded, any model).

    Its job would be written in this pool's slot, where no dispatcher routes its model.
    """
    if pool is None:
        return
    for req in requests:
        if req.model != pool:
            raise ValueError(f"request {req.id} is for the model {req.model!r}, but this client serves the pool of "
                             f"{pool!r} (DIO_SHARD_BY_MODEL is on): submit it through a client of its own pool, "
                             f"e.g. dio.client.pools.ClientPools.for_model({req.model!r})")


def new_job_fields(req: Request) -> dict[str, str]:
    """Return the fields a submission writes in a new job hash (``Scripts.submit`` writes them once)."""
    fields = {STATUS_FIELD: JobStatus.queued.value, "submitted_at": repr(req.submitted_at), "tier": req.tier.value}
    if req.reply_to:
        fields["reply_to"] = req.reply_to
    return fields


SUBMISSION_FIELDS = ("submitted_at", "reply_to")  # what tells a job created by a given request


def made_by(req: Request, fields: list[str | None]) -> bool:
    """Tell whether a job hash's SUBMISSION_FIELDS (HMGET) are the ones ``req``'s submission wrote.

    A submission retried after an ambiguous failure (the reply was lost) finds its own job: that
    one is submitted, not a duplicate.
    """
    return fields == [repr(req.submitted_at), req.reply_to]


def refused_ids(reqs: list[Request], replies: list[Any]) -> list[str]:
    """Return the ids whose ``submit.lua`` reply says the job exists (0), in order."""
    return [req.id for req, reply in zip(reqs, replies, strict=True) if reply == 0]


def parse_job(job_id: str, fields: Mapping[str, str]) -> JobResult | None:
    """Turn a job hash (HGETALL) into a JobResult; None when the hash does not exist."""
    if not fields:
        return None
    return from_hash(JobResult, fields, id=job_id)


def is_terminal(status: str | None) -> bool:
    """Tell whether a raw status string from a job hash is a terminal one."""
    return status is not None and JobStatus(status).terminal


def cancelled_result(job_id: str, worker: str | None) -> JobResult:
    """The terminal state a client writes when it cancels a job (its reservation is released)."""
    return JobResult(id=job_id, status=JobStatus.cancelled, worker=worker, reason=CANCEL_REASON,
                     finished_at=time.time())


def outcome(result: JobResult, raise_on_error: bool) -> JobResult:
    """Return a completed result; raise the matching JobError for any other terminal status."""
    if not raise_on_error or result.status is JobStatus.completed:
        return result
    if result.status is JobStatus.rejected:
        raise JobRejected(result)
    if result.status is JobStatus.failed:
        raise JobFailed(result)
    if result.status is JobStatus.cancelled:
        raise JobCancelled(result)
    return result
