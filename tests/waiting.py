"""Polling for the integration tests: wait until something real has happened, or fail saying what."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0, what: str = "condition") -> None:
    """Return once ``predicate()`` is true; fail the test after ``timeout_s`` naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
