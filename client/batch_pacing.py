"""How many requests a batch keeps in flight: all it may while the cluster is idle, few while other work arrives.

Batch requests are dispatched below interactive ones (tier ``batch``), but once a batch job runs on
a GPU it shares every engine step with the interactive jobs there: its prompt's prefill goes ahead
of theirs, its KV slows their decode. So a batch fills *idle* capacity by holding back. Every
``PACE_INTERVAL_S`` the runner reads how many requests entered the intake since its last read
(the stream's ``entries-added``, Redis ≥ 7) and how many of those the batch runners submitted
(every runner adds its submissions to ``Keys.batch_submitted``); the rest is interactive work.
While any arrives, the limit is ``min_in_flight`` (so the batch always progresses: no starvation)
and the runner cancels its newest jobs beyond it (their lines go again later: a batch job yields
its GPU to interactive work at once); after ``QUIET_READS`` reads in a row without any, the limit
doubles, up to ``concurrency``. On a Redis without ``entries-added`` the pacing is off.

``next_limit`` is the rule (pure); ``OtherArrivals`` the one read.
"""

from __future__ import annotations

import redis

from dio.protocol.keys import Keys

PACE_INTERVAL_S = 0.25  # the runner looks for other arrivals this often
QUIET_READS = 2  # reads in a row without other arrivals before the limit grows
MIN_IN_FLIGHT = 2  # the fewest batch requests in flight (the batch's progress while interactive work runs)


def next_limit(limit: int, others: int, quiet_reads: int, *, floor: int, ceiling: int) -> int:
    """Return the new in-flight limit given the other requests that arrived and the quiet reads so far.

    ``quiet_reads`` counts this read: 0 when ``others`` > 0.
    """
    if others > 0:
        return floor
    if quiet_reads >= QUIET_READS:
        return min(ceiling, max(limit * 2, floor))
    return limit


class OtherArrivals:
    """Counts the requests that entered the intake, net of every batch runner's, between two reads."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def read(self, conn: redis.Redis, keys: Keys, intakes: list[str] | None = None) -> int | None:
        """Return the other requests added since the last read (None: the first read, or not knowable).

        ``intakes``: the streams to count (sharded by model: every pool's intake); None: ``keys.intake``.
        """
        streams = [keys.intake] if intakes is None else intakes
        pipe = conn.pipeline(transaction=False)
        pipe.get(keys.batch_submitted)
        for stream in streams:
            pipe.xinfo_stream(stream)
        submitted_raw, *infos = pipe.execute(raise_on_error=False)
        if isinstance(submitted_raw, redis.ConnectionError | redis.TimeoutError):
            raise submitted_raw
        # An intake not made yet counts nothing added.
        counts = [info.get("entries-added") if isinstance(info, dict) else 0 for info in infos]
        if any(count is None for count in counts):
            return None  # a Redis before 7.0
        now = (sum(int(count or 0) for count in counts), int(submitted_raw or 0))
        last, self._last = self._last, now
        if last is None:
            return None
        return max(0, (now[0] - last[0]) - (now[1] - last[1]))


class Pacer:
    """One batch's in-flight limit, adapted to the cluster's other work (see the module docstring)."""

    def __init__(self, ceiling: int, floor: int = MIN_IN_FLIGHT, adaptive: bool = True) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.adaptive = adaptive
        self.limit = self.floor if adaptive else self.ceiling  # start low: grow once the cluster is seen idle
        self.quiet_reads = 0

    def update(self, others: int | None) -> int:
        """Take one reading (the other requests that arrived; None: unknown); return the limit."""
        if not self.adaptive or others is None:
            return self.limit
        self.quiet_reads = 0 if others > 0 else self.quiet_reads + 1
        self.limit = next_limit(self.limit, others, self.quiet_reads, floor=self.floor, ceiling=self.ceiling)
        return self.limit
