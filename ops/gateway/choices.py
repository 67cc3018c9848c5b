"""The jobs of one completion request: submit them, then wait for them or stream them.

Every request is n × prompts DIO jobs, one per choice. Whatever ends the request first — its jobs,
a stop sequence, its deadline, an error, or the client going away — the jobs still running are
cancelled (``cancel_later``: a detached task, so that a cancelled HTTP handler still cancels them),
so a job nobody waits for never keeps a GPU busy.

Streaming waits for the first event before it answers: a request DIO rejects at once (shed,
unknown model, too large) still gets its HTTP status (429, 404, 413); once the first token went
out, a later error is a ``data: {"error": ...}`` event, then ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from pydantic import ValidationError

from dio.client.aio import AsyncClient, AsyncJobHandle
from dio.client.exceptions import DIOError, RedisUnavailable, ResultTimeout
from dio.client.stream import StreamEvent
from dio.ops.gateway import bodies
from dio.ops.gateway.errors import ApiError, bad_request, deadline_exceeded, error_for_result, redis_unavailable
from dio.ops.gateway.params import Ask
from dio.ops.gateway.sse import DONE, event
from dio.ops.gateway.stops import StopScanner, cut_at_stop
from dio.protocol.models import JobResult, JobStatus, describe_validation_error

log = logging.getLogger("dio.gateway")

_detached: set[asyncio.Task] = set()  # cancellations in flight (held so they are not garbage-collected)


def cancel_later(client: AsyncClient, handles: list[AsyncJobHandle]) -> int:
    """Cancel every job of ``handles`` not known to have ended, in a task of its own; return how many."""
    pending = [h for h in handles if not h.future.done()]
    for handle in pending:
        task = asyncio.get_running_loop().create_task(_cancel(client, handle.id))
        _detached.add(task)
        task.add_done_callback(_detached.discard)
    return len(pending)


async def _cancel(client: AsyncClient, job_id: str) -> None:
    try:
        await client.cancel(job_id)
    except DIOError as exc:  # Redis stayed away: the job runs to its end, its result unread
        log.warning("could not cancel job %s: %s", job_id, exc)


async def submit(client: AsyncClient, ask: Ask) -> list[AsyncJobHandle]:
    """Submit the request's jobs; ApiError 400 for what the protocol refuses, 503 without Redis."""
    try:
        return await client.submit_many(ask.jobs)
    except ValidationError as exc:
        raise bad_request(describe_validation_error(exc)) from None
    except RedisUnavailable as exc:
        raise redis_unavailable(f"submitting: {type(exc.error).__name__}") from None


@dataclass
class Timing:
    """When the request arrived and how long it may take (its deadline, or the gateway's timeout)."""

    arrived: float  # time.monotonic()
    timeout_s: float

    def left(self) -> float:
        return max(0.0, self.arrived + self.timeout_s - time.monotonic())


async def race(work: Awaitable, disconnected: Callable[[], Awaitable[None]]) -> tuple[bool, object]:
    """Await ``work`` unless the client disconnects first; return (disconnected, work's result)."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
    if not job.done() or job.cancelled():
        return True, None
    return False, job.result()


# --- waiting for every choice ---------------------------------------------------------------------


async def wait_all(client: AsyncClient, handles: list[AsyncJobHandle], timing: Timing) -> list[JobResult]:
    """Return every job's completed result; ApiError for the first that did not complete, or 504 past time."""
    try:
        async for handle in client.as_completed(handles, timeout=timing.left()):
            result = await handle.result(raise_on_error=False)
            if result.status is not JobStatus.completed:
                raise error_for_result(result)
    except ResultTimeout:
        raise deadline_exceeded(timing.timeout_s) from None
    except RedisUnavailable as exc:
        raise redis_unavailable(type(exc.error).__name__) from None
    return [await h.result(raise_on_error=False) for h in handles]


def completion_body(ask: Ask, key: str, handles: list[AsyncJobHandle], results: list[JobResult]) -> dict:
    """The completion object of finished jobs (stop sequences applied)."""
    choices = []
    for index, (handle, result) in enumerate(zip(handles, results, strict=True)):
        text, stopped = cut_at_stop(result.output or "", ask.stops)
        cap = handle.request.max_tokens  # as submitted: the client's, or DIO_MAX_TOKENS
        choices.append(bodies.Choice(index, text, bodies.finish_reason(result.output_tokens, cap, stopped)))
    return bodies.completion(ask.chat, key, int(time.time()), ask.model, choices, usage_of(ask, handles, results))


def usage_of(ask: Ask, handles: list[AsyncJobHandle], results: Sequence[JobResult | None],
             streamed_tokens: list[int] | None = None) -> dict[str, int]:
    """Usage as OpenAI counts it: each prompt once (not once per choice), every choice's output."""
    prompt = completion = 0
    for index, (handle, result) in enumerate(zip(handles, results, strict=True)):
        if index % ask.n == 0:
            counted = result.prompt_tokens if result is not None else None
            prompt += counted or handle.request.prompt_tokens
        if result is not None and result.output_tokens is not None:
            completion += result.output_tokens
        elif streamed_tokens is not None:
            completion += streamed_tokens[index]
    return bodies.usage(prompt, completion)


# --- streaming ---------------------------------------------------------------------------------------

