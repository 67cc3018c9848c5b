"""The Batch API on Redis: upload a file, create a batch from it, watch it, cancel it, read its results.

The same objects and statuses as OpenAI's Batch API (``dio.protocol.batches``); the gateway's
``/v1/files`` and ``/v1/batches`` serve these functions, ``dio batch ...`` calls them, and
``dio batch-runner`` processes run the batches (``dio.client.stored_batch``).

    file = upload_file(client, Path("requests.jsonl").read_bytes(), "requests.jsonl")
    batch = create_batch(client, file.id, "/v1/chat/completions")
    ...
    batch = get_batch(client, batch.id)  # status, request_counts, output_file_id, error_file_id
    output = file_content(client, batch.output_file_id)

An uploaded batch file is checked whole before it is stored (``BatchInputError`` says which
lines are wrong, and how): UTF-8 JSONL, at most ``MAX_BATCH_LINES`` requests, each line a POST to
``/v1/completions`` or ``/v1/chat/completions`` with a unique ``custom_id`` and a body DIO can
serve. Requests that the protocol then refuses (``max_tokens`` out of range, ...) are answered in
the batch's error file, as OpenAI does. Files are bounded by ``DIO_MAX_BATCH_FILE_BYTES``
(``FileTooLarge``).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import redis

from dio.client.client import Client
from dio.client.exceptions import DIOError
from dio.client.openai_batch import BatchLineError, parse_line
from dio.client.settings import BATCH_FILE_TTL_S, MAX_BATCH_LINE_BYTES, MAX_BATCH_LINES
from dio.protocol.batches import (
    BATCH_ENDPOINTS,
    CANCEL_FIELD,
    CHAT_ENDPOINT,
    COMPLETION_WINDOWS,
    INPUT_PURPOSE,
    BatchObject,
    BatchStatus,
    FileObject,
    RequestCounts,
    batch_from_hash,
    batch_to_hash,
    file_from_hash,
    file_to_hash,
)
from dio.protocol.keys import STATUS_FIELD

__all__ = [
    "BatchHandle", "BatchInputError", "BatchNotFound", "BatchObject", "BatchStatus", "BatchTimeout", "FileObject",
    "FileTooLarge", "RequestCounts", "cancel_batch", "create_batch", "file_content", "get_batch", "get_file",
    "list_batches", "submit_batch", "upload_file",
]

MAX_FILENAME_CHARS = 256
MAX_METADATA_PAIRS = 16  # OpenAI's bounds on a batch's metadata
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_LISTED = 100  # list_batches returns at most this many
ERRORS_SHOWN = 5  # a refused file's message names this many bad lines


class BatchInputError(DIOError, ValueError):
    """A batch file, line, endpoint or option DIO refuses (HTTP 400)."""


class FileTooLarge(BatchInputError):
    """A file over ``DIO_MAX_BATCH_FILE_BYTES`` (HTTP 413)."""


# --- files --------------------------------------------------------------------------------------


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


def upload_file(client: Client, data: bytes, filename: str, purpose: str = "batch") -> FileObject:
    """Check and store a batch input file; return its FileObject."""
    limit = client.settings.max_batch_file_bytes
    if len(data) > limit:
        raise FileTooLarge(f"the file is {len(data):,} bytes; the limit is {limit:,} (DIO_MAX_BATCH_FILE_BYTES)")
    if purpose != INPUT_PURPOSE:
        raise BatchInputError(f"purpose must be {INPUT_PURPOSE!r}, not {purpose!r}")
    if not filename or len(filename) > MAX_FILENAME_CHARS:
        raise BatchInputError(f"filename must be 1 to {MAX_FILENAME_CHARS} characters")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"the file is not UTF-8 text (byte {exc.start})") from None
    check_batch_lines(text)
    now = int(time.time())
    file = FileObject(id=new_file_id(), bytes=len(data), created_at=now, expires_at=now + int(BATCH_FILE_TTL_S),
                      filename=filename, purpose=purpose)
    store_file(client, file, text)
    return file


def store_file(client: Client, file: FileObject, text: str) -> None:
    """Write a file's metadata and content (both expiring after BATCH_FILE_TTL_S)."""
    keys = client.base_keys

    def write(_: int) -> None:
        pipe = client.redis.pipeline(transaction=True)
        pipe.hset(keys.file(file.id), mapping=file_to_hash(file))
        pipe.set(keys.file_data(file.id), text)
        pipe.expire(keys.file(file.id), int(BATCH_FILE_TTL_S))
        pipe.expire(keys.file_data(file.id), int(BATCH_FILE_TTL_S))
        pipe.execute()

    client._retrying("store file", write)


def get_file(client: Client, file_id: str) -> FileObject | None:
    """Return a file's FileObject (None when there is no such file)."""
    fields = client._retrying("get file", lambda _: client.redis.hgetall(client.base_keys.file(file_id)))
    return file_from_hash(fields) if fields.get("id") else None  # a hash without an id: a file half gone


