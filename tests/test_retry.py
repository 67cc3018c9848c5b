"""The one Redis error policy: capped, jittered backoff, and an outage logged once each way (pure)."""

from __future__ import annotations

import logging

import pytest

from dio.protocol.retry import Outage, backoff_s


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [
        (1, 1.0, 0.05),  # the first retry waits the minimum
        (1, 0.0, 0.025),  # jitter takes at most half of it away
        (2, 1.0, 0.1),  # then it doubles...
        (5, 1.0, 0.8),
        (7, 1.0, 2.0),  # ...up to the cap
        (50, 0.0, 1.0),  # and stays there (half of it at the least)
    ],
)
def test_backoff_doubles_up_to_its_cap_with_jitter(attempt, jitter, expected):
    assert backoff_s(attempt, 0.05, 2.0, jitter) == pytest.approx(expected)


def test_an_outage_is_logged_once_when_lost_and_once_when_regained(caplog):
    caplog.set_level(logging.INFO, logger="dio.test")
    clock = iter([10.0, 13.5, 20.0])
    outage = Outage(logging.getLogger("dio.test"), "worker W1", clock=lambda: next(clock), rng=lambda: 1.0)
    outage.ok()  # nothing was lost: nothing to say
    error = ConnectionError("Connection refused")
    delays = [outage.failed(error) for _ in range(4)]
    outage.ok()
    outage.ok()
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["worker W1 lost Redis (ConnectionError: Connection refused); retrying with backoff",
                        "worker W1: Redis is back after 3.5 s (4 failed attempts)"]
    assert delays == [0.05, 0.1, 0.2, 0.4]
    assert not outage.lost and outage.failed(error) == 0.05  # a new outage starts from the minimum again
