"""Requests waiting for a worker, in the order they should be routed (pure: no I/O).

Durability lives in Redis, not here: a request in the backlog is an intake entry this dispatcher
read but has not acknowledged, so it stays in the intake stream's pending list and a restarted or
standby dispatcher reads it again. This class only orders them: interactive requests that can still
be on time first (FIFO), then interactive requests already past their TTFT limit (FIFO), then batch
(FIFO); a batch request that waited ``batch_age_s`` is promoted so batch never starves.

Why late requests go last: once the cluster is full, a FIFO backlog makes every request wait for
all that came before it, so past the knee each one's first token is late and attainment collapses
(measured: 32% at 1.5x DIO's goodput on Azure conversation). A request whose TTFT limit has
already passed misses its SLO whenever it runs; the requests behind it can still make theirs. It
is still served — when capacity frees, or it expires at its deadline (``max_wait_s``) with a
rejection its client reads — so no work is dropped for being late.
It also counts what it holds (requests and bytes of request JSON, the two bounds the router
enforces), and ``DrainRate`` measures how fast a waiting backlog drains.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from dio.protocol.models import Request, Tier


def expired(request: Request, received_at: float, now: float, max_wait_s: float) -> bool:
    """An interactive request stops waiting at its deadline (or ``max_wait_s`` after it arrived); batch never."""
    if request.tier == Tier.batch:
        return False
    deadline = request.deadline_at or received_at + max_wait_s
    return now >= deadline


@dataclass
class Pending:
    """One request waiting in the backlog."""

    entry_id: str  # its intake stream entry (acknowledged only when forwarded or ended)
    request: Request
    request_json: str
    received_at: float
    wait_reason: str | None = None
    size_bytes: int = -1  # the request JSON's UTF-8 length (computed from request_json when not given)

    def __post_init__(self) -> None:
        if self.size_bytes < 0:
            text = self.request_json
            self.size_bytes = len(text) if text.isascii() else len(text.encode("utf-8", "surrogateescape"))

    def release(self) -> None:
        """Drop the request JSON once the item left (forwarded or ended): the backlog's bytes go with it."""
        self.request_json = ""


def ttft_used(item: Pending, now: float) -> float | None:
    """The share of its TTFT limit the request has spent waiting here (None: it has no TTFT limit).

    Counted from when this dispatcher received it, on its own clock: a client whose clock runs
    behind cannot make its requests look late (the intake's own delay, milliseconds, is left out).
    """
    if item.request.ttft_slo_ms is None:
        return None
    return (now - item.received_at) * 1000.0 / item.request.ttft_slo_ms


class Lateness:
    """When a waiting request counts as late: past its TTFT limit, or half of it once the cluster is overloaded.

    Overloaded: the requests recently sent to workers had used ``OVERLOADED_USE`` of their TTFT
    limit on average (an exponential average over about the last 50 dispatches) — those at the
    head of the line start so close to their limit that their prefill makes them late too, and
    FIFO would go on sending them at the expense of those who can still be on time. Measured
    (``dio bench goodput``, virtual, 3 seeds, Azure conversation, chat SLO; see the README): at
    1.5x DIO's goodput attainment 0.32 with one FIFO line, 0.40 with "late = past the limit", 0.54
    with this rule; on arXiv (15 s TTFT, a long backlog that drains in time) the rule never fires
    at its goodput, where "late = half the limit" always would cost 6 points.
    """

    OVERLOADED_USE = 0.85
    OVERLOADED_FRACTION = 0.5  # an overloaded cluster's requests are late past this share of their limit
    WEIGHT = 0.02  # of each dispatch in the average

    def __init__(self) -> None:
        self.used_at_dispatch = 0.0  # the average share of their TTFT limit dispatched requests had used

    def dispatched(self, item: Pending, now: float) -> None:
        used = ttft_used(item, now)
        if used is not None:
            self.used_at_dispatch += self.WEIGHT * (used - self.used_at_dispatch)

    @property
    def overloaded(self) -> bool:
        return self.used_at_dispatch > self.OVERLOADED_USE

    @property
    def fraction(self) -> float:
        """The share of its TTFT limit after which a waiting request is late."""
        return self.OVERLOADED_FRACTION if self.overloaded else 1.0


