"""Errors the client SDK raises; each job outcome other than ``completed`` has its own."""

from __future__ import annotations

from typing import Any

from dio.protocol.models import JobResult


class DIOError(Exception):
    """Base class of every error the DIO client raises."""


class JobError(DIOError):
    """A job ended without an output; ``result`` holds its terminal state."""

    def __init__(self, result: JobResult, message: str) -> None:
        super().__init__(message)
        self.result = result

    @property
    def job_id(self) -> str:
        return self.result.id


class JobRejected(JobError):
    """DIO refused the job (invalid, cannot fit, or shed under overload); retrying may help."""

    def __init__(self, result: JobResult) -> None:
        self.reason = result.reason or "no reason given"
        self.retry_after_s = result.retry_after_s
        hint = f"; retry after {self.retry_after_s:g} s" if self.retry_after_s is not None else ""
        super().__init__(result, f"job {result.id} rejected: {self.reason}{hint}")


class JobFailed(JobError):
    """The job was accepted but its worker could not finish it."""

    def __init__(self, result: JobResult) -> None:
        self.error = result.error or "unknown error"
        where = f" on worker {result.worker}" if result.worker else ""
        super().__init__(result, f"job {result.id} failed{where}: {self.error}")


class JobCancelled(JobError):
    """The job was cancelled before it finished."""

    def __init__(self, result: JobResult) -> None:
        why = f": {result.reason}" if result.reason else ""
        super().__init__(result, f"job {result.id} was cancelled{why}")


class ResultTimeout(DIOError, TimeoutError):
    """No terminal state arrived within the timeout; the job may still finish later."""

    def __init__(self, job_id: str, timeout_s: float, status: str | None) -> None:
        self.job_id = job_id
        self.timeout_s = timeout_s
        self.status = status
        super().__init__(f"job {job_id} not finished after {timeout_s:g} s (status: {status or 'unknown'})")


class RedisUnavailable(DIOError):
    """Redis stayed unreachable longer than the client's ``client_retry_s``: the call did not complete.

    A submission that raises this may or may not have been accepted: submit again under the same
    id (a job of that id, created by this request, counts as submitted) or read it with ``get()``.
    """

    def __init__(self, what: str, retry_s: float, error: BaseException) -> None:
        self.what = what
        self.retry_s = retry_s
        self.error = error
        super().__init__(f"{what}: Redis unreachable for {retry_s:g} s ({type(error).__name__}: {error})")


class JobNotFound(DIOError, LookupError):
    """The job hash does not exist: the id is unknown, or its result expired."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found (unknown id, or its result expired)")


class DuplicateJobId(DIOError, ValueError):
    """A job with this id exists already: nothing was submitted under it (it would overwrite that job).

    ``job_ids`` are the refused ids; ``submitted`` holds the handles of the requests of the same
    call that were submitted (the ones before the refused chunk, and the others in it).
    """

    def __init__(self, job_ids: list[str], submitted: list[Any]) -> None:
        self.job_ids = job_ids
        self.submitted = submitted
        more = f" (and {len(job_ids) - 1} more)" if len(job_ids) > 1 else ""
        super().__init__(f"job id {job_ids[0]!r}{more} is already taken by an existing job; nothing was submitted "
                         "under it: choose a new id, or read the existing job with get()")
