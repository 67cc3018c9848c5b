"""Requests waiting for a worker, in the order they should be routed (pure: no I/O).

Durability lives in Redis, not here: a request in the backlog is an intake entry this dispatcher
read but has not acknowledged, so it stays in the intake stream's pending list and a restarted or
standby dispatcher reads it again. This class only orders them: interactive first (FIFO), then
batch (FIFO); a batch request that waited ``batch_age_s`` is promoted so batch never starves.
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


class Backlog:
    def __init__(self, batch_age_s: float = 30.0) -> None:
        self.batch_age_s = batch_age_s
        self.interactive: deque[Pending] = deque()
        self.batch: deque[Pending] = deque()

    def __len__(self) -> int:
        return len(self.interactive) + len(self.batch)

    def add(self, item: Pending) -> None:
        (self.batch if item.request.tier == Tier.batch else self.interactive).append(item)

    def promote_aged(self, now: float) -> None:
        """Move batch requests that waited too long to the back of the interactive line."""
        while self.batch and now - self.batch[0].received_at >= self.batch_age_s:
            self.interactive.append(self.batch.popleft())

    def in_order(self) -> Iterator[Pending]:
        """Iterate over a snapshot: interactive first, then batch."""
        yield from list(self.interactive)
        yield from list(self.batch)

    def remove(self, done: set[str]) -> None:
        """Drop the items whose entry ids are in ``done``."""
        if not done:
            return
        self.interactive = deque(p for p in self.interactive if p.entry_id not in done)
        self.batch = deque(p for p in self.batch if p.entry_id not in done)
