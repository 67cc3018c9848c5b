"""Hand reply-stream notices to the futures of the jobs waiting for them.

One mailbox per client. The reader delivers every notice; a notice for a job nobody waits for
yet (it raced ahead of the handle, or the client was restarted with its id) is kept until a
handle asks, up to a bound beyond which the oldest is dropped (the handle then finds the result
by polling the job hash).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from dio.client.settings import EARLY_NOTICES_MAX
from dio.protocol.models import JobResult


class FutureLike(Protocol):
    """What the mailbox needs of a future; concurrent.futures and asyncio futures both fit."""

    def done(self) -> bool: ...
    def set_result(self, result: Any, /) -> None: ...
    def set_exception(self, exception: BaseException, /) -> None: ...


F = TypeVar("F", bound=FutureLike)


class Mailbox(Generic[F]):
    """Job id -> future of its result, plus notices that arrived before their handle."""

    def __init__(self, new_future: Callable[[], F], early_max: int = EARLY_NOTICES_MAX) -> None:
        self._new_future = new_future
        self._early_max = early_max
        self._lock = threading.Lock()
        self._waiting: dict[str, F] = {}
        self._early: OrderedDict[str, JobResult] = OrderedDict()

    def __len__(self) -> int:
        return len(self._waiting)

    def expect(self, job_id: str) -> F:
        """Return the future of ``job_id``'s result, already resolved if its notice came early."""
        with self._lock:
            future = self._waiting.get(job_id)
            if future is None:
                future = self._new_future()
                early = self._early.pop(job_id, None)
                if early is None:
                    self._waiting[job_id] = future
                else:
                    future.set_result(early)
            return future

    def deliver(self, result: JobResult) -> None:
        """Resolve the future waiting for ``result``, or keep the notice until one is expected."""
        with self._lock:
            future = self._waiting.pop(result.id, None)
            if future is None:
                self._early[result.id] = result
                while len(self._early) > self._early_max:
                    self._early.popitem(last=False)
            elif not future.done():
                future.set_result(result)

    def settle(self, job_id: str, result: JobResult | BaseException, future: F | None = None) -> None:
        """Resolve a job's future from a source other than a notice (polling, a local cancel).

        ``future`` defaults to the one waiting for ``job_id``; nothing happens when none is.
        """
        with self._lock:
            waiting = self._waiting.get(job_id)
            if waiting is not None and (future is None or waiting is future):
                del self._waiting[job_id]
            future = future if future is not None else waiting
            if future is None or future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
