"""The routing step: filters, then scorers, then a picker (pure: no I/O).

Every policy — DIO's and the baselines — is one ``Policy`` built from these pieces, so a
benchmark compares policies, not code paths:

* a **filter** keeps the workers a request may go to. A *permanent* filter removes workers that
  can never serve it (wrong model, too small even when idle): if none is left the request is
  rejected at once. A *transient* filter removes workers that cannot take it now (dead, full):
  if none is left the request waits in the backlog.
* a **scorer** returns a cost per remaining worker, in milliseconds of expected latency (lower is
  better); the policy adds the scorers' costs times their weights.
* a **picker** chooses one worker from the candidates and their total cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dio.dispatcher.cluster import Cluster
from dio.dispatcher.deadlines import NO_CEILING, load_ceiling
from dio.protocol.models import Request


@dataclass
class Decision:
    """The outcome of routing one request."""

    row: int | None = None  # chosen worker row
    wait: bool = False  # nothing fits now: keep it in the backlog
    reason: str | None = None  # why it waits or is rejected
    predicted_ms: float | None = None  # the predictor's latency for the chosen worker
    retry_after_s: float | None = None  # for a rejection caused by load: when to try again
    ceiling: float = NO_CEILING  # the chosen worker's load past which this job misses its deadline
    prompt_tokens: int = 0  # what the chosen worker must prefill (the prompt net of its cache hits)

    @property
    def reject(self) -> bool:
        return self.row is None and not self.wait


class Ask:
    """One request as the routing step sees it, with what several pieces need computed once.

    It carries the request's fields that filters and scorers read (``model``, ``prompt_tokens``,
    ``max_tokens``, ``kv_tokens``, ``deadline_at``, ``prefix_hashes``), plus the predicted latency
    on every worker at the load it would add — the most expensive number, shared by the scorers.
    """

    __slots__ = ("request", "model", "prompt_tokens", "max_tokens", "kv_tokens", "deadline_at", "prefix_hashes",
                 "_cluster", "_predicted", "_loads", "_cached")

    def __init__(self, request: Request, cluster: Cluster) -> None:
        self.request = request
        self.model = request.model
        self.prompt_tokens = request.prompt_tokens
        self.max_tokens = request.max_tokens
        self.kv_tokens = self.prompt_tokens + self.max_tokens
        self.deadline_at = request.deadline_at
        self.prefix_hashes = request.prefix_hashes
        self._cluster = cluster
        self._predicted: np.ndarray | None = None
        self._loads: np.ndarray | None = None
        self._cached: np.ndarray | None = None

    @property
    def loads(self) -> np.ndarray:
        """Every worker's KV load with this request (in units of its weights' size)."""
        if self._loads is None:
            self._loads = self._cluster.load_with(self.kv_tokens)
        return self._loads

    @property
    def cached(self) -> np.ndarray:
        """Prompt tokens every worker probably holds in its prefix cache (no prefill needed)."""
        if self._cached is None:
            self._cached = self._cluster.cached_tokens(self.prompt_tokens, self.prefix_hashes)
        return self._cached

    @property
    def predicted(self) -> np.ndarray:
        """The predictor's latency (ms) of this request on every worker, at that load, net of its cache."""
        if self._predicted is None:
            prompt = self.prompt_tokens - self.cached if self.prefix_hashes else self.prompt_tokens
            self._predicted = self._cluster.predictor.predict_all(prompt, self.max_tokens, self.loads,
                                                                  self._cluster.backlogs())
        return self._predicted


class Filter:
    """Keep the workers a request may go to. ``mask`` returns one bool per worker row."""

    name = "filter"
    permanent = False

    def mask(self, ask: Ask, cluster: Cluster, now: float) -> np.ndarray:
        raise NotImplementedError

    def explain(self, ask: Ask, cluster: Cluster) -> str:
        return f"no worker passes {self.name}"


