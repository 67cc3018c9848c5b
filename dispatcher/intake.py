"""Read the intake stream: turn entries into backlog items, refuse what is malformed."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError

from dio.dispatcher.backlog import Pending
from dio.protocol.keys import REQUEST_FIELD
from dio.protocol.models import JobId, JobResult, JobStatus, Request, describe_validation_error

MAX_DEADLETTER_RAW_CHARS = 2000


@dataclass
class InvalidEntry:
    """An intake entry that will not be routed."""

    entry_id: str
    result: JobResult | None  # rejected result to write, when the entry named a job id
    reply_to: str | None
    raw: str  # the entry's payload (truncated), for the dead-letter stream
    error: str


def parse_entry(entry_id: str, fields: dict[str, str], now: float | None = None) -> Pending | InvalidEntry:
    """Validate one intake entry.

    A valid request becomes a backlog item. An invalid one whose id can be read is rejected
    with the validation message (the client sees why); one without a usable id can only be
    dead-lettered, since nobody could ever read a result for it.
    """
    raw = fields.get(REQUEST_FIELD, "")
    try:
        request = Request.model_validate_json(raw)
        return Pending(entry_id=entry_id, request=request, request_json=raw, received_at=now or time.time())
    except ValidationError as exc:
        message = describe_validation_error(exc)
    job_id, reply_to = _salvage_ids(raw)
    result = None
    if job_id is not None:
        result = JobResult(id=job_id, status=JobStatus.rejected, reason=message, finished_at=time.time())
    return InvalidEntry(entry_id=entry_id, result=result, reply_to=reply_to, raw=raw[:MAX_DEADLETTER_RAW_CHARS],
                   error=message)


class _Id(BaseModel):
    value: JobId


def _salvage_ids(raw: str) -> tuple[str | None, str | None]:
    """Read the job id and reply address of a request that failed validation, if they are sane."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    return _valid_id(data.get("id")), _valid_id(data.get("reply_to"))


def _valid_id(value: object) -> str | None:
    try:
        return _Id(value=value).value
    except ValidationError:
        return None
