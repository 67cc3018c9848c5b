"""Pickers: choose one candidate worker."""

from __future__ import annotations

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.policy import Picker


class MinCost(Picker):
    """The lowest total cost; ties broken at random so equal workers share the load."""

    name = "min-cost"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, rows: np.ndarray, cost: np.ndarray, cluster: Cluster) -> int:
        best = np.flatnonzero(cost <= cost.min() + 1e-9)
        return int(rows[best[0] if len(best) == 1 else self.rng.choice(best)])


class RoundRobin(Picker):
    """The next candidate after the last one picked, in worker order."""

    name = "round-robin"

    def __init__(self) -> None:
        self.last_id: str | None = None

    def pick(self, rows: np.ndarray, cost: np.ndarray, cluster: Cluster) -> int:
        last = cluster.index.get(self.last_id, -1) if self.last_id is not None else -1
        after = rows[rows > last]
        row = int(after[0] if len(after) else rows[0])
        self.last_id = cluster.ids[row]
        return row


class Random(Picker):
    """A uniformly random candidate."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, rows: np.ndarray, cost: np.ndarray, cluster: Cluster) -> int:
        return int(self.rng.choice(rows))


class PowerOfTwo(Picker):
    """Two random candidates; the one with the lower cost."""

    name = "power-of-two"

    def __init__(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def pick(self, rows: np.ndarray, cost: np.ndarray, cluster: Cluster) -> int:
        if len(rows) == 1:
            return int(rows[0])
        a, b = self.rng.choice(len(rows), size=2, replace=False)
        return int(rows[a] if cost[a] <= cost[b] else rows[b])
