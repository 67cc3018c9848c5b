"""Dual-timescale NLMS latency predictors, one row per worker (pure: no I/O, no clock).

Two predictors share one interface, so the dispatcher and the benchmarks swap them by name:

``seed`` — the seed paper's rule, faithfully. For a request of N tokens (prompt + output) on
worker w, ``ŷ = s·N + b`` with ``s = 0.8·s_fast + 0.2·s_slow``; after a completion with latency y::

    g      = (y − ŷ) / (N + ε)
    s_fast ← s_fast + 0.1  · g      # reacts to contention
    s_slow ← s_slow + 0.01 · g      # tracks drift

The seed gives no bias update. Ours: ``b ← b + 0.1·(y − ŷ)`` — an LMS step on a constant
feature, which absorbs the fixed per-request cost (scheduling, first step) that a pure per-token
slope cannot. Both predictors start from the first completion (``s = y/N``, ``b = 0``) rather
than from zero, so no offline profiling is needed and the first prediction is already in range.

``vector`` — the natural extension: features ``x = (prompt tokens / 1000, output tokens / 100 ×
(1 + ℓ), 1, β × (1 + output tokens / 100))`` where ℓ is the worker's KV in flight (with this
request) over the KV tokens whose bytes equal the model's weights, and β the prompt tokens the
worker was sent before it and has not finished (its prefill backlog, in 10k tokens). ℓ is
continuous batching's physics: a decode step reads the weights plus the whole batch's KV, so each
output token costs (1 + ℓ) times what it costs alone, on any GPU. β is chunked prefill's: a new
prompt waits for the prompts ahead of it, and every decode step that shares the GPU with a
prefill chunk is slower, so the backlog costs the request once plus again per output token.
Putting load in the features makes the prediction react at the moment of the decision, not only
after slow completions come back; the weights stay per worker (how fast this GPU is). At
prediction the output is the request's ``max_tokens``. A worker that registers its GPU's datasheet
starts from a roofline prior (``dio.dispatcher.prior``) instead of its first completion. Learned by
normalized LMS
``w ← w + μ·e·x / (ε + x·x)`` at the same two timescales (μ_fast, μ_slow), mixed 0.8 / 0.2.
Prefill and decode cost differ by orders of magnitude per token, so one slope over N cannot fit
both; two slopes can.

``rls`` — the same features learned by recursive least squares (see ``VectorRLS``): it converges
in a few completions, but with forgetting factors short enough to track contention it is
noisier than NLMS as a router's cost; ``vector`` is the default (see the replay benchmarks).

A measured caveat of the seed's rule: its step ``(y − ŷ)/N`` is normalized by N, not N², so a
slope learned on a short request is applied to a long one with a gain of N_long/N_short. On
traces whose lengths vary by 10× or more that gain exceeds 2 and the predictor diverges (see the
convergence benchmark). It is kept exactly as published, as the baseline.
"""

from __future__ import annotations

import numpy as np

FAST_WEIGHT = 0.8
SLOW_WEIGHT = 0.2
EPSILON = 1e-6


