"""A simulated GPU served over HTTP the way a vLLM OpenAI server is: for testing routers on a laptop.

One asyncio process (aiohttp) serves one or several engines, each on its own port, answering:

- ``POST /v1/completions`` and ``POST /v1/chat/completions``, plain or streamed (SSE ``data: {...}``
  chunks, then ``data: [DONE]``); ``prompt`` as text, token ids, or a list of either;
- ``GET /v1/models``, ``GET /health``, ``GET /load`` (vLLM's ``{"server_load": N}``);
- ``GET /metrics``: Prometheus text with vLLM's metric names (``vllm:num_requests_running``, ...);
- ``GET /get_load``: what the routers' load-aware policies poll. vllm-router 0.1.17 reads
  ``{"load": N}`` (an object); sglang-router 0.3.2 reads SGLang's list
  ``[{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}]`` and sums ``num_tokens``. One JSON
  body cannot be both, so the server's ``load_format`` ("vllm-router" or "sglang") picks the default
  and ``?format=`` overrides it per call. A real vLLM server has no ``/get_load`` (vllm-router then
  sees -1 for every worker): answering it gives the routers more information, not less.

Output length: a request runs to ``max_tokens`` unless its body carries ``dio_eos_tokens`` (a
simulation-only knob, ``EOS_FIELD``): the simulated model then emits EOS after that many tokens, as
``EngineRequest.eos_tokens`` (``ignore_eos`` overrides it, as in vLLM). Benchmarks send the trace's
true output length there and a ``max_tokens`` cap, so a router sees only the cap (the routers
proxy the JSON body with unknown fields untouched; DIO's workers get it through metadata instead).

Prompt length: token ids count exactly; text counts ``ceil(chars / 4)`` tokens (DIO's estimate, as
``dio.protocol.defaults.CHARS_PER_TOKEN``). Prompts that share leading tokens share prefix-cache blocks:
each 512-token block (2048 characters of text) is named by a hash of the whole prompt up to its end,
the last partial block included, so the simulated prefix cache works over HTTP.

Errors answer as vLLM's server does: HTTP 400 with an OpenAI error body for a request the model
cannot take (prompt + max_tokens over the context, bad parameters), 404 for another model name.
The simulated engine recomputes preempted requests as vLLM does; only an engine given a
preemption limit (``max_preemptions``, a what-if) fails a request with ``OutOfMemory``: then the
answer is HTTP 500 ``InternalServerError``, what vLLM's server returns when the
engine fails a request; a stream that has begun carries ``data: {"error": {...}}`` then
``data: [DONE]``, as vLLM's streaming generators do.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from dio.gpu_worker.engine import (
    Engine,
    EngineOutput,
    EngineRequest,
    OutOfMemory,
    RequestRejected,
)
from dio.protocol import openai as openai_request
from dio.protocol.defaults import CHARS_PER_TOKEN, PREFIX_BLOCK_TOKENS

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # vLLM's default for /v1/completions
LOAD_FORMATS = ("vllm-router", "sglang")
TOKEN_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
EOS_FIELD = "dio_eos_tokens"  # where the simulated model stops (simulation only; a real vLLM ignores it)


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def body(self) -> dict[str, Any]:
        """Return the error body: ``{"error": {message, type, param, code}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


# --- prompts ------------------------------------------------------------------------------------


def token_text(token_id: int) -> str:
    """Return the 4-character text of a synthetic token: a space and 3 base-36 digits."""
    n = token_id % len(TOKEN_ALPHABET) ** 3
    digits = [TOKEN_ALPHABET[(n // len(TOKEN_ALPHABET) ** k) % len(TOKEN_ALPHABET)] for k in (2, 1, 0)]
    return " " + "".join(digits)


def text_tokens(text: str) -> int:
    """Return the tokens a text prompt counts for: ``ceil(chars / 4)``, at least 1."""
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def _chained_hashes(blocks: Sequence[bytes]) -> list[int]:
    """Hash each block chained to the one before: equal hashes mean equal prompts up to there."""
    hashes, previous = [], b""
    for block in blocks:
        previous = hashlib.blake2b(previous + block, digest_size=8).digest()
        hashes.append(int.from_bytes(previous, "big", signed=True))
    return hashes


def prefix_hashes_for_ids(token_ids: Sequence[int], block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """Return one hash per ``block_tokens`` block of token ids (the last partial block included)."""
    blocks = [
        b"".join(int(t).to_bytes(4, "little", signed=True) for t in token_ids[i : i + block_tokens])
        for i in range(0, len(token_ids), block_tokens)
    ]
    return _chained_hashes(blocks)


def prefix_hashes_for_text(text: str, block_tokens: int = PREFIX_BLOCK_TOKENS) -> list[int]:
    """Return one hash per block of ``block_tokens * 4`` characters (the last partial block included)."""
    size = block_tokens * CHARS_PER_TOKEN
    return _chained_hashes([text[i : i + size].encode() for i in range(0, len(text), size)])


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine sees it."""

    tokens: int
    prefix_hashes: list[int]
    text: str | None = None
    token_ids: list[int] | None = None


def parse_prompts(value: Any) -> list[Prompt]:
    """Parse a completions ``prompt``: text, token ids, or a non-empty list of either.

    Raises:
        ApiError: 400 for anything else (empty prompts included).
    """
    try:
        prompts = openai_request.parse_prompts(value)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="prompt") from None
    return [_text_prompt(p) if isinstance(p, str) else _ids_prompt(p) for p in prompts]


def _text_prompt(text: str) -> Prompt:
    return Prompt(text_tokens(text), prefix_hashes_for_text(text), text=text)


def _ids_prompt(ids: list[int]) -> Prompt:
    return Prompt(len(ids), prefix_hashes_for_ids(ids), token_ids=list(ids))


def chat_prompt(messages: Any) -> Prompt:
    """Render chat messages as one text prompt (``dio.protocol.openai``'s template); ApiError 400 if invalid."""
    try:
        return _text_prompt(openai_request.messages_to_prompt(messages))
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from None


# --- the served engine ----------------------------------------------------------------------------


@dataclass
class Counters:
    """Monotonic counters for /metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)


@dataclass
class ServedEngine:
    """An engine, the name it is served under, and what /metrics and /get_load need."""

    engine: Engine
    model_name: str
    load_format: str = "vllm-router"
    counters: Counters = field(default_factory=Counters)
    created: int = field(default_factory=lambda: int(time.time()))
    load_polls: int = 0  # GET /get_load answered (how often a router polls: /metrics)

    @property
    def max_model_len(self) -> int:
        return self.engine.capacity().max_model_len

    def waiting_tokens(self) -> int:
        """Return the tokens of the requests waiting for admission (0 for an engine that does not say)."""
        scheduler = getattr(self.engine, "scheduler", None)
        waiting = getattr(scheduler, "_waiting", None) or ()
        return sum(int(getattr(r, "num_tokens", 0)) for r in waiting)


ENGINE_KEY = web.AppKey("served_engine", ServedEngine)


@dataclass
class Job:
    """One engine request of an HTTP request (a prompt, or one of its ``n`` samples)."""

    index: int
    request: EngineRequest
    prompt_index: int = 0  # which prompt of the request (samples of one prompt share it)
    sent_tokens: int = 0  # output tokens already streamed to the client


def _int_param(body: dict[str, Any], name: str, default: int | None, minimum: int = 1) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}", param=name)
    return value


def _float_param(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be a number", param=name)
    return float(value)


def _check_model(served: ServedEngine, body: dict[str, Any]) -> None:
    model = body.get("model")
    if model is not None and model != served.model_name:
        raise ApiError(404, f"The model `{model}` does not exist.", kind="NotFoundError", param="model")


def _check_length(served: ServedEngine, prompt: Prompt, max_tokens: int) -> None:
    limit = served.max_model_len
    if prompt.tokens + max_tokens > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt.tokens + max_tokens} tokens ({prompt.tokens} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param="max_tokens",
        )


def build_jobs(served: ServedEngine, body: dict[str, Any], prompts: list[Prompt], max_tokens: int) -> list[Job]:
    """Return one engine job per prompt and sample, after vLLM's validation."""
    n = _int_param(body, "n", 1) or 1
    seed = body.get("seed")
    eos_tokens = _int_param(body, EOS_FIELD, None)  # the simulated model's EOS; max_tokens still caps it
    jobs = []
    for prompt_index, prompt in enumerate(prompts):
        _check_length(served, prompt, max_tokens)
        for _ in range(n):
            request = EngineRequest(
                id=f"req-{uuid.uuid4().hex}",
                prompt_tokens=prompt.tokens,
                max_tokens=max_tokens,
                prompt=prompt.text,
                prompt_token_ids=prompt.token_ids,
                temperature=_float_param(body, "temperature", 1.0),
                top_p=_float_param(body, "top_p", 1.0),
                seed=seed if isinstance(seed, int) else None,
                ignore_eos=bool(body.get("ignore_eos", False)),
                prefix_hashes=prompt.prefix_hashes or None,
                priority=_int_param(body, "priority", 0, minimum=-(2**31)) or 0,
                eos_tokens=eos_tokens,
            )
            jobs.append(Job(len(jobs), request, prompt_index))
    return jobs


async def run_jobs(served: ServedEngine, jobs: list[Job]) -> AsyncIterator[tuple[Job, EngineOutput]]:
    """Run the jobs concurrently, yielding each output as it comes; the first error stops them all."""
    queue: asyncio.Queue[tuple[Job, EngineOutput | BaseException] | None] = asyncio.Queue()

    async def pump(job: Job) -> None:
        try:
            async for out in served.engine.stream(job.request):
                queue.put_nowait((job, out))
        except Exception as exc:
            queue.put_nowait((job, exc))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(job)) for job in jobs]
    try:
        for _ in range(len(jobs)):
            while (item := await queue.get()) is not None:
                job, out = item
                if isinstance(out, BaseException):
                    raise out
                _count(served, job, out)
                yield job, out
    finally:
        for task in tasks:
            task.cancel()  # a stream cancelled mid-way aborts its request (frees the simulated KV)
        await asyncio.gather(*tasks, return_exceptions=True)


def _count(served: ServedEngine, job: Job, out: EngineOutput) -> None:
    """Count prompt tokens at a job's first token, generated tokens as they come, finishes by reason."""
    counters = served.counters
    if out.output_tokens and not job.sent_tokens:
        counters.prompt_tokens += job.request.prompt_tokens
    counters.generation_tokens += max(0, out.output_tokens - job.sent_tokens)
    if out.finished:
        reason = out.finish_reason or "length"
        counters.finished[reason] = counters.finished.get(reason, 0) + 1


def engine_error(exc: BaseException) -> ApiError:
    """Map an engine exception to vLLM's answer."""
    if isinstance(exc, RequestRejected):
        return ApiError(400, str(exc))
    if isinstance(exc, OutOfMemory):
        return ApiError(500, f"KV cache exhausted: {exc}", kind="InternalServerError")
    return ApiError(500, str(exc) or type(exc).__name__, kind="InternalServerError")


# --- response bodies ------------------------------------------------------------------------------


def new_text(job: Job, out: EngineOutput) -> str:
    """Return the text of the tokens of ``out`` not yet sent, and mark them sent."""
    ids = out.token_ids or []
    text = "".join(token_text(t) for t in ids[job.sent_tokens : out.output_tokens])
    job.sent_tokens = max(job.sent_tokens, out.output_tokens)
    return text


def usage(jobs: list[Job], finals: dict[int, EngineOutput]) -> dict[str, Any]:
    """Return the usage of a request: prompt tokens once per prompt (not per sample), as vLLM counts them."""
    prompt = sum({j.prompt_index: j.request.prompt_tokens for j in jobs}.values())
    completion = sum(out.output_tokens for out in finals.values())
    cached = sum(out.cached_tokens for out in finals.values())
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


@dataclass
class Endpoint:
    """What differs between /v1/completions and /v1/chat/completions."""

    chat: bool

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def prefix(self) -> str:
        return "chatcmpl-" if self.chat else "cmpl-"

    def choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                    "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunk_choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": finish_reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def respond(request: web.Request, served: ServedEngine, endpoint: Endpoint, body: dict[str, Any],
                  jobs: list[Job]) -> web.StreamResponse:
    """Run the jobs and answer in full or as an SSE stream."""
    head = {"id": endpoint.prefix() + uuid.uuid4().hex, "created": int(time.time()), "model": served.model_name}
    if body.get("stream"):
        options = body.get("stream_options") or {}
        return await stream_response(request, served, endpoint, head, jobs, bool(options.get("include_usage")))
    finals: dict[int, EngineOutput] = {}
    texts: dict[int, str] = {j.index: "" for j in jobs}
    try:
        async for job, out in run_jobs(served, jobs):
            texts[job.index] += new_text(job, out)
            if out.finished:
                finals[job.index] = out
    except Exception as exc:
        raise engine_error(exc) from exc
    choices = [endpoint.choice(j.index, texts[j.index], finals[j.index].finish_reason) for j in jobs]
    return web.json_response({**head, "object": endpoint.object, "choices": choices, "usage": usage(jobs, finals)})


async def stream_response(request: web.Request, served: ServedEngine, endpoint: Endpoint, head: dict[str, Any],
                          jobs: list[Job], include_usage: bool) -> web.StreamResponse:
    """Stream SSE chunks: a chunk per engine output, then usage (if asked) and ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)

    async def send(payload: dict[str, Any] | str) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
        await response.write(f"data: {data}\n\n".encode())

    chunk = {**head, "object": endpoint.chunk_object}
    if endpoint.chat:  # vLLM opens each chat choice with the assistant role
        for job in jobs:
            delta = {"index": job.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            await send({**chunk, "choices": [delta]})
    finals: dict[int, EngineOutput] = {}
    try:
        async for job, out in run_jobs(served, jobs):
            if out.finished:
                finals[job.index] = out
            text = new_text(job, out)
            await send({**chunk, "choices": [endpoint.chunk_choice(job.index, text, out.finish_reason)]})
    except ConnectionResetError:
        raise
    except Exception as exc:
        await send(engine_error(exc).body())
    else:
        if include_usage:
            await send({**chunk, "choices": [], "usage": usage(jobs, finals)})
    await send("[DONE]")
    await response.write_eof()
    return response


# --- handlers -------------------------------------------------------------------------------------


async def _json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions."""
    served = request.app[ENGINE_KEY]
    body = await _json_body(request)
    _check_model(served, body)
    if "prompt" not in body:
        raise ApiError(400, "prompt is required", param="prompt")
    prompts = parse_prompts(body["prompt"])
    max_tokens = _int_param(body, "max_tokens", DEFAULT_COMPLETION_MAX_TOKENS)
    jobs = build_jobs(served, body, prompts, max_tokens or DEFAULT_COMPLETION_MAX_TOKENS)
    return await respond(request, served, Endpoint(chat=False), body, jobs)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions."""
    served = request.app[ENGINE_KEY]
    body = await _json_body(request)
    _check_model(served, body)
    prompt = chat_prompt(body.get("messages"))
    max_tokens = _int_param(body, "max_completion_tokens", None) or _int_param(body, "max_tokens", None)
    if max_tokens is None:  # vLLM's default: whatever the context leaves
        max_tokens = max(1, served.max_model_len - prompt.tokens)
    jobs = build_jobs(served, body, [prompt], max_tokens)
    return await respond(request, served, Endpoint(chat=True), body, jobs)


async def models(request: web.Request) -> web.Response:
    """GET /v1/models."""
    served = request.app[ENGINE_KEY]
    card = {"id": served.model_name, "object": "model", "created": served.created, "owned_by": "vllm",
            "root": served.model_name, "parent": None, "max_model_len": served.max_model_len, "permission": []}
    return web.json_response({"object": "list", "data": [card]})


async def health(request: web.Request) -> web.Response:
    """GET /health: 200 with an empty body, as vLLM."""
    return web.Response(status=200)


async def server_load(request: web.Request) -> web.Response:
    """GET /load: vLLM's server-load figure (requests in the engine)."""
    stats = request.app[ENGINE_KEY].engine.stats()
    return web.json_response({"server_load": stats.running + stats.waiting})


def load_report(served: ServedEngine, fmt: str) -> Any:
    """Return /get_load's body in ``fmt``: "vllm-router" (an object) or "sglang" (a list of ranks)."""
    stats = served.engine.stats()
    tokens = stats.kv_used_tokens + served.waiting_tokens()  # SGLang's figure: KV in use plus queued prompts
    rank = {"dp_rank": 0, "num_reqs": stats.running + stats.waiting, "num_waiting_reqs": stats.waiting,
            "num_tokens": tokens}
    if fmt == "sglang":
        return [rank]
    return {"load": tokens, **rank, "num_running_reqs": stats.running, "kv_cache_usage": round(stats.kv_usage, 6)}


async def get_load(request: web.Request) -> web.Response:
    """GET /get_load (``?format=vllm-router|sglang`` overrides the server's format)."""
    served = request.app[ENGINE_KEY]
    fmt = request.query.get("format", served.load_format)
    if fmt not in LOAD_FORMATS:
        raise ApiError(400, f"format must be one of {', '.join(LOAD_FORMATS)}", param="format")
    served.load_polls += 1
    return web.json_response(load_report(served, fmt))


def metrics_text(served: ServedEngine) -> str:
    """Return Prometheus text with vLLM's metric names, labelled with ``model_name``."""
    stats = served.engine.stats()
    counters = served.counters
    labels = f'engine="0",model_name="{served.model_name}"'
    hit_tokens = int(stats.extra.get("prefix_hit_tokens", 0))
    series = [
        ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", stats.running),
        ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", stats.waiting),
        ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", stats.kv_usage),
        ("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage (pre-V1 name).", stats.kv_usage),
        ("vllm:num_preemptions_total", "counter", "Cumulative number of preemptions.", stats.preemptions),
        ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", counters.prompt_tokens),
        ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
         counters.generation_tokens),
        ("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in tokens.", counters.prompt_tokens),
        ("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in tokens.", hit_tokens),
        ("dio_sim:get_load_requests_total", "counter", "GET /get_load answered (a router's load polls).",
         served.load_polls),
    ]
    lines = []
    for name, kind, help_text, value in series:
        base = name.removesuffix("_total") if kind == "counter" else name
        lines += [f"# HELP {base} {help_text}", f"# TYPE {base} {kind}", f"{name}{{{labels}}} {float(value)}"]
    lines += ["# HELP vllm:request_success Count of successfully processed requests.",
              "# TYPE vllm:request_success counter"]
    for reason in sorted({"length", "stop", "abort", *counters.finished}):
        count = float(counters.finished.get(reason, 0))
        lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} {count}')
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics."""
    return web.Response(text=metrics_text(request.app[ENGINE_KEY]), content_type="text/plain", charset="utf-8")


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer ApiError (and unexpected errors) with an OpenAI-style error body."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except (web.HTTPException, ConnectionResetError):
        raise
    except Exception as exc:  # a bug: still answer like a server, and log it
        log.exception("error serving %s", request.path)
        return web.json_response(engine_error(exc).body(), status=500)


def build_app(engine: Engine, model_name: str | None = None, *, load_format: str = "vllm-router") -> web.Application:
    """Return the aiohttp application serving ``engine`` (started and shut down with the app)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024**2)
    app[ENGINE_KEY] = ServedEngine(engine, model_name or engine.capacity().model, load_format)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/load", server_load)
    app.router.add_get("/get_load", get_load)
    app.router.add_get("/metrics", metrics)
    app.on_startup.append(_start_engine)
    app.on_cleanup.append(_stop_engine)
    return app


async def _start_engine(app: web.Application) -> None:
    await app[ENGINE_KEY].engine.start()


async def _stop_engine(app: web.Application) -> None:
    await app[ENGINE_KEY].engine.shutdown()


# --- running servers ------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    """One engine to serve on one port."""

    engine: Engine
    port: int
    model_name: str | None = None


async def start_servers(specs: Sequence[ServerSpec], host: str = "127.0.0.1", *,
                        load_format: str = "vllm-router") -> list[web.AppRunner]:
    """Start one HTTP server per spec on the running loop; return their runners (``cleanup()`` stops one)."""
    runners = []
    for spec in specs:
        runner = web.AppRunner(build_app(spec.engine, spec.model_name, load_format=load_format),
                               handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, spec.port, backlog=1024).start()
        runners.append(runner)
    return runners


def bound_port(runner: web.AppRunner) -> int:
    """Return the port a started server listens on (the one the OS chose for port 0)."""
    return int(runner.addresses[0][1])


async def serve_forever(specs: Sequence[ServerSpec], host: str = "127.0.0.1", *,
                        load_format: str = "vllm-router", ports_file: str | None = None) -> None:
    """Serve every spec until SIGINT or SIGTERM; print the ports (and write them to ``ports_file``)."""
    import signal

    _quiet_handshake_noise()
    runners = await start_servers(specs, host, load_format=load_format)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    ports = [bound_port(runner) for runner in runners]
    if ports_file:  # written whole, then renamed: a reader never sees half a list
        with open(ports_file + ".tmp", "w") as handle:
            json.dump(ports, handle)
        os.replace(ports_file + ".tmp", ports_file)
    print(f"sim-server ready on {host}: {', '.join(map(str, ports))}", flush=True)
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def _quiet_handshake_noise() -> None:
    """Silence aiohttp's tracebacks for HTTP/2 probes (sglang-router tries h2 before HTTP/1.1)."""
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


def sim_specs(profiles: Sequence[str], model: str, base_port: int, *, time_scale: float = 1.0,
              max_num_seqs: int | None = None, kv_capacity_tokens: int | None = None) -> list[ServerSpec]:
    """Return one simulated-GPU server spec per profile, on ports ``base_port``, ``base_port + 1``, ...

    A ``base_port`` of 0 lets the OS choose a free port for each server.

    Raises:
        ValueError: an unknown GPU profile or model, or a model that does not fit.
    """
    from dio.gpu_worker.sim.engine import SimEngine

    options: dict[str, Any] = {"time_scale": time_scale, "kv_capacity_tokens": kv_capacity_tokens}
    if max_num_seqs is not None:
        options["max_num_seqs"] = max_num_seqs
    ports = [base_port + i if base_port else 0 for i in range(len(profiles))]
    engines = [SimEngine(profile, model, **options) for profile in profiles]
    return [ServerSpec(engine, port) for engine, port in zip(engines, ports, strict=True)]
