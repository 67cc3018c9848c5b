"""Predictor state in Redis (``{dio}:predictor``), so a restarted or standby dispatcher starts warm."""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Any

import numpy as np
import redis

from dio.dispatcher.cluster import Cluster
from dio.protocol.keys import Keys

log = logging.getLogger("dio.dispatcher")

PREDICTOR_ERRORS_KEPT = 200  # recent |error| samples per worker kept for inspection


def read_states(client: redis.Redis, keys: Keys) -> dict[str, dict[str, Any]]:
    """Return every worker's saved predictor state (unreadable entries are skipped)."""
    states: dict[str, dict[str, Any]] = {}
    for worker_id, raw in client.hgetall(keys.predictor).items():
        try:
            states[worker_id] = json.loads(raw)
        except json.JSONDecodeError:
            log.warning("ignored unreadable predictor state of %s", worker_id)
    return states


class PredictorStore:
    """Save the cluster's predictors (and their recent error) and restore them per worker."""

    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.redis = client
        self.keys = keys
        self.errors: dict[str, deque[float]] = {}  # recent |prediction error| (ms) per worker
        self._saved: dict[str, dict[str, Any]] = {}

    def load(self) -> None:
        """Read the saved states; each is applied when its worker joins (``restore``)."""
        self._saved = read_states(self.redis, self.keys)

    def restore(self, cluster: Cluster, row: int) -> None:
        """Give a worker that just joined the predictor it had, if one was saved."""
        worker_id = cluster.ids[row]
        state = self._saved.get(worker_id)
        if state and cluster.predictor.restore(row, state):
            cluster.service_ms[row] = float(state.get("service_ms", 0.0))
            log.info("predictor of %s restored (%d completions seen)", worker_id, cluster.predictor.seen[row])

    def record_error(self, worker_id: str, error_ms: float) -> None:
        self.errors.setdefault(worker_id, deque(maxlen=PREDICTOR_ERRORS_KEPT)).append(abs(error_ms))

    def save(self, cluster: Cluster) -> None:
        """Write every worker's predictor, mean service time and median recent error."""
        if not len(cluster):
            return
        mapping = {}
        for row, worker_id in enumerate(cluster.ids):
            state = cluster.predictor.snapshot(row)
            errors = self.errors.get(worker_id)
            state.update(service_ms=float(cluster.service_ms[row]), gpu=cluster.infos[row].gpu,
                         error_p50_ms=float(np.median(errors)) if errors else None, updated_at=time.time())
            mapping[worker_id] = json.dumps(state)
        self.redis.hset(self.keys.predictor, mapping=mapping)
