"""Benchmark statistics: percentiles, SLO attainment, goodput, summaries."""

from __future__ import annotations

import math

import pytest

from dio.ops.stats import goodput, met_slo, percentile, percentiles, slo_attained, summarize


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 50, None),  # empty: no percentile, not an exception
        ([None, None], 50, None),  # nothing finished
        ([3.0], 99, 3.0),
        ([1, 2, 3, 4, 5], 50, 3.0),
        ([1, 2, 3, 4, 5], 0, 1.0),
        ([1, 2, 3, 4, 5], 100, 5.0),
        ([1, None, 3, float("nan")], 50, 2.0),  # unfinished and NaN are left out
    ],
)
def test_percentile(values: list, q: float, expected: float | None) -> None:
    assert percentile(values, q) == expected


def test_percentiles_keys_and_values() -> None:
    values = list(range(1, 101))
    result = percentiles(values)
    assert list(result) == ["p50", "p90", "p99"]
    assert result["p50"] == pytest.approx(50.5)
    assert result["p90"] == pytest.approx(90.1)
    assert result["p99"] == pytest.approx(99.01)


def test_percentiles_empty_and_custom_quantiles() -> None:
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}
    assert list(percentiles([1.0], quantiles=(99.9,))) == ["p99.9"]


@pytest.mark.parametrize(
    ("latencies", "deadlines", "expected"),
    [
        ([1.0, 2.0, 3.0], 2.0, [True, True, False]),  # on the deadline counts as met
        ([1.0, 2.0], [0.5, 5.0], [False, True]),  # one deadline per request
        ([1.0, None], 10.0, [True, False]),  # never finished: missed
        ([9.0, None], [None, None], [True, False]),  # no SLO: met once finished
        ([float("inf")], 1e9, [False]),
    ],
)
def test_met_slo(latencies: list, deadlines: float | list, expected: list[bool]) -> None:
    assert met_slo(latencies, deadlines).tolist() == expected


def test_met_slo_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 latencies but 1 deadlines"):
        met_slo([1.0, 2.0], [1.0])


def test_slo_attained() -> None:
    assert slo_attained([], 1.0) is None
    assert slo_attained([0.1, 0.2, 5.0, None], 1.0) == 0.5


def test_goodput_counts_only_requests_within_slo() -> None:
    # 100 tokens in time, 50 late, 70 never finished: only 100 count, over a 4 s span.
    assert goodput([100, 50, 70], [1.0, 3.0, None], 2.0, span_s=4.0) == 25.0
    assert goodput([], [], 1.0, span_s=1.0) == 0.0


@pytest.mark.parametrize("span_s", [0.0, -1.0])
def test_goodput_needs_positive_span(span_s: float) -> None:
    with pytest.raises(ValueError, match="span_s"):
        goodput([1], [1.0], 2.0, span_s=span_s)


def test_summarize() -> None:
    summary = summarize([1.0, 2.0, 3.0, None], deadlines=2.5, tokens=[10, 20, 30, 40], span_s=10.0)
    assert summary["count"] == 4
    assert summary["finished"] == 3
    assert summary["mean"] == 2.0
    assert summary["p50"] == 2.0
    assert summary["max"] == 3.0
    assert summary["slo_attained"] == 0.5
    assert summary["goodput_tok_s"] == 3.0


def test_summarize_empty_has_no_numbers() -> None:
    summary = summarize([])
    assert summary == {"count": 0, "finished": 0, "mean": None, "p50": None, "p90": None, "p99": None, "max": None}
    assert not any(isinstance(v, float) and math.isnan(v) for v in summary.values())
