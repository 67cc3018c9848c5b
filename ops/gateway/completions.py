"""``POST /v1/completions`` and ``POST /v1/chat/completions``, plain and streamed (``stream: true``)."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dio.ops.gateway.choices import Stream, Timing, cancel_later, completion_body, race, submit, wait_all
from dio.ops.gateway.errors import ApiError
from dio.ops.gateway.params import Ask, parse_chat, parse_completion, parse_model
from dio.ops.gateway.sse import HEADERS, EventStreamResponse
from dio.ops.gateway.state import Gateway, gateway_of, json_body, wait_disconnect

router = APIRouter()

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
CLIENT_CLOSED = 499  # nginx's status for a client that closed the connection first (nobody reads it)
JOB_IDS_HEADER = "X-DIO-Job-Ids"  # the DIO jobs of the request, comma-separated, in choice order


@router.post(COMPLETIONS)
async def completions(request: Request) -> Response:
    return await _serve(request, chat=False)


@router.post(CHAT)
async def chat_completions(request: Request) -> Response:
    return await _serve(request, chat=True)


async def _serve(request: Request, chat: bool) -> Response:
    arrived = time.monotonic()
    gw = gateway_of(request)
    raw = await json_body(request)
    served = await gw.catalog.require(parse_model(raw))
    ask = parse_chat(raw, served.chat_template, served.eos_token) if chat else parse_completion(raw)
    timing = Timing(arrived, min(ask.deadline_s or math.inf, gw.settings.gateway_timeout_s))
    client = gw.pools.for_model(served.id)  # sharded by model: the client of its pool (its reply stream there)
    handles = await submit(client, ask)
    route = CHAT if chat else COMPLETIONS
    gw.hooks.jobs_submitted(route, ask.model, len(handles))
    headers = {JOB_IDS_HEADER: ",".join(h.id for h in handles)}
    if ask.stream:
        return await _stream(request, gw, ask, route, Stream(client, ask, handles[0].id, handles, timing), headers)
    try:
        gone, results = await race(wait_all(client, handles, timing), lambda: wait_disconnect(request))
    except ApiError:
        cancel_later(client, handles)
        raise
    if gone:
        gw.hooks.client_disconnected(route, cancel_later(client, handles))
        return Response(status_code=CLIENT_CLOSED)
    assert isinstance(results, list)
    body = completion_body(ask, handles[0].id, handles, results)
    gw.hooks.tokens(route, ask.model, body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
    return JSONResponse(body, headers=headers)


async def _stream(request: Request, gw: Gateway, ask: Ask, route: str, stream: Stream,
                  headers: dict[str, str]) -> Response:
    """Answer with the first event's status (an error before any token is a plain HTTP error), then stream."""
    arrived = stream.timing.arrived
    stream.on_first_text = lambda: gw.hooks.first_token(route, ask.model, time.monotonic() - arrived)
    stream.on_usage = lambda use: gw.hooks.tokens(route, ask.model, use["prompt_tokens"], use["completion_tokens"])
    stream.start()
    try:
        gone, first = await race(stream.first(), lambda: wait_disconnect(request))
    except ApiError:
        stream.stop()
        raise
    if gone:
        gw.hooks.client_disconnected(route, stream.stop())
        return Response(status_code=CLIENT_CLOSED)

    async def body():  # type: ignore[no-untyped-def]
        finished = False
        try:
            async for chunk in stream.chunks(first):  # type: ignore[arg-type]
                yield chunk
            finished = True
        finally:
            cancelled = stream.stop()  # a disconnect lands here too (the response cancels this iterator)
            if not finished:
                gw.hooks.client_disconnected(route, cancelled)

    return EventStreamResponse(body(), headers={**HEADERS, **headers})
