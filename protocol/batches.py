"""The Batch API's wire objects: files and batches in OpenAI's JSON shape, and how Redis holds them.

A file is a hash ``Keys.file(id)`` (``FileObject``'s fields) and a string ``Keys.file_data(id)``
(its bytes). A batch is a hash ``Keys.batch(id)``: ``BatchObject``'s scalar fields, ``metadata``
and ``errors`` as JSON, the request counts as ``total`` / ``completed`` / ``failed``, and the
runner's own fields (``BATCH_INTERNAL_FIELDS``). ``model_dump()`` of either object is the body
OpenAI's HTTP API returns for it.

Statuses, as OpenAI's: ``validating → in_progress → finalizing → completed``; ``failed`` (the
input cannot be run: its lines are not for the batch's endpoint, or the file is gone);
``cancelling → cancelled``; ``expired`` (the completion window passed first).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dio.protocol import defaults as d

COMPLETIONS_ENDPOINT = "/v1/completions"
CHAT_ENDPOINT = "/v1/chat/completions"
BATCH_ENDPOINTS = (COMPLETIONS_ENDPOINT, CHAT_ENDPOINT)
COMPLETION_WINDOWS = {"24h": 24 * 3600.0}  # OpenAI's only window; its length in seconds
INPUT_PURPOSE = "batch"  # the purpose of a file a client uploads
OUTPUT_PURPOSE = "batch_output"  # ... and of the output and error files a runner writes

# Batch-hash fields that are the runner's, not the BatchObject's.
CANCEL_FIELD = "cancel_requested"  # "1": the batch is to stop (its runner cancels its jobs in flight)
OUTPUT_DATA_FIELD = "output_file"  # the output file's id, allocated when the batch starts
ERROR_DATA_FIELD = "error_file"  # the error file's id, likewise
RUNNER_FIELD = "runner"  # the runner that last held it (for ``dio batch status``)
COUNT_FIELDS = ("total", "completed", "failed")
BATCH_INTERNAL_FIELDS = (CANCEL_FIELD, OUTPUT_DATA_FIELD, ERROR_DATA_FIELD, RUNNER_FIELD, "in_flight")


class BatchStatus(str, Enum):
    validating = "validating"
    in_progress = "in_progress"
    finalizing = "finalizing"
    completed = "completed"
    failed = "failed"
    cancelling = "cancelling"
    cancelled = "cancelled"
    expired = "expired"

    @property
    def terminal(self) -> bool:
        return self in (BatchStatus.completed, BatchStatus.failed, BatchStatus.cancelled, BatchStatus.expired)


class _Object(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileObject(_Object):
    """A stored file, as OpenAI's ``GET /v1/files/{id}`` returns it."""

    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(ge=0)
    created_at: int
    expires_at: int | None = None
    filename: str = Field(max_length=d.MAX_METADATA_CHARS)
    purpose: str
    status: Literal["processed"] = "processed"
    status_details: str | None = None


class RequestCounts(_Object):
    total: int = 0
    completed: int = 0
    failed: int = 0


class BatchError(_Object):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class BatchErrors(_Object):
    object: Literal["list"] = "list"
    data: list[BatchError] = Field(default_factory=list)


class BatchObject(_Object):
    """A batch, as OpenAI's ``GET /v1/batches/{id}`` returns it."""

    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    errors: BatchErrors | None = None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    metadata: dict[str, str] | None = None


# The time a batch entered each status (OpenAI's ``*_at`` fields).
STATUS_TIME_FIELDS = {
    BatchStatus.in_progress: "in_progress_at", BatchStatus.finalizing: "finalizing_at",
    BatchStatus.completed: "completed_at", BatchStatus.failed: "failed_at", BatchStatus.expired: "expired_at",
    BatchStatus.cancelling: "cancelling_at", BatchStatus.cancelled: "cancelled_at",
}


def batch_to_hash(batch: BatchObject) -> dict[str, str]:
    """Flatten a BatchObject for HSET (None left out; counts as their own fields)."""
    out: dict[str, str] = {}
    for name, value in batch.model_dump(mode="json", exclude_none=True).items():
        if name in ("object", "request_counts"):
            continue
        out[name] = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    for name in COUNT_FIELDS:
        out[name] = str(getattr(batch.request_counts, name))
    return out


def batch_from_hash(fields: Mapping[str, str]) -> BatchObject:
    """Rebuild a BatchObject from its hash (the runner's fields left out)."""
    data: dict[str, Any] = {}
    for name in BatchObject.model_fields:
        if name in fields and name not in ("object", "request_counts"):
            data[name] = json.loads(fields[name]) if name in ("errors", "metadata") else fields[name]
    data["request_counts"] = {name: int(fields.get(name) or 0) for name in COUNT_FIELDS}
    return BatchObject.model_validate(data)


def file_to_hash(file: FileObject) -> dict[str, str]:
    return {name: str(value) for name, value in file.model_dump(exclude_none=True).items()}


def file_from_hash(fields: Mapping[str, str]) -> FileObject:
    return FileObject.model_validate(dict(fields))
