"""Per-token latency predictors: each worker's TTFT and TPOT, learned online (pure: no I/O, no clock).

SLOs are written in time to first token (TTFT) and time per output token after it (TPOT), and a
router never knows a request's output length, so DIO predicts these two, per worker, not an
end-to-end latency at a known length:

* **TTFT** ≈ waiting for the prompts queued before it + prefilling its own uncached tokens:
  compute-bound, so it scales with the GPU's FLOP/s. Features ``(uncached prompt / 1000,
  prefill queue / 10k, 1)``; the queue is a fluid estimate (``Cluster.queued_prefill``): the
  uncached prompt tokens sent to the worker, drained at its prefill rate.
* **TPOT** ≈ one decode step of the batch it joins: memory-bound (the weights plus the batch's KV
  are read every step), slowed by the prefill chunks of the prompts that arrive while it decodes
  (chunked prefill runs them inside the same steps). Features ``(1, ℓ, ρ)``: ℓ is the worker's KV
  in flight over the KV tokens whose bytes equal the weights (a step reads weights + KV, so it
  costs ``1 + ℓ`` times a lone step); ρ is the share of the worker's time that the prompts sent
  to it recently take to prefill (``Cluster.prefill_shares``) — a short answer decoding beside a
  stream of long prompts sees a TPOT many times its GPU's decode step.

Each is linear in its features with per-worker weights, learned with the seed's dual-timescale
rule generalised to a vector (normalised LMS, ``w ← w + μ·e·x / (ε + x·x)``, a fast and a slow
bank mixed 0.8 / 0.2), started from the worker's roofline prior (``dio.dispatcher.prior``) so a
heterogeneous pool is handled from the first request. ``OutputLengths`` learns what a request of a
model produces, relative to its ``max_tokens``: the router's estimate of the output it cannot see.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from dio.dispatcher.predictors import FAST_WEIGHT, SLOW_WEIGHT

EPSILON = 1e-6
MU_FAST = 0.5
MU_SLOW = 0.05
RATIO_GAIN = 0.05  # the running ratio of measured / predicted averages over about the last 20 samples
TTFT_DIMS = 3  # (uncached prompt / 1000, prefill queue / 10k tokens, 1)
TPOT_DIMS = 3  # (1, KV load ℓ, prefill share ρ)


class LinearBank:
    """Per-row linear predictors ``ŷ = w·x`` (ms), learned by dual-timescale normalised LMS."""

    def __init__(self, dims: int) -> None:
        self.dims = dims
        self.fast = np.zeros((0, dims))
        self.slow = np.zeros((0, dims))
        self.seen = np.zeros(0, dtype=np.int64)  # samples learned per row
        self.primed = np.zeros(0, dtype=bool)  # rows started from a prior
        # How measurements run against predictions, per row: the running mean of measured / predicted.
        self.ratio = np.zeros(0)

    def __len__(self) -> int:
        return len(self.seen)

    @property
    def warm(self) -> np.ndarray:
        """Per row: whether it predicts anything yet (a sample learned, or a prior)."""
        return (self.seen > 0) | self.primed

    @property
    def weights(self) -> np.ndarray:
        return FAST_WEIGHT * self.fast + SLOW_WEIGHT * self.slow

    def add_row(self) -> None:
        self.fast = np.vstack([self.fast, np.zeros((1, self.dims))])
        self.slow = np.vstack([self.slow, np.zeros((1, self.dims))])
        self.seen = np.append(self.seen, 0)
        self.primed = np.append(self.primed, False)
        self.ratio = np.append(self.ratio, 1.0)

    def remove_row(self, row: int) -> None:
        self.fast = np.delete(self.fast, row, axis=0)
        self.slow = np.delete(self.slow, row, axis=0)
        self.seen = np.delete(self.seen, row)
        self.primed = np.delete(self.primed, row)
        self.ratio = np.delete(self.ratio, row)

    def caution(self) -> np.ndarray:
        """Per row, the factor a cautious prediction applies: how far measurements run above predictions.

        Never below 1: a worker that turns out faster than predicted keeps its prediction. (A wider
        margin, mean + 1.5 spreads, lost goodput in the virtual replay: requests every worker then
        "missed" went to the least bad worker instead of a good one.)
        """
        return np.maximum(self.ratio, 1.0)

    def prime(self, row: int, weights: np.ndarray) -> None:
        """Start a row that has learned nothing from prior weights."""
        if self.seen[row] == 0 and len(weights) == self.dims:
            self.fast[row] = weights
            self.slow[row] = weights
            self.primed[row] = True

    def predict(self, xs: np.ndarray) -> np.ndarray:
        """Predict every row from its own feature row ``xs[row]`` (never below 0)."""
        return np.maximum(np.einsum("ij,ij->i", self.weights, xs), 0.0)

    def learn(self, row: int, x: np.ndarray, y: float) -> float:
        """Learn one measured ``y`` (ms) with features ``x``; return the error of the prediction before it."""
        if not self.warm[row]:
            w = y * x / float(x @ x)  # spread the first sample over the features: the next ones correct it
            self.fast[row] = w
            self.slow[row] = w
            self.seen[row] += 1
            return 0.0
        predicted = float(self.weights[row] @ x)
        error = y - predicted
        if predicted > 0:
            self.ratio[row] += RATIO_GAIN * (y / predicted - self.ratio[row])
        step = error * x / (EPSILON + float(x @ x))
        self.fast[row] += MU_FAST * step
        self.slow[row] += MU_SLOW * step
        self.seen[row] += 1
        return error

    def snapshot(self, row: int) -> dict:
        return {"fast": self.fast[row].tolist(), "slow": self.slow[row].tolist(), "seen": int(self.seen[row])}

    def restore(self, row: int, state: dict) -> bool:
        if len(state.get("fast", ())) != self.dims or len(state.get("slow", ())) != self.dims:
            return False
        self.fast[row] = np.asarray(state["fast"], dtype=float)
        self.slow[row] = np.asarray(state["slow"], dtype=float)
        self.seen[row] = int(state.get("seen", 1))
        return True


def ttft_features(uncached_prompt: np.ndarray, queues: np.ndarray) -> np.ndarray:
    """TTFT features per worker row: (uncached prompt / 1000, prefill queue / 10k, 1)."""
    xs = np.ones((len(queues), TTFT_DIMS))
    xs[:, 0] = np.asarray(uncached_prompt, dtype=float) / 1000.0
    xs[:, 1] = queues
    return xs


def tpot_features(loads: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """TPOT features per worker row: (1, KV load ℓ, prefill share ρ)."""
    xs = np.ones((len(loads), TPOT_DIMS))
    xs[:, 1] = loads
    xs[:, 2] = shares
    return xs


class TokenLatency:
    """TTFT and TPOT predictors of every worker (rows as in ``Cluster``)."""

    def __init__(self) -> None:
        self.ttft = LinearBank(TTFT_DIMS)
        self.tpot = LinearBank(TPOT_DIMS)

    def add_row(self) -> None:
        self.ttft.add_row()
        self.tpot.add_row()

    def remove_row(self, row: int) -> None:
        self.ttft.remove_row(row)
        self.tpot.remove_row(row)

    def prime(self, row: int, ttft: np.ndarray, tpot: np.ndarray) -> None:
        self.ttft.prime(row, ttft)
        self.tpot.prime(row, tpot)

    @property
    def warm(self) -> np.ndarray:
        return self.ttft.warm & self.tpot.warm

    def predict_ttft(self, uncached_prompt: np.ndarray, queues: np.ndarray) -> np.ndarray:
        return self.ttft.predict(ttft_features(uncached_prompt, queues))

    def predict_tpot(self, loads: np.ndarray, shares: np.ndarray) -> np.ndarray:
        return self.tpot.predict(tpot_features(loads, shares))

    def prefill_ms_per_1k(self) -> np.ndarray:
        """Per worker, the TTFT model's cost of prefilling 1,000 uncached prompt tokens (ms)."""
        return self.ttft.weights[:, 0]

    def tpot_per_load(self) -> np.ndarray:
        """∂TPOT/∂ℓ per worker (ms per unit of KV load; never negative: more load is never faster)."""
        return np.maximum(self.tpot.weights[:, 1], 0.0)

    def learn(self, row: int, uncached_prompt: int, output_tokens: int, ttft_ms: float | None, service_ms: float,
              load: float, queue: float, share: float) -> tuple[float | None, float | None]:
        """Learn one completion with the features it was sent with; return the (TTFT, TPOT) errors (ms)."""
        ttft_error = tpot_error = None
        if ttft_ms is not None:
            x = ttft_features(np.array([uncached_prompt]), np.array([queue]))[0]
            ttft_error = self.ttft.learn(row, x, ttft_ms)
            if output_tokens > 1:
                tpot_ms = max(service_ms - ttft_ms, 0.0) / (output_tokens - 1)
                tpot_error = self.tpot.learn(row, tpot_features(np.array([load]), np.array([share]))[0], tpot_ms)
        return ttft_error, tpot_error

    def snapshot(self, row: int) -> dict:
        return {"ttft": self.ttft.snapshot(row), "tpot": self.tpot.snapshot(row)}

    def restore(self, row: int, state: dict) -> bool:
        return self.ttft.restore(row, state.get("ttft", {})) and self.tpot.restore(row, state.get("tpot", {}))


