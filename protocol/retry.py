"""One policy for Redis errors, shared by every DIO process: ride the outage out, never exit over it.

A process that loses Redis (connection refused or reset, a timeout, a server still loading its
data, a fresh server without the consumer groups, ...) logs it once, retries with a capped,
jittered exponential backoff, and logs once more when Redis answers again. What happens to the
requests meanwhile is each caller's to say; they are all in Redis, so none is lost.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

from dio.protocol import defaults as d


def backoff_s(attempt: int, min_s: float, max_s: float, jitter: float) -> float:
    """Return the wait before retry number ``attempt`` (1, 2, ...): doubling from ``min_s`` up to ``max_s``.

    ``jitter`` in [0, 1] keeps that share of the second half of the wait, so processes that lost
    Redis together do not all come back in the same millisecond.
    """
    ceiling = min(max_s, min_s * 2.0 ** min(attempt - 1, 60))
    return ceiling * (0.5 + 0.5 * jitter)


class Outage:
    """One process's view of Redis: log a loss once and its end once, and pace the retries (thread-safe)."""

    def __init__(self, logger: logging.Logger, who: str, *, min_s: float = d.REDIS_RETRY_MIN_S,
                 max_s: float = d.REDIS_RETRY_MAX_S, clock: Callable[[], float] = time.monotonic,
                 rng: Callable[[], float] = random.random) -> None:
        self.log = logger
        self.who = who
        self.min_s = min_s
        self.max_s = max_s
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self.since: float | None = None  # when the outage began (None: Redis answers)
        self.failures = 0  # failed calls in the current outage
        self.errors = 0  # failed calls since the process started (metrics)
        self.recoveries = 0  # outages that ended since the process started: Redis reconnects (metrics)

    @property
    def lost(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException) -> float:
        """Record a failed Redis call; return how long to wait before the next try, in seconds."""
        with self._lock:
            self.failures += 1
            self.errors += 1
            if self.since is None:
                self.since = self._clock()
                self.log.warning("%s lost Redis (%s: %s); retrying with backoff", self.who, type(exc).__name__, exc)
            else:
                self.log.debug("%s: Redis still unreachable (%s)", self.who, exc)
            return backoff_s(self.failures, self.min_s, self.max_s, self._rng())

    def ok(self) -> None:
        """Record a Redis call that succeeded (the end of an outage, if one was going on)."""
        if self.since is None:  # the common case, without the lock
            return
        with self._lock:
            if self.since is None:
                return
            self.log.info("%s: Redis is back after %.1f s (%d failed attempts)", self.who,
                          self._clock() - self.since, self.failures)
            self.since, self.failures = None, 0
            self.recoveries += 1