class Predictor:
    """A bank of per-worker latency predictors (milliseconds), indexed by row."""

    kind = "base"
    dims = 1

    def __init__(self) -> None:
        self.fast = np.zeros((0, self.dims))
        self.slow = np.zeros((0, self.dims))
        self.seen = np.zeros(0, dtype=np.int64)  # completions learned per row
        self.primed = np.zeros(0, dtype=bool)  # rows started from a prior (dispatcher.prior)

    def __len__(self) -> int:
        return len(self.seen)

    def add_row(self) -> int:
        """Append a cold row; return its index."""
        self.fast = np.vstack([self.fast, np.zeros((1, self.dims))])
        self.slow = np.vstack([self.slow, np.zeros((1, self.dims))])
        self.seen = np.append(self.seen, 0)
        self.primed = np.append(self.primed, False)
        return len(self.seen) - 1

    def remove_row(self, row: int) -> None:
        self.fast = np.delete(self.fast, row, axis=0)
        self.slow = np.delete(self.slow, row, axis=0)
        self.seen = np.delete(self.seen, row)
        self.primed = np.delete(self.primed, row)

    @property
    def warm(self) -> np.ndarray:
        """Per row: whether it predicts anything yet (a completion learned, or a prior)."""
        return (self.seen > 0) | self.primed

    def prime(self, row: int, weights: np.ndarray) -> bool:
        """Start a row that has learned nothing from prior weights; return whether it took them."""
        if self.seen[row] > 0 or len(weights) != self.dims:
            return False
        self.fast[row] = weights
        self.slow[row] = weights
        self.primed[row] = True
        return True

    def features(self, prompt_tokens: float, output_tokens: float, load: float = 0.0,
                 backlog: float = 0.0) -> np.ndarray:
        """Feature vector of a request; ``load`` is the worker's KV in flight with it (in weight
        units), ``backlog`` the prompt tokens it was sent before and may still be prefilling (10k units)."""
        raise NotImplementedError

    def predict_all(self, prompt_tokens: float | np.ndarray, output_tokens: float,
                    loads: np.ndarray | None = None, backlogs: np.ndarray | None = None) -> np.ndarray:
        """Predicted latency (ms) of one request on every row, at each row's load and prefill backlog."""
        weights = FAST_WEIGHT * self.fast + SLOW_WEIGHT * self.slow
        if loads is None:
            return weights @ self.features(float(prompt_tokens), output_tokens)
        if backlogs is None:
            backlogs = np.zeros(len(loads))
        return (weights * self._features_many(prompt_tokens, output_tokens, loads, backlogs)).sum(axis=1)

    def _features_many(self, prompt_tokens: float | np.ndarray, output_tokens: float,
                       loads: np.ndarray, backlogs: np.ndarray) -> np.ndarray:
        """Feature rows for one request at each worker's load (one row per load).

        ``prompt_tokens`` may differ per worker (the part its prefix cache does not hold).
        """
        prompts = np.broadcast_to(np.asarray(prompt_tokens, dtype=float), (len(loads),))
        return np.stack([self.features(p, output_tokens) for p in prompts]) if len(loads) else np.zeros((0, self.dims))

    def load_sensitivity(self, output_tokens: float) -> np.ndarray:
        """Milliseconds one more unit of load adds to a request on every row (0: no load term)."""
        return np.zeros(len(self.seen))

    def predict(self, row: int, prompt_tokens: float, output_tokens: float, load: float = 0.0,
                backlog: float = 0.0) -> float:
        x = self.features(prompt_tokens, output_tokens, load, backlog)
        return float((FAST_WEIGHT * self.fast[row] + SLOW_WEIGHT * self.slow[row]) @ x)

    def update(self, row: int, prompt_tokens: float, output_tokens: float, latency_ms: float,
               load: float = 0.0, backlog: float = 0.0) -> float:
        """Learn one completion; return the prediction error (ms) made before learning it."""
        x = self.features(prompt_tokens, output_tokens, load, backlog)
        if not self.warm[row]:
            self._warm_start(row, x, latency_ms)
            self.seen[row] = 1
            return latency_ms
        predicted = float((FAST_WEIGHT * self.fast[row] + SLOW_WEIGHT * self.slow[row]) @ x)
        self._step(row, x, latency_ms - predicted)
        self.seen[row] += 1
        return latency_ms - predicted

    def _warm_start(self, row: int, x: np.ndarray, latency_ms: float) -> None:
        raise NotImplementedError

    def _step(self, row: int, x: np.ndarray, error: float) -> None:
        raise NotImplementedError

    def snapshot(self, row: int) -> dict:
        """JSON-able state of one row (persisted in Redis)."""
        return {"kind": self.kind, "fast": self.fast[row].tolist(), "slow": self.slow[row].tolist(),
                "seen": int(self.seen[row])}

    def restore(self, row: int, state: dict) -> bool:
        """Restore one row from ``state``; ignore a state of another kind. Return True if loaded."""
        if state.get("kind") != self.kind or len(state.get("fast", ())) != self.dims:
            return False
        self.fast[row] = np.asarray(state["fast"], dtype=float)
        self.slow[row] = np.asarray(state["slow"], dtype=float)
        self.seen[row] = int(state.get("seen", 1))
        return True


class SeedNLMS(Predictor):
    """The seed paper's scalar rule; weights are (slope s, bias b) with the bias shared."""

    kind = "seed"
    dims = 2  # (s, b): row [s_fast, b] in fast, [s_slow, b] in slow; b is kept equal in both
    MU_FAST = 0.1
    MU_SLOW = 0.01
    MU_BIAS = 0.1

    def features(self, prompt_tokens: float, output_tokens: float, load: float = 0.0,
                 backlog: float = 0.0) -> np.ndarray:
        # The seed's model has no load term. ŷ = s·N + b: the bias column is 1, and
        # 0.8·b + 0.2·b = b since both rows hold the same b.
        return np.array([prompt_tokens + output_tokens, 1.0])

    def _warm_start(self, row: int, x: np.ndarray, latency_ms: float) -> None:
        slope = latency_ms / max(x[0], 1.0)
        self.fast[row] = (slope, 0.0)
        self.slow[row] = (slope, 0.0)

    def _step(self, row: int, x: np.ndarray, error: float) -> None:
        g = error / (x[0] + EPSILON)
        self.fast[row, 0] += self.MU_FAST * g
        self.slow[row, 0] += self.MU_SLOW * g
        bias = self.fast[row, 1] + self.MU_BIAS * error
        self.fast[row, 1] = bias
        self.slow[row, 1] = bias


