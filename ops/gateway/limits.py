"""Request body size limits (413), as ASGI middleware: checked before anything reads the body.

A body announced larger than its route's limit (``Content-Length``) is refused at once; a body sent
without a length (chunked) is counted as it arrives and refused when it passes the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dio.ops.gateway.errors import ApiError

Scope = dict[str, Any]
ASGIApp = Callable[..., Any]


class BodyTooLarge(Exception):
    """Raised from ``receive`` when a body passes its limit (the middleware answers 413)."""


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {limit:,} bytes", "invalid_request_error",
                    "request_too_large")


class BodyLimit:
    """ASGI middleware: refuse HTTP bodies over ``limit_for(path)`` bytes with an OpenAI-shaped 413."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await too_large(limit).response()(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge()
            return message

        async def tracked_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await too_large(limit).response()(scope, receive, send)
