"""Named routing policies, each one composition of filters, scorers and a picker.

``dio`` is DIO's policy; the others are the baselines the benchmarks compare it with. They share
the liveness, model and queue-bound filters; only DIO adds KV admission and its scorers.
"""

from __future__ import annotations

from collections.abc import Callable

from dio.dispatcher import filters, pickers, scorers
from dio.dispatcher.policy import Policy


def _common(prefetch: int) -> list:
    return [filters.ServesModel(), filters.Alive(), filters.QueueBound(prefetch)]


def dio(prefetch: int = 2, seed: int | None = None, shed_late: bool = True, shed_margin: float = 1.0,
        **_: object) -> Policy:
    """NLMS latency (net of prefix-cache hits) + interference + queue wait + KV headroom + deadlines.

    Under KV admission. ``shed_late``: reject a request predicted to miss its deadline on
    every worker, with a retry-after, instead of running it late.
    """
    return Policy(
        name="dio",
        filters=[filters.ServesModel(), filters.FitsWhenIdle(), filters.Alive(), filters.KvAdmission(),
                 filters.QueueBound(prefetch), filters.ColdStartProbe()],
        scorers=[(scorers.PredictedLatency(), 1.0), (scorers.Interference(), 1.0), (scorers.QueueWait(), 1.0),
                 (scorers.KvHeadroom(), 1.0),
                 (scorers.DeadlineFeasibility(), 1.0), (scorers.ProtectsDeadlines(), 1.0)],
        picker=pickers.MinCost(seed),
        shed_late=shed_late,
        shed_margin=shed_margin,
    )


def round_robin(prefetch: int = 2, seed: int | None = None, **_: object) -> Policy:
    return Policy("round-robin", _common(prefetch), [], pickers.RoundRobin())


def random(prefetch: int = 2, seed: int | None = None, **_: object) -> Policy:
    return Policy("random", _common(prefetch), [], pickers.Random(seed))


def least_loaded(prefetch: int = 2, seed: int | None = None, **_: object) -> Policy:
    return Policy("least-loaded", _common(prefetch), [(scorers.Outstanding(), 1.0)], pickers.MinCost(seed))


def power_of_two(prefetch: int = 2, seed: int | None = None, **_: object) -> Policy:
    return Policy("power-of-two", _common(prefetch), [(scorers.Outstanding(), 1.0)], pickers.PowerOfTwo(seed))


def queue_kv(prefetch: int = 2, seed: int | None = None, **_: object) -> Policy:
    return Policy("queue-kv", _common(prefetch), [(scorers.QueueAndKv(), 1.0)], pickers.MinCost(seed))


POLICIES: dict[str, Callable[..., Policy]] = {
    "dio": dio,
    "round-robin": round_robin,
    "random": random,
    "least-loaded": least_loaded,
    "power-of-two": power_of_two,
    "queue-kv": queue_kv,
}


def make_policy(name: str, **options: object) -> Policy:
    """Build a policy by name (see ``POLICIES``)."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    return factory(**options)