class VectorNLMS(Predictor):
    """Normalized LMS over (prompt/1000, output/100·(1+ℓ), 1, β·(1+output/100)) at two timescales."""

    kind = "vector"
    dims = 4
    MU_FAST = 1.0
    MU_SLOW = 0.1

    def features(self, prompt_tokens: float, output_tokens: float, load: float = 0.0,
                 backlog: float = 0.0) -> np.ndarray:
        per_token = output_tokens / 100.0
        return np.array([prompt_tokens / 1000.0, per_token * (1.0 + load), 1.0, backlog * (1.0 + per_token)])

    def load_sensitivity(self, output_tokens: float) -> np.ndarray:
        # ŷ = w0·P/1000 + w1·O/100·(1 + ℓ) + w2, so ∂ŷ/∂ℓ = w1·O/100 (never negative: more load is never faster).
        weights = FAST_WEIGHT * self.fast[:, 1] + SLOW_WEIGHT * self.slow[:, 1]
        return np.maximum(weights, 0.0) * output_tokens / 100.0

    def _features_many(self, prompt_tokens: float | np.ndarray, output_tokens: float,
                       loads: np.ndarray, backlogs: np.ndarray) -> np.ndarray:
        xs = np.empty((len(loads), 4))
        xs[:, 0] = np.asarray(prompt_tokens, dtype=float) / 1000.0
        xs[:, 1] = output_tokens / 100.0 * (1.0 + np.asarray(loads, dtype=float))
        xs[:, 2] = 1.0
        xs[:, 3] = backlogs * (1.0 + output_tokens / 100.0)
        return xs

    def _warm_start(self, row: int, x: np.ndarray, latency_ms: float) -> None:
        # Spread the first latency over the features in proportion to their size: a fair prior
        # that the next completions correct.
        w = latency_ms * x / float(x @ x)
        self.fast[row] = w
        self.slow[row] = w

    def _step(self, row: int, x: np.ndarray, error: float) -> None:
        step = error * x / (EPSILON + float(x @ x))
        self.fast[row] += self.MU_FAST * step
        self.slow[row] += self.MU_SLOW * step


class VectorRLS(VectorNLMS):
    """Recursive least squares over the same features, with two forgetting factors.

    RLS whitens the features with its inverse-covariance estimate, so it converges in a few
    completions where NLMS, on features as correlated as prompt and output length, needs dozens.
    The fast bank forgets with λ=0.8 (≈5 completions of memory: contention), the slow one with
    λ=0.95 (≈20: drift); predictions mix them 0.8 / 0.2 like the NLMS rows.
    """

    kind = "rls"
    LAMBDA_FAST = 0.8
    LAMBDA_SLOW = 0.95
    PRIOR_VARIANCE = 1e3

    def __init__(self) -> None:
        super().__init__()
        self.p_fast = np.zeros((0, self.dims, self.dims))
        self.p_slow = np.zeros((0, self.dims, self.dims))

    def add_row(self) -> int:
        prior = np.eye(self.dims)[None] * self.PRIOR_VARIANCE
        self.p_fast = np.concatenate([self.p_fast, prior])
        self.p_slow = np.concatenate([self.p_slow, prior])
        return super().add_row()

    def remove_row(self, row: int) -> None:
        self.p_fast = np.delete(self.p_fast, row, axis=0)
        self.p_slow = np.delete(self.p_slow, row, axis=0)
        super().remove_row(row)

    def _step(self, row: int, x: np.ndarray, error: float) -> None:
        for weights, cov, lam in ((self.fast, self.p_fast, self.LAMBDA_FAST),
                                  (self.slow, self.p_slow, self.LAMBDA_SLOW)):
            own_error = error + float((FAST_WEIGHT * self.fast[row] + SLOW_WEIGHT * self.slow[row]) @ x
                                      - weights[row] @ x)
            px = cov[row] @ x
            gain = px / (lam + float(x @ px))
            weights[row] += gain * own_error
            cov[row] = (cov[row] - np.outer(gain, px)) / lam

    def snapshot(self, row: int) -> dict:
        return {**super().snapshot(row), "p_fast": self.p_fast[row].tolist(), "p_slow": self.p_slow[row].tolist()}

    def restore(self, row: int, state: dict) -> bool:
        if not super().restore(row, state):
            return False
        if "p_fast" in state:
            self.p_fast[row] = np.asarray(state["p_fast"], dtype=float)
            self.p_slow[row] = np.asarray(state["p_slow"], dtype=float)
        return True


PREDICTORS: dict[str, type[Predictor]] = {"seed": SeedNLMS, "vector": VectorNLMS, "rls": VectorRLS}


def make_predictor(kind: str) -> Predictor:
    """Build an empty predictor bank by name (``seed`` or ``vector``)."""
    try:
        return PREDICTORS[kind]()
    except KeyError:
        raise ValueError(f"unknown predictor {kind!r}; choose one of {sorted(PREDICTORS)}") from None
