"""Errors in OpenAI's JSON shape, and the one table from DIO's outcomes to HTTP statuses.

Every error body is ``{"error": {"message", "type", "param", "code"}}``, as OpenAI's API answers,
so the ``openai`` package raises its usual exceptions (``BadRequestError``, ``RateLimitError``, ...).

A job that did not complete maps to a status by what ended it (``error_for_result``): a rejection by
the reason the dispatcher gave (``REJECTIONS``, first match wins), a failure to 500, a cancellation
not asked for by this request to 500. A rejection with a ``retry_after_s`` (DIO shed it under load)
that matches no row is a 429. Every answer that carries a retry-after hint sends it as
``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms`` (the ``openai`` package reads it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from dio.protocol.models import JobResult, JobStatus


@dataclass(eq=False)  # an exception compares (and hashes) by identity
class ApiError(Exception):
    """An HTTP error answer: status, OpenAI's error fields, and a retry-after hint."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after_s: float | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **self.retry_headers()})

    def retry_headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s))),
                "retry-after-ms": str(max(1, round(self.retry_after_s * 1000)))}


@dataclass(frozen=True)
class Rejection:
    """One row of the table: a rejection whose reason contains ``phrase`` gets this status."""

    phrase: str
    status: int
    type: str
    code: str


# The dispatcher's rejection reasons (dispatcher/router.py, policy.py, filters.py; the intake's
# validation), most specific first: "no capacity before its deadline: no live worker ..." is a 503.
REJECTIONS: tuple[Rejection, ...] = (
    Rejection("invalid request", 400, "invalid_request_error", "invalid_request"),
    Rejection("no worker serves model", 404, "invalid_request_error", "model_not_found"),
    Rejection("too large for every worker", 413, "invalid_request_error", "context_length_exceeded"),
    Rejection("no live worker", 503, "service_unavailable", "model_unavailable"),
    Rejection("no worker registered", 503, "service_unavailable", "model_unavailable"),
    Rejection("no capacity before its deadline", 504, "timeout", "deadline_exceeded"),
    Rejection("overloaded", 429, "rate_limit_error", "overloaded"),
    Rejection("cannot finish before its deadline", 429, "rate_limit_error", "shed"),
    Rejection("cannot meet its SLO", 429, "rate_limit_error", "shed"),
)


def error_for_result(result: JobResult) -> ApiError:
    """Return the HTTP error for a job that ended without completing."""
    if result.status is JobStatus.rejected:
        return _rejection(result)
    if result.status is JobStatus.failed:
        return ApiError(500, f"the job failed: {result.error or 'unknown error'}", "server_error", "job_failed")
    if result.status is JobStatus.cancelled:
        return ApiError(500, f"the job was cancelled: {result.reason or 'by another client'}", "server_error",
                        "job_cancelled")
    return ApiError(500, f"the job ended {result.status.value}", "server_error")


def _rejection(result: JobResult) -> ApiError:
    reason = result.reason or "no reason given"
    message = f"rejected: {reason}"
    for row in REJECTIONS:
        if row.phrase in reason:
            return ApiError(row.status, message, row.type, row.code, retry_after_s=result.retry_after_s)
    if result.retry_after_s is not None:  # a load rejection this table does not name yet
        return ApiError(429, message, "rate_limit_error", "overloaded", retry_after_s=result.retry_after_s)
    return ApiError(400, message, "invalid_request_error", "rejected")  # e.g. the worker's engine refused it


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request", param=param)


def deadline_exceeded(seconds: float) -> ApiError:
    return ApiError(504, f"no answer within {seconds:g} s (its deadline or the gateway's timeout); the job "
                    "was cancelled", "timeout", "deadline_exceeded")


def redis_unavailable(what: str) -> ApiError:
    return ApiError(503, f"DIO's Redis is unreachable ({what}); try again", "service_unavailable",
                    "redis_unavailable", retry_after_s=1.0)