class Scorer:
    """Cost of sending a request to each candidate row, in milliseconds (lower is better)."""

    name = "scorer"

    def cost(self, ask: Ask, cluster: Cluster, rows: np.ndarray, now: float) -> np.ndarray:
        raise NotImplementedError


class Picker:
    """Choose one row among the candidates (``rows``) given their total cost."""

    name = "picker"

    def pick(self, rows: np.ndarray, cost: np.ndarray, cluster: Cluster) -> int:
        raise NotImplementedError


@dataclass
class Policy:
    """One routing policy: filters → weighted scorers → picker."""

    name: str
    filters: list[Filter]
    scorers: list[tuple[Scorer, float]]
    picker: Picker
    # Reject a request whose predicted finish on the best worker is already past its deadline,
    # instead of running it late: its capacity goes to requests that can still make theirs.
    shed_late: bool = False
    # With ``shed_late``: shed only when the best prediction exceeds the time left by this factor
    # (above 1 gives a noisy predictor the benefit of the doubt on tight deadlines).
    shed_margin: float = 1.0

    def decide(self, request: Request, cluster: Cluster, now: float) -> Decision:
        """Route one request: a worker row, wait, or reject with a reason."""
        if len(cluster) == 0:
            return Decision(wait=True, reason="no worker registered yet")
        ask = Ask(request, cluster)
        keep = np.ones(len(cluster), dtype=bool)
        for f in self.filters:
            passed = keep & f.mask(ask, cluster, now)
            if not passed.any():
                reason = f.explain(ask, cluster)
                if not f.permanent:
                    late = self._late(ask, cluster, keep, now)
                    if late is not None:
                        return late
                return Decision(wait=not f.permanent, reason=reason)
            keep = passed
        rows = np.flatnonzero(keep)
        total = np.zeros(len(rows))
        for scorer, weight in self.scorers:
            total += weight * scorer.cost(ask, cluster, rows, now)
        row = self.picker.pick(rows, total, cluster)
        if self.shed_late and ask.deadline_at is not None:
            chosen = np.zeros(len(cluster), dtype=bool)
            chosen[row] = True
            late = self._late(ask, cluster, chosen, now)
            if late is not None:
                return late
        prefill = int(ask.prompt_tokens - ask.cached[row]) if ask.prefix_hashes else ask.prompt_tokens
        if not cluster.predictor.warm[row]:
            return Decision(row=int(row), prompt_tokens=prefill)
        return Decision(row=int(row), predicted_ms=float(ask.predicted[row]), prompt_tokens=prefill,
                        ceiling=self._ceiling(ask, cluster, row, now))

    @staticmethod
    def _ceiling(ask: Ask, cluster: Cluster, row: int, now: float) -> float:
        """The load ceiling the job sets on its worker (see ``dio.dispatcher.deadlines``)."""
        if ask.deadline_at is None:
            return NO_CEILING
        slack_ms = (ask.deadline_at - now) * 1000.0 - float(ask.predicted[row])
        sensitivity = float(cluster.predictor.load_sensitivity(ask.max_tokens)[row])
        return load_ceiling(float(ask.loads[row]), slack_ms, sensitivity)

    def _late(self, ask: Ask, cluster: Cluster, candidates: np.ndarray, now: float) -> Decision | None:
        """With ``shed_late``: a rejection if even the best candidate would finish past the deadline."""
        if not self.shed_late or ask.deadline_at is None:
            return None
        warm = candidates & cluster.predictor.warm
        if not warm.any():
            return None  # nothing learned yet: no grounds to refuse
        best_ms = float(ask.predicted[warm].min())
        left_ms = (ask.deadline_at - now) * 1000.0
        if best_ms <= left_ms * self.shed_margin:
            return None
        return Decision(reason=f"cannot finish before its deadline: predicted {best_ms:.0f} ms on the best worker, "
                               f"{max(left_ms, 0):.0f} ms left", retry_after_s=round(best_ms / 1000.0, 3))