def file_content(client: Client, file_id: str) -> bytes | None:
    """Return a file's bytes (None when there is no such file)."""
    if get_file(client, file_id) is None:
        return None
    text = client._retrying("read file", lambda _: client.redis.get(client.base_keys.file_data(file_id)))
    return (text or "").encode("utf-8", "surrogateescape")


def iter_text_lines(text: str) -> Iterator[tuple[int, bytes]]:
    """Yield (line number from 1, bytes) for each non-blank line of a file's text."""
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            yield line_no, line.encode("utf-8", "surrogateescape")


def check_batch_lines(text: str, endpoint: str | None = None) -> int:
    """Check every line of a batch input file; return how many requests it holds (else BatchInputError)."""
    problems: list[str] = []
    seen: set[str] = set()
    count = 0
    for line_no, raw in iter_text_lines(text):
        count += 1
        if count > MAX_BATCH_LINES:
            raise BatchInputError(f"the file holds more than {MAX_BATCH_LINES:,} requests")
        problem = _line_problem(line_no, raw, seen, endpoint)
        if problem is not None:
            problems.append(problem)
    if count == 0:
        raise BatchInputError("the file holds no requests (one JSON object per line)")
    if problems:
        more = f" (and {len(problems) - ERRORS_SHOWN} more)" if len(problems) > ERRORS_SHOWN else ""
        raise BatchInputError("; ".join(problems[:ERRORS_SHOWN]) + more)
    return count


def _line_problem(line_no: int, raw: bytes, seen: set[str], endpoint: str | None) -> str | None:
    try:
        line = parse_line(line_no, raw if len(raw) <= MAX_BATCH_LINE_BYTES else None, MAX_BATCH_LINE_BYTES)
    except BatchLineError as exc:
        return exc.message
    if line.custom_id in seen:
        return f"line {line_no}: custom_id {line.custom_id!r} appeared on an earlier line"
    seen.add(line.custom_id)
    if endpoint is not None and line.url != endpoint:
        return f"line {line_no}: url {line.url} is not the batch's endpoint {endpoint}"
    return None


# --- batches ------------------------------------------------------------------------------------


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def create_batch(client: Client, input_file_id: str, endpoint: str, completion_window: str = "24h",
                 metadata: dict[str, str] | None = None) -> BatchObject:
    """Create a batch (status ``validating``) for a batch runner to run; return its BatchObject."""
    if endpoint not in BATCH_ENDPOINTS:
        raise BatchInputError(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}, not {endpoint!r}")
    if completion_window not in COMPLETION_WINDOWS:
        raise BatchInputError(f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}, "
                              f"not {completion_window!r}")
    _check_metadata(metadata)
    file = get_file(client, input_file_id)
    if file is None or file.purpose != INPUT_PURPOSE:
        raise BatchInputError(f"input_file_id {input_file_id!r} is no uploaded batch file")
    content = file_content(client, input_file_id)
    if content is None:
        raise BatchInputError(f"input_file_id {input_file_id!r} is no uploaded batch file")
    total = check_batch_lines(content.decode("utf-8", "surrogateescape"), endpoint)
    now = int(time.time())
    batch = BatchObject(id=new_batch_id(), endpoint=endpoint, input_file_id=input_file_id,
                        completion_window=completion_window, status=BatchStatus.validating, created_at=now,
                        expires_at=now + int(COMPLETION_WINDOWS[completion_window]), metadata=metadata)
    batch.request_counts.total = total
    keys = client.base_keys

    def write(_: int) -> None:
        pipe = client.redis.pipeline(transaction=True)
        pipe.hset(keys.batch(batch.id), mapping=batch_to_hash(batch))
        pipe.zadd(keys.batches, {batch.id: now})
        pipe.sadd(keys.active_batches, batch.id)
        pipe.execute()

    client._retrying("create batch", write)
    return batch


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise BatchInputError(f"metadata must be an object of at most {MAX_METADATA_PAIRS} pairs")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str) or len(key) > MAX_METADATA_KEY_CHARS \
                or len(value) > MAX_METADATA_VALUE_CHARS:
            raise BatchInputError(f"metadata keys are strings of at most {MAX_METADATA_KEY_CHARS} characters, "
                                  f"values of at most {MAX_METADATA_VALUE_CHARS}")


def get_batch(client: Client, batch_id: str) -> BatchObject | None:
    """Return a batch's BatchObject (None when there is no such batch)."""
    fields = client._retrying("get batch", lambda _: client.redis.hgetall(client.base_keys.batch(batch_id)))
    return batch_from_hash(fields) if fields.get("endpoint") else None  # run_batch's hashes have none


def list_batches(client: Client, limit: int = 20, after: str | None = None) -> list[BatchObject]:
    """Return up to ``limit`` batches, newest first; ``after``: those created before that batch."""
    limit = max(1, min(limit, MAX_LISTED))
    keys = client.base_keys

    def page(_: int) -> list[BatchObject]:
        start = 0
        if after is not None:
            rank = client.redis.zrevrank(keys.batches, after)
            if rank is None:
                return []
            start = rank + 1
        ids = client.redis.zrevrange(keys.batches, start, start + limit * 2)
        pipe = client.redis.pipeline(transaction=False)
        for batch_id in ids:
            pipe.hgetall(keys.batch(batch_id))
        out, gone = [], []
        for batch_id, fields in zip(ids, pipe.execute(), strict=True):
            if fields.get("endpoint"):
                out.append(batch_from_hash(fields))
            else:
                gone.append(batch_id)
        if gone:
            client.redis.zrem(keys.batches, *gone)  # expired batches leave the index
        return out[:limit]

    return client._retrying("list batches", page)


