"""``/v1/files`` and ``/v1/batches``: OpenAI's Batch API, served by ``dio.client.batches``.

The Batch API functions are synchronous (they are also ``dio batch``'s); they run in the thread
pool on the gateway's sync client. ``dio batch-runner`` processes run the batches created here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dio.client.batches import (
    BatchInputError,
    FileTooLarge,
    cancel_batch,
    create_batch,
    file_content,
    get_batch,
    get_file,
    list_batches,
    upload_file,
)
from dio.client.exceptions import RedisUnavailable
from dio.ops.gateway.errors import ApiError, bad_request, redis_unavailable
from dio.ops.gateway.state import gateway_of, json_body

router = APIRouter()

T = TypeVar("T")
MAX_FORM_FIELDS = 8
MAX_LIST_LIMIT = 100


async def _call(request: Request, fn: Callable[..., T], *args: Any) -> T:
    """Run a Batch API function in the thread pool; map its errors to HTTP ones."""
    try:
        return await run_in_threadpool(fn, gateway_of(request).sync_client, *args)
    except FileTooLarge as exc:
        raise ApiError(413, str(exc), "invalid_request_error", "file_too_large") from None
    except BatchInputError as exc:
        raise bad_request(str(exc)) from None
    except (RedisUnavailable, redis.RedisError) as exc:
        raise redis_unavailable(type(exc).__name__) from None


def _not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"no {what} with id {ident!r}", "invalid_request_error", f"{what}_not_found")


async def _lookup(request: Request, fn: Callable[..., T | None], what: str, ident: str) -> T:
    """Run a Batch API lookup by id (``fn(client, ident)``); a 404 when it finds nothing."""
    found = await _call(request, fn, ident)
    if found is None:
        raise _not_found(what, ident)
    return found


@router.post("/v1/files")
async def create_file(request: Request) -> JSONResponse:
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    upload, purpose = form.get("file"), form.get("purpose", "batch")
    if not isinstance(upload, UploadFile):
        raise bad_request("send the file as the multipart form field 'file'", "file")
    if not isinstance(purpose, str):
        raise bad_request("'purpose' must be a form field", "purpose")
    data = await upload.read()
    file = await _call(request, upload_file, data, upload.filename or "batch.jsonl", purpose)
    return JSONResponse(file.model_dump(mode="json"))


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str) -> JSONResponse:
    file = await _lookup(request, get_file, "file", file_id)
    return JSONResponse(file.model_dump(mode="json"))


@router.get("/v1/files/{file_id}/content")
async def retrieve_file_content(request: Request, file_id: str) -> Response:
    content = await _lookup(request, file_content, "file", file_id)
    return Response(content, media_type="application/octet-stream")


@router.post("/v1/batches")
async def create(request: Request) -> JSONResponse:
    body = await json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("input_file_id"), str):
        raise bad_request("'input_file_id' (a file id) is required", "input_file_id")
    endpoint, window = body.get("endpoint"), body.get("completion_window", "24h")
    if not isinstance(endpoint, str) or not isinstance(window, str):
        raise bad_request("'endpoint' and 'completion_window' must be strings", "endpoint")
    batch = await _call(request, create_batch, body["input_file_id"], endpoint, window, body.get("metadata"))
    return JSONResponse(batch.model_dump(mode="json"))


@router.get("/v1/batches/{batch_id}")
async def retrieve(request: Request, batch_id: str) -> JSONResponse:
    batch = await _lookup(request, get_batch, "batch", batch_id)
    return JSONResponse(batch.model_dump(mode="json"))


@router.get("/v1/batches")
async def listing(request: Request, limit: int = 20, after: str | None = None) -> JSONResponse:
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise bad_request(f"'limit' must be between 1 and {MAX_LIST_LIMIT}", "limit")
    page = await _call(request, list_batches, limit + 1, after)  # one more tells whether there are more
    data = [b.model_dump(mode="json") for b in page[:limit]]
    return JSONResponse({"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None, "has_more": len(page) > limit})


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel(request: Request, batch_id: str) -> JSONResponse:
    batch = await _lookup(request, cancel_batch, "batch", batch_id)
    return JSONResponse(batch.model_dump(mode="json"))
