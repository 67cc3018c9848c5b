"""The batch runner's in-flight limit: all it may while the cluster is idle, few while other work arrives."""

from __future__ import annotations

import pytest

from dio.client.batch_pacing import QUIET_READS, OtherArrivals, Pacer, next_limit


@pytest.mark.parametrize(("limit", "others", "quiet", "expected"), [
    (256, 3, 0, 4),  # interactive requests arrived: down to the floor at once...
    (4, 1, 0, 4),  # ...never below: the batch keeps progressing
    (4, 0, 1, 4),  # one quiet read is not enough to grow
    (4, 0, QUIET_READS, 8),  # quiet long enough: double
    (200, 0, QUIET_READS + 5, 256),  # ...up to the ceiling
])
def test_next_limit(limit, others, quiet, expected):
    assert next_limit(limit, others, quiet, floor=4, ceiling=256) == expected


def test_a_pacer_starts_low_grows_when_nothing_else_arrives_and_drops_when_something_does():
    pacer = Pacer(ceiling=64, floor=4)
    assert pacer.limit == 4 and pacer.update(None) == 4  # unknown: unchanged
    for _ in range(20):
        pacer.update(0)
    assert pacer.limit == 64
    assert pacer.update(2) == 4 and pacer.quiet_reads == 0


def test_a_greedy_pacer_keeps_its_ceiling():
    pacer = Pacer(ceiling=64, floor=4, adaptive=False)
    assert pacer.update(500) == 64


@pytest.mark.integration
def test_other_arrivals_are_the_intake_net_of_the_batch_runners(client):
    arrivals = OtherArrivals()
    assert arrivals.read(client.redis, client.keys) is None  # the first read is the baseline
    client.redis.xadd(client.keys.intake, {"req": "{}"})  # an interactive request...
    for _ in range(3):  # ...and three a batch runner submitted (and counted)
        client.redis.xadd(client.keys.intake, {"req": "{}"})
    client.redis.incrby(client.keys.batch_submitted, 3)
    assert arrivals.read(client.redis, client.keys) == 1
    assert arrivals.read(client.redis, client.keys) == 0
