"""Server-sent events as OpenAI streams them: ``data: <json>`` events, ending with ``data: [DONE]``.

``EventStreamResponse`` watches for the client going away for the whole stream, whatever ASGI
version the server speaks (a disconnect cancels the body iterator, whose cleanup cancels the jobs),
instead of noticing only at the next write.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from starlette.responses import StreamingResponse

DONE = b"data: [DONE]\n\n"
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy may hold events back


def event(payload: dict[str, Any]) -> bytes:
    """One SSE event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """A ``text/event-stream`` response that stops its body iterator as soon as the client disconnects."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async with anyio.create_task_group() as group:

            async def stream_then_stop() -> None:
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke under a write: the same as a disconnect
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream_then_stop)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()
        # A disconnect may have left the iterator suspended at a yield: close it now, so its cleanup
        # (cancelling the jobs) runs at once rather than when it is garbage-collected.
        aclose = getattr(self.body_iterator, "aclose", None)
        if aclose is not None:
            with anyio.CancelScope(shield=True):
                await aclose()