class Backlog:
    def __init__(self, batch_age_s: float = 30.0, late_last: bool = True) -> None:
        self.batch_age_s = batch_age_s
        self.late_last = late_last
        self.interactive: deque[Pending] = deque()  # interactive requests that can still be on time
        self.late: deque[Pending] = deque()  # interactive requests past their TTFT limit (late_last)
        self.batch: deque[Pending] = deque()
        self.bytes = 0  # request JSON held, the sum of the items' size_bytes

    def __len__(self) -> int:
        return len(self.interactive) + len(self.late) + len(self.batch)

    def add(self, item: Pending) -> None:
        (self.batch if item.request.tier == Tier.batch else self.interactive).append(item)
        self.bytes += item.size_bytes

    def promote_aged(self, now: float) -> None:
        """Move batch requests that waited too long to the back of the interactive line."""
        while self.batch and now - self.batch[0].received_at >= self.batch_age_s:
            self.interactive.append(self.batch.popleft())

    def demote_late(self, now: float, fraction: float = 1.0) -> None:
        """Move interactive requests that waited past ``fraction`` of their TTFT limit behind the others."""
        if not self.late_last or not self.interactive:
            return
        late = [p for p in self.interactive if (ttft_used(p, now) or 0.0) > fraction]
        if not late:
            return
        moved = {id(p) for p in late}
        self.interactive = deque(p for p in self.interactive if id(p) not in moved)
        # Arrival order among the late ones (each demotion brings a newer group).
        self.late = deque(sorted([*self.late, *late], key=lambda p: p.received_at))

    def in_order(self) -> Iterator[Pending]:
        """Iterate over a snapshot: interactive on time, interactive late, then batch."""
        yield from list(self.interactive)
        yield from list(self.late)
        yield from list(self.batch)

    def remove(self, done: set[str]) -> list[Pending]:
        """Drop the items whose entry ids are in ``done``; return them."""
        if not done:
            return []
        removed = [p for p in self.in_order() if p.entry_id in done]
        self.interactive = deque(p for p in self.interactive if p.entry_id not in done)
        self.late = deque(p for p in self.late if p.entry_id not in done)
        self.batch = deque(p for p in self.batch if p.entry_id not in done)
        self.bytes -= sum(p.size_bytes for p in removed)
        return removed


class DrainRate:
    """How many jobs end per second while requests wait: the rate at which a full backlog drains.

    Measured on the router's clock (the ``now`` of each route), over about the last ``window_s``
    seconds, only while requests were waiting (with an empty backlog the cluster ends what it is
    sent, which says how busy it is, not how fast it could go), and from the first job that ended
    while they waited: jobs end in bursts (a batch started together finishes together), and a rate
    counted from before the first one would make the backlog look slower than it is. Unknown
    (None) until ``min_ended`` more jobs ended over at least ``min_span_s``.
    """

    def __init__(self, window_s: float = 30.0, min_span_s: float = 1.0, min_ended: int = 10) -> None:
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.min_ended = min_ended
        self.ended = 0  # jobs that ended, since the start
        self._waiting_from: int | None = None  # jobs ended when requests began to wait
        self._samples: deque[tuple[float, int]] = deque()  # (clock, jobs ended by then)

    def count(self, jobs: int = 1) -> None:
        self.ended += jobs

    def sample(self, now: float, waiting: bool) -> None:
        """Record the clock; ``waiting`` False (an empty backlog) starts the measurement over."""
        if not waiting:
            self._samples.clear()
            self._waiting_from = None
            return
        if self._waiting_from is None:
            self._waiting_from = self.ended
        if not self._samples:
            if self.ended > self._waiting_from:  # the first job ended while requests waited: start here
                self._samples.append((now, self.ended))
            return
        if now - self._samples[-1][0] >= self.min_span_s / 4:
            self._samples.append((now, self.ended))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
            self._samples.popleft()

    def per_s(self) -> float | None:
        """Return the recent drain rate (jobs per second), or None while it is unknown."""
        if len(self._samples) < 2:
            return None
        (t0, n0), (t1, n1) = self._samples[0], self._samples[-1]
        if t1 - t0 < self.min_span_s or n1 - n0 < self.min_ended:
            return None
        return (n1 - n0) / (t1 - t0)
