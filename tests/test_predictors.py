"""The latency predictors: the seed's rule exactly, convergence, drift, persistence."""

import numpy as np
import pytest

from dio.dispatcher.predictors import SeedNLMS, VectorNLMS, make_predictor


def synthetic(rng: np.random.Generator, n: int, scale: float = 1.0):
    """Latencies of a GPU: 0.05 ms per prompt token, 20 ms per output token, 30 ms fixed."""
    for _ in range(n):
        p, o = int(rng.integers(100, 4000)), int(rng.integers(10, 400))
        yield p, o, scale * (0.05 * p + 20 * o + 30) + rng.normal(0, 2)


def test_seed_rule_is_the_papers_exactly():
    pred = SeedNLMS()
    pred.add_row()
    pred.update(0, 900, 100, 500.0)  # warm start: s = 500 / 1000 tokens, b = 0
    assert pred.predict(0, 900, 100) == pytest.approx(500.0)
    s_fast, s_slow, b = pred.fast[0, 0], pred.slow[0, 0], pred.fast[0, 1]
    n, y = 1500, 900.0
    y_hat = (0.8 * s_fast + 0.2 * s_slow) * n + b
    g = (y - y_hat) / (n + 1e-6)
    pred.update(0, 1400, 100, y)
    assert pred.fast[0, 0] == pytest.approx(s_fast + 0.1 * g)
    assert pred.slow[0, 0] == pytest.approx(s_slow + 0.01 * g)
    assert pred.fast[0, 1] == pytest.approx(b + 0.1 * (y - y_hat))  # our documented bias rule


def test_seed_rule_converges_when_lengths_vary_mildly():
    pred = SeedNLMS()
    pred.add_row()
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(200):
        n = int(rng.integers(900, 1100))
        errors.append(abs(pred.update(0, n - 100, 100, 0.4 * n + 50 + rng.normal(0, 2))))
    assert np.median(errors[-50:]) < 10 < errors[0]


def test_seed_rule_diverges_when_lengths_vary_widely():
    """The published rule normalizes by N, not N²: documented, and kept as the baseline."""
    pred = SeedNLMS()
    pred.add_row()
    errors = [abs(pred.update(0, p, o, y)) for p, o, y in synthetic(np.random.default_rng(0), 200)]
    assert np.mean(errors[-50:]) > np.mean(errors[1:6])


@pytest.mark.parametrize("kind", ["vector", "rls"])
def test_every_predictor_reduces_its_error(kind):
    errors = []
    for seed in range(10):
        pred = make_predictor(kind)
        pred.add_row()
        errors.append([abs(pred.update(0, p, o, y)) for p, o, y in synthetic(np.random.default_rng(seed), 200)])
    median = np.median(np.array(errors), axis=0)
    assert median[-50:].mean() < 0.5 * median[1:6].mean()


def test_rls_converges_under_50ms_within_20_completions_and_after_drift():
    pred = make_predictor("rls")
    pred.add_row()
    rng = np.random.default_rng(1)
    cold = [abs(pred.update(0, p, o, y)) for p, o, y in synthetic(rng, 20)]
    assert np.median(cold[10:20]) < 50
    drift = [abs(pred.update(0, p, o, y)) for p, o, y in synthetic(rng, 60, scale=1.5)]
    assert drift[0] > 200  # the slowdown is visible ...
    assert np.median(drift[40:60]) < 50  # ... and learned


def test_vector_predictor_separates_prompt_and_output_costs():
    pred = VectorNLMS()
    pred.add_row()
    for p, o, y in synthetic(np.random.default_rng(2), 300):
        pred.update(0, p, o, y)
    long_output = pred.predict(0, 100, 400)
    long_prompt = pred.predict(0, 4000, 10)
    assert long_output > long_prompt  # 8 s of decode vs 0.4 s of prefill


@pytest.mark.parametrize("kind", ["seed", "vector", "rls"])
def test_state_round_trips_and_rows_are_independent(kind):
    pred = make_predictor(kind)
    pred.add_row()
    pred.add_row()
    for p, o, y in synthetic(np.random.default_rng(3), 30):
        pred.update(1, p, o, y)
    restored = make_predictor(kind)
    restored.add_row()
    assert restored.restore(0, pred.snapshot(1))
    assert restored.predict(0, 1000, 100) == pytest.approx(pred.predict(1, 1000, 100))
    assert pred.seen[0] == 0 and pred.predict(0, 1000, 100) == 0.0
    assert not make_predictor("seed" if kind != "seed" else "vector").restore(0, pred.snapshot(1)) or kind == "rls"


def test_predict_all_is_vectorised_over_rows():
    pred = make_predictor("vector")
    for _ in range(3):
        pred.add_row()
    for row, scale in enumerate((1.0, 2.0, 4.0)):
        for p, o, y in synthetic(np.random.default_rng(row), 100, scale):
            pred.update(row, p, o, y)
    all_rows = pred.predict_all(1000, 100)
    assert all_rows.shape == (3,)
    assert all_rows[0] < all_rows[1] < all_rows[2]
    pred.remove_row(1)
    assert len(pred) == 2


def test_unknown_predictor_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown predictor"):
        make_predictor("magic")