Item = tuple[int, StreamEvent | BaseException]


@dataclass
class ChoiceState:
    scanner: StopScanner
    done: bool = False
    sent_text: bool = False
    output_tokens: int = 0
    result: JobResult | None = None


@dataclass
class Stream:
    """The merged events of a request's jobs, turned into OpenAI chunks."""

    client: AsyncClient
    ask: Ask
    key: str
    handles: list[AsyncJobHandle]
    timing: Timing
    on_first_text: Callable[[], None] = lambda: None
    on_usage: Callable[[dict[str, int]], None] = lambda use: None
    queue: asyncio.Queue[Item] = field(default_factory=asyncio.Queue)
    pumps: list[asyncio.Task] = field(default_factory=list)
    any_text: bool = False  # some text went out (the first token, as this client sees it)
    stopped: set[str] = field(default_factory=set)  # jobs already cancelled at a stop sequence

    def start(self) -> None:
        timeout = self.timing.left()
        self.pumps = [asyncio.ensure_future(self._pump(i, h, timeout)) for i, h in enumerate(self.handles)]

    async def _pump(self, index: int, handle: AsyncJobHandle, timeout: float) -> None:
        try:
            async for ev in handle.stream(timeout=timeout):
                self.queue.put_nowait((index, ev))
        except Exception as exc:  # ResultTimeout, RedisUnavailable, JobNotFound: it ends the request
            self.queue.put_nowait((index, exc))

    async def first(self) -> Item:
        """Wait for the first event; raise ApiError when it already ends the request (nothing sent yet)."""
        index, item = await self.queue.get()
        if isinstance(item, BaseException):
            raise _error_of(item, self.timing)
        if item.result is not None and item.result.status is not JobStatus.completed:
            raise error_for_result(item.result)
        return index, item

    def stop(self) -> int:
        """Stop reading and cancel the jobs still running; return how many were cancelled."""
        for pump in self.pumps:
            pump.cancel()
        return cancel_later(self.client, [h for h in self.handles if h.id not in self.stopped])

    async def chunks(self, first: Item) -> AsyncIterator[bytes]:
        """Yield the SSE events of the whole answer, starting from the event ``first()`` returned."""
        maker = bodies.ChunkMaker(self.ask.chat, self.key, int(time.time()), self.ask.model, self.ask.include_usage)
        states = [ChoiceState(StopScanner(self.ask.stops)) for _ in self.handles]
        if self.ask.chat:
            for index in range(len(self.handles)):
                yield event(maker.role(index))
        item = first
        while True:
            index, ev = item
            try:
                for chunk in self._step(maker, states, index, ev):
                    yield event(chunk)
            except ApiError as exc:
                yield event(bodies.error_event(exc.message, exc.type, exc.code))
                yield DONE
                return
            if all(s.done for s in states):
                break
            item = await self.queue.get()
        use = usage_of(self.ask, self.handles, [s.result for s in states], [s.output_tokens for s in states])
        self.on_usage(use)
        if self.ask.include_usage:
            yield event(maker.usage(use))
        yield DONE

    def _step(self, maker: bodies.ChunkMaker, states: list[ChoiceState], index: int,
              ev: StreamEvent | BaseException) -> list[dict]:
        """The chunks one event makes; raise ApiError when it ends the request with an error."""
        state = states[index]
        if state.done:
            return []  # a choice ended by a stop sequence: its job's late events are dropped
        if isinstance(ev, BaseException):
            raise _error_of(ev, self.timing)
        if ev.restarted:
            if state.sent_text:
                raise ApiError(502, "the worker running this answer died mid-stream and the job runs again "
                               "from the start; the text already sent cannot be taken back: retry the request",
                               "server_error", "stream_restarted")
            return []
        chunks = self._text(maker, state, index, state.scanner.feed(ev.text))
        state.output_tokens = max(state.output_tokens, ev.output_tokens)
        if state.scanner.stopped:
            state.done = True
            self.stopped.add(self.handles[index].id)
            cancel_later(self.client, [self.handles[index]])
            return [*chunks, maker.finish(index, "stop")]
        if ev.result is None:
            return chunks
        if ev.result.status is not JobStatus.completed:
            raise error_for_result(ev.result)
        state.done, state.result = True, ev.result
        chunks += self._text(maker, state, index, state.scanner.flush())
        reason = bodies.finish_reason(ev.result.output_tokens, self.handles[index].request.max_tokens, stopped=False)
        return [*chunks, maker.finish(index, reason)]

    def _text(self, maker: bodies.ChunkMaker, state: ChoiceState, index: int, text: str) -> list[dict]:
        if not text:
            return []
        if not self.any_text:
            self.any_text = True
            self.on_first_text()
        state.sent_text = True
        return [maker.text(index, text)]


def _error_of(exc: BaseException, timing: Timing) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ResultTimeout):
        return deadline_exceeded(timing.timeout_s)
    if isinstance(exc, RedisUnavailable):
        return redis_unavailable(type(exc.error).__name__)
    if isinstance(exc, DIOError):
        return ApiError(500, str(exc), "server_error", "dio_error")
    log.exception("a stream failed", exc_info=exc)
    return ApiError(500, f"internal error: {type(exc).__name__}", "server_error")