def cancel_batch(client: Client, batch_id: str) -> BatchObject | None:
    """Ask a batch to stop: ``cancelling`` (its runner cancels its jobs in flight, then ``cancelled``).

    A batch no runner started yet is ``cancelled`` at once; an ended batch is returned as it is.
    None when there is no such batch.
    """
    keys = client.base_keys

    def cancel(_: int) -> BatchObject | None:
        with client.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(keys.batch(batch_id), keys.batch_lease(batch_id))
                    fields = pipe.hgetall(keys.batch(batch_id))
                    if not fields.get("endpoint"):
                        return None
                    status = BatchStatus(fields[STATUS_FIELD])
                    if status.terminal or status is BatchStatus.cancelling:
                        return batch_from_hash(fields)
                    now = str(int(time.time()))
                    update = {CANCEL_FIELD: "1", STATUS_FIELD: BatchStatus.cancelling.value, "cancelling_at": now}
                    unstarted = status is BatchStatus.validating and not pipe.exists(keys.batch_lease(batch_id))
                    if unstarted:
                        update.update({STATUS_FIELD: BatchStatus.cancelled.value, "cancelled_at": now})
                    pipe.multi()
                    pipe.hset(keys.batch(batch_id), mapping=update)
                    if unstarted:
                        pipe.srem(keys.active_batches, batch_id)
                        pipe.expire(keys.batch(batch_id), int(BATCH_FILE_TTL_S))
                    pipe.execute()
                    return batch_from_hash({**fields, **update})
                except redis.WatchError:
                    continue  # the runner changed it meanwhile: read it again

    return client._retrying("cancel batch", cancel)


# --- a handle on one batch (Client.submit_batch) --------------------------------------------------


class BatchHandle:
    """One submitted batch: its progress, its end, its results."""

    def __init__(self, client: Client, batch: BatchObject) -> None:
        self._client = client
        self.batch = batch

    @property
    def id(self) -> str:
        return self.batch.id

    def __repr__(self) -> str:
        return f"<BatchHandle {self.id} {self.batch.status.value}>"

    def refresh(self) -> BatchObject:
        """Read the batch again (status, counts, files) and return it."""
        batch = get_batch(self._client, self.id)
        if batch is None:
            raise BatchNotFound(f"batch {self.id} not found (its record expired)")
        self.batch = batch
        return batch

    def progress(self) -> RequestCounts:
        """Return the request counts now: total, completed (a response), failed (an error)."""
        return self.refresh().request_counts

    def status(self) -> BatchStatus:
        return self.refresh().status

    def wait(self, timeout: float | None = None, poll_s: float = 0.5,
             on_progress: Callable[[BatchObject], None] | None = None) -> BatchObject:
        """Wait until the batch ends and return it; ResultTimeout-like BatchTimeout after ``timeout`` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.refresh().status.terminal:
            if on_progress is not None:
                on_progress(self.batch)
            if deadline is not None and time.monotonic() >= deadline:
                raise BatchTimeout(f"batch {self.id} still {self.batch.status.value} after {timeout:g} s")
            time.sleep(poll_s)
        return self.batch

    def results(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Wait for the end; return every output and error record (OpenAI's line objects), output first."""
        batch = self.wait(timeout)
        records: list[dict[str, Any]] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            data = file_content(self._client, file_id) if file_id else None
            records += [json.loads(line) for line in (data or b"").splitlines() if line.strip()]
        return records

    def cancel(self) -> BatchObject:
        """Ask the batch to stop (``cancelling``, then ``cancelled``); return it."""
        batch = cancel_batch(self._client, self.id)
        if batch is None:
            raise BatchNotFound(f"batch {self.id} not found (its record expired)")
        self.batch = batch
        return batch


class BatchNotFound(DIOError, LookupError):
    """No batch of this id (unknown, or its record expired)."""


class BatchTimeout(DIOError, TimeoutError):
    """The batch did not end within the timeout; it goes on."""


def submit_batch(client: Client, path: str | os.PathLike[str], endpoint: str | None = None,
                 metadata: dict[str, str] | None = None) -> BatchHandle:
    """Upload an OpenAI Batch API input file, create its batch, and return a handle on it."""
    path = Path(path)
    data = path.read_bytes()
    file = upload_file(client, data, path.name)
    return BatchHandle(client, create_batch(client, file.id, endpoint or first_url(data), metadata=metadata))


def first_url(data: bytes) -> str:
    """The ``url`` of a batch file's first line (a batch's endpoint), else /v1/chat/completions."""
    for raw in data.splitlines():
        if raw.strip():
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError):
                break
            return url if url in BATCH_ENDPOINTS else CHAT_ENDPOINT
    return CHAT_ENDPOINT