class OutputLengths:
    """What requests produce, as a fraction of their ``max_tokens``, learned from completions.

    The router never sees a request's output length; it reserves KV for, and predicts end-to-end
    latency with, a quantile of what earlier requests produced. Until ``MIN_SAMPLES`` completions
    have been seen it assumes the worst (the whole ``max_tokens``).
    """

    MIN_SAMPLES = 20
    KEPT = 2000  # most recent completions kept

    def __init__(self) -> None:
        self._fractions: deque[float] = deque(maxlen=self.KEPT)
        self._sorted: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self._fractions)

    def learn(self, output_tokens: int, max_tokens: int) -> None:
        if max_tokens > 0:
            self._fractions.append(min(output_tokens / max_tokens, 1.0))
            self._sorted = None

    def quantile(self, q: float) -> float:
        """The ``q`` quantile of output / max_tokens (1.0 until enough completions were seen)."""
        if len(self._fractions) < self.MIN_SAMPLES:
            return 1.0
        if self._sorted is None:
            self._sorted = np.sort(np.fromiter(self._fractions, dtype=float))
        return float(self._sorted[min(int(q * len(self._sorted)), len(self._sorted) - 1)])

    def expected(self, max_tokens: int, q: float) -> int:
        """Output tokens to plan for a request of ``max_tokens`` (at least 1)."""
        return max(1, int(np.ceil(self.quantile(q) * max_tokens)))
