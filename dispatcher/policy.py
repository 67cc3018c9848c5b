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

EXPECTED_OUTPUT_QUANTILE = 0.5  # with learn_outputs: the output a prediction assumes
RESERVED_OUTPUT_QUANTILE = 0.9  # with learn_outputs: the output KV is reserved for (preemption is the net)
SHORT_OUTPUT_QUANTILE = 0.2  # with learn_outputs: a short answer, the one a prefill stall hurts most


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
    kv_tokens: int = 0  # the KV tokens reserved for it on the chosen worker

    @property
    def reject(self) -> bool:
        return self.row is None and not self.wait


class Ask:
    """One request as the routing step sees it, with what several pieces need computed once.

    It carries the request's fields that filters and scorers read (``model``, ``prompt_tokens``,
    ``max_tokens``, ``deadline_at``, ``prefix_hashes``, its SLO), what the router plans for it —
    ``output_tokens`` (the output to expect: ``max_tokens``, or with ``learn_outputs`` the median of
    what earlier requests produced) and ``kv_tokens`` (the KV to reserve: the prompt plus
    ``max_tokens``, or with ``learn_outputs`` plus a high quantile of earlier outputs) — and the
    predictions on every worker at the load it would add, the most expensive numbers, shared by the
    scorers.
    """

    __slots__ = ("request", "model", "prompt_tokens", "max_tokens", "max_kv_tokens", "output_tokens", "kv_tokens",
                 "short_output_tokens",
                 "deadline_at", "prefix_hashes", "ttft_budget_ms", "tpot_slo_ms", "now",
                 "_cluster", "_predicted", "_loads", "_cached", "_ttft", "_tpot")

    def __init__(self, request: Request, cluster: Cluster, now: float = 0.0, learn_outputs: bool = False) -> None:
        self.request = request
        self.model = request.model
        self.prompt_tokens = request.prompt_tokens
        self.max_tokens = request.max_tokens
        self.max_kv_tokens = self.prompt_tokens + self.max_tokens  # what it can grow to
        self.output_tokens, self.kv_tokens = self.max_tokens, self.max_kv_tokens
        self.short_output_tokens = self.max_tokens
        if learn_outputs:
            outputs = cluster.outputs_of(request.model)
            self.output_tokens = outputs.expected(self.max_tokens, EXPECTED_OUTPUT_QUANTILE)
            self.short_output_tokens = outputs.expected(self.max_tokens, SHORT_OUTPUT_QUANTILE)
            self.kv_tokens = self.prompt_tokens + outputs.expected(self.max_tokens, RESERVED_OUTPUT_QUANTILE)
        self.deadline_at = request.deadline_at
        self.prefix_hashes = request.prefix_hashes
        # What is left of its TTFT limit after the time it already waited (ms); None: no TTFT SLO.
        waited_ms = max(now - request.submitted_at, 0.0) * 1000.0
        self.ttft_budget_ms = None if request.ttft_slo_ms is None else request.ttft_slo_ms - waited_ms
        self.tpot_slo_ms = request.tpot_slo_ms
        self.now = now
        self._cluster = cluster
        self._predicted: np.ndarray | None = None
        self._loads: np.ndarray | None = None
        self._cached: np.ndarray | None = None
        self._ttft: np.ndarray | None = None
        self._tpot: np.ndarray | None = None

    @property
    def has_slo(self) -> bool:
        return self.ttft_budget_ms is not None or self.tpot_slo_ms is not None

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
    def uncached(self) -> np.ndarray | int:
        """Prompt tokens each worker must prefill (all of them without prefix hashes)."""
        return self.prompt_tokens - self.cached if self.prefix_hashes else self.prompt_tokens

    @property
    def predicted(self) -> np.ndarray:
        """The predictor's latency (ms) of this request on every worker, at that load, net of its cache."""
        if self._predicted is None:
            self._predicted = self._cluster.predictor.predict_all(self.uncached, self.output_tokens, self.loads,
                                                                  self._cluster.backlogs())
        return self._predicted

    @property
    def ttft(self) -> np.ndarray:
        """Predicted time to its first token (ms) on every worker, from the hand-off."""
        if self._ttft is None:
            queues = self._cluster.queued_prefill(self.now)
            self._ttft = self._cluster.tokens.predict_ttft(self.uncached_by_worker, queues)
        return self._ttft

    @property
    def uncached_by_worker(self) -> np.ndarray:
        """``uncached`` as one value per worker row."""
        return np.broadcast_to(np.asarray(self.uncached, dtype=float), (len(self._cluster),))

    @property
    def prefill_ms(self) -> np.ndarray:
        """How long each worker computes this request's uncached prompt (ms): the TTFT model's prompt term."""
        return self.uncached_by_worker / 1000.0 * np.maximum(self._cluster.tokens.prefill_ms_per_1k(), 0.0)

    def slo_use(self, ttft: np.ndarray, tpot: np.ndarray) -> np.ndarray:
        """The share of its SLO the request would use, per entry: max(TTFT / TTFT left, TPOT / TPOT limit)."""
        use = np.zeros(len(ttft))
        if self.ttft_budget_ms is not None:
            use = np.maximum(use, ttft / max(self.ttft_budget_ms, 1.0))
        if self.tpot_slo_ms is not None:
            use = np.maximum(use, tpot / self.tpot_slo_ms)
        return use

    @property
    def tpot(self) -> np.ndarray:
        """Predicted time per output token (ms) on every worker, with this request there.

        Its prompt counts in the worker's prefill share: it does not slow its own decoding, but it
        slows every job it joins, and they share the batch's TPOT limit as far as routing can tell.
        """
        if self._tpot is None:
            shares = self._cluster.prefill_shares(self.now, self.uncached)
            self._tpot = self._cluster.tokens.predict_tpot(self.loads, shares)
        return self._tpot


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
    # Reject a sheddable request (``Request.sheddable``) whose predicted finish on the best worker is
    # already past its deadline, instead of running it late: its capacity goes to requests that can
    # still make theirs. Requests not marked sheddable are never refused on a prediction.
    shed_late: bool = False
    # With ``shed_late``: shed only when the best prediction exceeds the time left by this factor
    # (above 1 gives a noisy predictor the benefit of the doubt on tight deadlines).
    shed_margin: float = 1.0
    # Plan with what earlier requests produced instead of the whole max_tokens: the output a
    # prediction assumes and the KV a reservation holds (see ``Ask``).
    learn_outputs: bool = False

    def decide(self, request: Request, cluster: Cluster, now: float) -> Decision:
        """Route one request: a worker row, wait, or reject with a reason."""
        if len(cluster) == 0:
            return Decision(wait=True, reason="no worker registered yet")
        ask = Ask(request, cluster, now, self.learn_outputs)
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
        if self.shed_late and (ask.deadline_at is not None or ask.has_slo):
            chosen = np.zeros(len(cluster), dtype=bool)
            chosen[row] = True
            late = self._late(ask, cluster, chosen, now)
            if late is not None:
                return late
        prefill = int(ask.prompt_tokens - ask.cached[row]) if ask.prefix_hashes else ask.prompt_tokens
        if not cluster.predictor.warm[row]:
            return Decision(row=int(row), prompt_tokens=prefill, kv_tokens=ask.kv_tokens)
        return Decision(row=int(row), predicted_ms=float(ask.predicted[row]), prompt_tokens=prefill,
                        kv_tokens=ask.kv_tokens, ceiling=self._ceiling(ask, cluster, row, now))

    @staticmethod
    def _ceiling(ask: Ask, cluster: Cluster, row: int, now: float) -> float:
        """The load ceiling the job sets on its worker (see ``dio.dispatcher.deadlines``).

        With a TPOT SLO: the load at which its predicted TPOT reaches the limit (every decode step
        of the batch it joins slows with the worker's KV load). Else with a deadline: the load at
        which its predicted finish reaches the deadline.
        """
        if ask.tpot_slo_ms is not None and cluster.tokens.warm[row]:
            slack_ms = ask.tpot_slo_ms - float(ask.tpot[row])
            return load_ceiling(float(ask.loads[row]), slack_ms, float(cluster.tokens.tpot_per_load()[row]))
        if ask.deadline_at is None:
            return NO_CEILING
        slack_ms = (ask.deadline_at - now) * 1000.0 - float(ask.predicted[row])
        sensitivity = float(cluster.predictor.load_sensitivity(ask.output_tokens)[row])
        return load_ceiling(float(ask.loads[row]), slack_ms, sensitivity)

    def _late(self, ask: Ask, cluster: Cluster, candidates: np.ndarray, now: float) -> Decision | None:
        """With ``shed_late``: reject a sheddable request that even the best candidate would serve late.

        Only a request marked ``sheddable`` is refused on a prediction; any other is routed and runs
        late if it must (it is still rejected if it cannot start before its deadline, by the backlog).
        A request with a TTFT/TPOT SLO is late where its predicted TTFT exceeds what is left of its
        TTFT limit or its predicted TPOT its TPOT limit; one with a deadline, where its predicted
        finish is past it.
        """
        if not self.shed_late or not ask.request.sheddable:
            return None
        if ask.has_slo:
            return self._late_for_slo(ask, cluster, candidates)
        if ask.deadline_at is None:
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

    def _late_for_slo(self, ask: Ask, cluster: Cluster, candidates: np.ndarray) -> Decision | None:
        warm = candidates & cluster.tokens.warm
        if not warm.any():
            return None
        use = ask.slo_use(ask.ttft[warm], ask.tpot[warm])
        best = int(np.argmin(use))
        if use[best] <= self.shed_margin:
            return None
        ttft_ms, tpot_ms = float(ask.ttft[warm][best]), float(ask.tpot[warm][best])
        return Decision(reason=f"cannot meet its SLO: predicted TTFT {ttft_ms:.0f} ms and TPOT {tpot_ms:.1f} ms "
                               f"on the best worker, limits {_ms(ask.ttft_budget_ms)} ms left and "
                               f"{_ms(ask.tpot_slo_ms)} ms", retry_after_s=round(ttft_ms / 1000.0, 3))


def _ms(value: float | None) -> str:
    return "none" if value is None else f"{max(value, 0.0):.0f}"
