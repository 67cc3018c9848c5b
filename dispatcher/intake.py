"""Read the intake stream: turn entries into backlog items, refuse what is malformed."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from dio.dispatcher.backlog import Pending
from dio.protocol.keys import REQUEST_FIELD
from dio.protocol.models import JobId, JobResult, JobStatus, Request, describe_validation_error

MAX_DEADLETTER_RAW_CHARS = 2000
DEADLETTER_MAXLEN = 10_000  # approximate cap of the dead-letter stream


@dataclass
class InvalidEntry:
    """An intake entry that will not be routed."""

    entry_id: str
    result: JobResult | None  # rejected result to write, when the entry named a job id
    reply_to: str | None
    raw: str  # the entry's payload (truncated), for the dead-letter stream
    error: str


def parse_entry(entry_id: str, fields: Mapping[Any, str | bytes], now: float | None = None) -> Pending | InvalidEntry:
    """Validate one intake entry (any bytes: anyone can XADD to the intake).

    A valid request becomes a backlog item. An invalid one whose id can be read is rejected
    with the validation message (the client sees why); one without a usable id can only be
    dead-lettered, since nobody could ever read a result for it. Bytes that are not UTF-8 make
    an entry invalid like any other fault.
    """
    raw, message = request_text(fields)
    if message is None:
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


def request_text(fields: Mapping[Any, str | bytes]) -> tuple[str, str | None]:
    """Return an entry's request JSON as text, and why it is not UTF-8 (None when it is).

    Connections decode with errors="surrogateescape" (``dio.protocol.connection``): bytes that are
    not UTF-8 arrive as lone surrogates; a connection that does not decode gives bytes. Either way
    the text returned keeps those bytes as surrogates, so a dead-lettered entry is written back as
    it came.
    """
    value = fields.get(REQUEST_FIELD, fields.get(REQUEST_FIELD.encode(), ""))
    try:
        data = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
        return data.decode("utf-8"), None
    except UnicodeEncodeError:  # a surrogate no decoder made: not text that came from bytes
        return str(value), "invalid request: not UTF-8"
    except UnicodeDecodeError as exc:
        offending = f"byte 0x{data[exc.start]:02x} at offset {exc.start}"
        return data.decode("utf-8", "surrogateescape"), f"invalid request: not UTF-8 ({offending})"


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
