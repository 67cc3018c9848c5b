"""Streaming a job's output as it is generated: ``StreamEvent`` and the iterators behind ``handle.stream()``.

A job submitted with ``stream=True`` has a token stream (``Keys.tokens``) to which its worker
appends text deltas, many jobs' deltas in one pipeline per flush, and an end marker once the job
ended. Each run of the job (an attempt: a job whose worker died runs again on another worker)
tags its entries with its own run id, and every delta carries its offset in that run's text.

What a reader gets is always consistent:

* the ``text`` of the events after the last ``restarted`` one, concatenated, equals the final
  ``result.text`` of a completed job (the last event always carries the job's result, whatever its
  status; when deltas were trimmed away or never streamed, that last event carries the rest);
* when a job runs again after its worker died mid-stream, one event with ``restarted=True`` says
  that the text shown so far is void: the answer starts again from its first character, and
  entries of the abandoned run that arrive late are dropped (never appended to the new answer);
* a delta written twice (a worker's flush retried after a Redis error) is taken once.

A client reads every token stream it follows with its reply reader (one thread or task per
client): the reader's one blocking XREAD names the reply stream and each followed token stream,
so a thousand concurrent streams cost one connection, not a thousand; a new stream wakes the
reader with an entry on the reply stream. The job's result comes through the client's usual
path (its reply notice, or the job hash polled when a notice is lost), so a job cancelled,
rejected or failed before any token ends the stream too. Time to first token is measured here,
on the client's side: ``first_token_at`` is when the first event with text arrived. After the last
event the client deletes the token stream (its worker also gives it a TTL): a second ``stream()``
of the same handle yields one event holding the whole text.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dio.client.exceptions import ResultTimeout
from dio.protocol.keys import (
    TOKEN_COUNT_FIELD,
    TOKEN_END_FIELD,
    TOKEN_OFFSET_FIELD,
    TOKEN_RUN_FIELD,
    TOKEN_TEXT_FIELD,
)
from dio.protocol.models import JobResult, JobStatus

if TYPE_CHECKING:
    from dio.client.aio import AsyncJobHandle
    from dio.client.handle import JobHandle

# A stream that heard nothing this long polls its job hash, in case the job's notice was lost (the
# notice normally ends it; a poll per stream per second would be thousands a second for a gateway).
STREAM_POLL_S = 5.0


class Subscription:
    """One followed token stream: the entries the reply reader read for it, not yet taken."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.last_id = "0-0"  # the reader goes on from here
        self.wake: Callable[[], None] = lambda: None  # set by the iterator: tells it entries came
        self._entries: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()

    def push(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        with self._lock:
            self._entries += entries
            self.last_id = entries[-1][0]
        self.wake()

    def take(self) -> list[tuple[str, dict[str, str]]]:
        with self._lock:
            taken, self._entries = self._entries, []
        return taken


class Subscriptions:
    """The token streams a client follows (thread-safe): what its reply reader's XREAD adds to the reply stream."""

    def __init__(self) -> None:
        self._subs: dict[str, Subscription] = {}
        self._lock = threading.Lock()
        self._woken = False  # a wake-up was sent since the reader last read the offsets
        self._doomed: list[str] = []

    def add(self, key: str) -> Subscription:
        sub = Subscription(key)
        with self._lock:
            self._subs[key] = sub  # a second stream() of one handle takes over from the first
        return sub

    def remove(self, sub: Subscription, delete: bool = False) -> None:
        """Stop following ``sub``; with ``delete``, have the reader delete its key (read to its end)."""
        with self._lock:
            if self._subs.get(sub.key) is sub:
                del self._subs[sub.key]
            if delete:
                self._doomed.append(sub.key)

    def take_doomed(self) -> list[str]:
        """Return the keys of the streams read to their end, for the reader to delete (one DEL for all)."""
        with self._lock:
            doomed, self._doomed = self._doomed, []
        return doomed

    def wake_needed(self) -> bool:
        """Tell a new follower whether to wake the reader (no wake-up is on its way since its last XREAD)."""
        with self._lock:
            needed, self._woken = not self._woken, True
        return needed

    def offsets(self) -> dict[str, str]:
        """Return each followed stream's key and the id its next read starts after (for the reader's XREAD)."""
        with self._lock:
            self._woken = False  # streams followed from now on are not in this read: they wake it again
            return {key: sub.last_id for key, sub in self._subs.items()}

    def deliver(self, key: str, entries: list[tuple[str, dict[str, str]]]) -> bool:
        """Hand entries read from ``key`` to its follower; return False when it is not a followed stream."""
        with self._lock:
            sub = self._subs.get(key)
        if sub is None:
            return False
        if entries:
            sub.push(entries)
        return True


@dataclass(frozen=True)
class StreamEvent:
    """One step of a streamed answer.

    ``text`` is the new text since the previous event (may be ""); ``output_tokens`` counts the
    answer's tokens so far; ``result`` is set on the last event only: the job's terminal state.
    ``restarted`` marks the event after which the answer starts again (its worker died and the job
    runs anew): drop the text received before it. ``received_at`` is when it reached this client.
    """

    text: str
    output_tokens: int
    result: JobResult | None = None
    restarted: bool = False
    received_at: float = field(default_factory=time.time)

    @property
    def done(self) -> bool:
        return self.result is not None


def _parse_int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class StreamAssembler:
    """Turn token-stream entries, then the job's result, into StreamEvents (pure: no I/O)."""

    def __init__(self) -> None:
        self.run: str | None = None  # the run whose text is being shown
        self.ended = False  # the current run's end marker was read: the result is due
        self.output_tokens = 0
        self._abandoned: set[str] = set()  # earlier runs: their late entries are dropped
        self._pieces: list[str] = []
        self._length = 0  # characters of the current run shown so far
        self._gap = False  # entries were trimmed away unread: the rest comes with the result

    def feed(self, fields: Mapping[str, str]) -> list[StreamEvent]:
        """Return the events one entry makes (none for wake-ups, stale runs and garbage)."""
        run = fields.get(TOKEN_RUN_FIELD)
        if not run or run in self._abandoned:
            return []
        events = []
        if run != self.run:
            if self.run is not None:
                self._abandoned.add(self.run)
                events.append(self._restart())
            self.run = run
        if TOKEN_END_FIELD in fields:
            self.ended = True
            return events
        offset, count = _parse_int(fields.get(TOKEN_OFFSET_FIELD)), _parse_int(fields.get(TOKEN_COUNT_FIELD))
        if offset is None or count is None or offset < 0:
            return events
        grew = count > self.output_tokens
        self.output_tokens = max(self.output_tokens, count)
        if self._gap or offset > self._length:
            self._gap = True  # what came between was trimmed (MAXLEN): no text until the result
            return events
        piece = fields.get(TOKEN_TEXT_FIELD, "")[self._length - offset:]  # a delta sent twice overlaps
        if piece or grew:
            self._pieces.append(piece)
            self._length += len(piece)
            events.append(StreamEvent(piece, self.output_tokens))
        return events

    def finish(self, result: JobResult) -> list[StreamEvent]:
        """Return the last events: the rest of the text (or all of it, restarted) and the result."""
        events = []
        rest = ""
        text = result.output if result.status is JobStatus.completed else None
        if text is not None:
            shown = "".join(self._pieces)
            if text.startswith(shown):
                rest = text[len(shown):]
            else:  # what was shown is not this answer's beginning (a run that did not end the job)
                events.append(self._restart())
                rest = text
        tokens = result.output_tokens if result.output_tokens is not None else self.output_tokens
        events.append(StreamEvent(rest, tokens, result=result))
        return events

    def _restart(self) -> StreamEvent:
        self._pieces, self._length, self._gap, self.output_tokens = [], 0, False, 0
        return StreamEvent("", 0, restarted=True)


class _Timing:
    """The stream's deadline and its client-side first-token time."""

    def __init__(self, timeout: float | None, submitted_at: float) -> None:
        self.timeout = timeout
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        self.submitted_at = submitted_at
        self.first_token_at: float | None = None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def wait_s(self, pause: float) -> float:
        return max(0.0, min(pause, self.left()))

    def note(self, events: list[StreamEvent]) -> list[StreamEvent]:
        if self.first_token_at is None:
            self.first_token_at = next((e.received_at for e in events if e.text), None)
        return events


class _FollowedAnswer:
    """What both token streams share: the job, its token stream key, the client-side timing."""

    def __init__(self, handle: JobHandle | AsyncJobHandle, timeout: float | None) -> None:
        client = handle._client
        self.key = client.keys.tokens(handle.id)
        self._timing = _Timing(client.settings.result_timeout_s if timeout is None else timeout,
                               handle.request.submitted_at)

    @property
    def first_token_at(self) -> float | None:
        """When the first event with text reached this client (epoch seconds), or None."""
        return self._timing.first_token_at

    @property
    def ttft_s(self) -> float | None:
        """Time to first token as this client saw it: from submission to the first text."""
        first = self._timing.first_token_at
        return None if first is None else first - self._timing.submitted_at


class TokenStream(_FollowedAnswer):
    """The events of one job's answer as it is generated (``JobHandle.stream()``); iterate once.

    Raises ResultTimeout when the job has not ended within ``timeout`` seconds (None: the client's
    ``result_timeout_s``), JobNotFound when its hash is gone. A Redis outage is ridden out.
    """

    def __init__(self, handle: JobHandle, timeout: float | None) -> None:
        super().__init__(handle, timeout)
        self.handle = handle

    def __iter__(self) -> Iterator[StreamEvent]:
        client, handle, timing = self.handle._client, self.handle, self._timing
        assembler = StreamAssembler()
        ready = threading.Event()
        sub = client.follow_stream(self.key, ready.set)
        handle.future.add_done_callback(lambda _future: ready.set())
        pause = max(client.settings.poll_interval_s, STREAM_POLL_S)
        status: str | None = None
        try:
            while not assembler.ended and not handle.future.done():
                if timing.left() <= 0:
                    raise ResultTimeout(handle.id, timing.timeout or 0.0, status)
                if not ready.wait(timing.wait_s(pause)):  # nothing for a while: is a notice lost?
                    statuses, pause = client._poll_through_outage([handle], STREAM_POLL_S)
                    status = statuses[0] if statuses is not None else status
                ready.clear()
                for _entry_id, fields in sub.take():
                    yield from timing.note(assembler.feed(fields))
            # The reader hands a job's deltas over before its notice; what a lost notice kept, the result has.
            for _entry_id, fields in sub.take():
                yield from timing.note(assembler.feed(fields))
            result = client._wait(handle, max(timing.left(), 0.0) if timing.timeout is not None else None)
        except BaseException:
            client.unfollow_stream(sub, delete=False)
            raise
        client.unfollow_stream(sub, delete=True)
        yield from timing.note(assembler.finish(result))


class AsyncTokenStream(_FollowedAnswer):
    """The events of one job's answer, for ``async for`` (``AsyncJobHandle.stream()``); same contract as TokenStream."""

    def __init__(self, handle: AsyncJobHandle, timeout: float | None) -> None:
        super().__init__(handle, timeout)
        self.handle = handle

    async def __aiter__(self) -> AsyncIterator[StreamEvent]:
        client, handle, timing = self.handle._client, self.handle, self._timing
        assembler = StreamAssembler()
        ready = asyncio.Event()
        sub = await client.follow_stream(self.key, ready.set)
        handle.future.add_done_callback(lambda _future: ready.set())
        pause = max(client.settings.poll_interval_s, STREAM_POLL_S)
        status: str | None = None
        try:
            while not assembler.ended and not handle.future.done():
                if timing.left() <= 0:
                    raise ResultTimeout(handle.id, timing.timeout or 0.0, status)
                try:
                    await asyncio.wait_for(ready.wait(), timing.wait_s(pause))
                except TimeoutError:  # nothing for a while: is a notice lost?
                    statuses, pause = await client._poll_through_outage([handle], STREAM_POLL_S)
                    status = statuses[0] if statuses is not None else status
                ready.clear()
                for _entry_id, fields in sub.take():
                    for event in timing.note(assembler.feed(fields)):
                        yield event
            # The reader hands a job's deltas over before its notice; what a lost notice kept, the result has.
            for _entry_id, fields in sub.take():
                for event in timing.note(assembler.feed(fields)):
                    yield event
            result = await client._wait(handle, max(timing.left(), 0.0) if timing.timeout is not None else None)
        except BaseException:
            client.unfollow_stream(sub, delete=False)
            raise
        await client.unfollow_stream_async(sub)
        for event in timing.note(assembler.finish(result)):
            yield event
