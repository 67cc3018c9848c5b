"""Trace loaders, arrival helpers and the bundled samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dio.ops.traces import (
    BUNDLED,
    TraceError,
    TraceRequest,
    bundled,
    detect_format,
    load_trace,
    poisson_arrivals,
    prefix_block_reuse,
    rescale_arrivals,
    sample,
    trace_stats,
    with_arrivals,
)

AZURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:46.6805901,10,0
"""
LENGTHS = """num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio
3772,54,3826,69.85
2015,156,2171,12.91
100,-3,97,1.0
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def mooncake_lines(*records: dict) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def arrivals(trace: list[TraceRequest]) -> list[float]:
    return [r.arrival_s for r in trace]


# --- formats ---------------------------------------------------------------------------------


def test_azure_sorted_relative_and_exact(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "a.csv", AZURE))
    # The third row arrives 100 ns after the first: sorted second, and its 7th digit is kept.
    assert arrivals(trace) == pytest.approx([0.0, 1e-7, 4.314579], abs=1e-12)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(374, 44), (10, 1), (396, 109)]
    assert trace[0].prefix_hashes is None


@pytest.mark.parametrize(
    ("second", "expected_s"),
    [
        ("2023-11-16 18:15:47", 1.0),  # no fraction
        ("2023-11-16T18:15:46.5", 0.5),  # ISO separator, one digit
        ("2023-11-16 18:15:46.123456789012", 0.123456789),  # more than nanoseconds: truncated
        ("2023-11-16 19:15:46.000000+01:00", 0.0),  # same instant in another zone
        ("2023-11-16 18:15:46.25Z", 0.25),
    ],
)
def test_azure_timestamp_variants(tmp_path: Path, second: str, expected_s: float) -> None:
    text = f"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n{second},2,2\n"
    trace = load_trace(write(tmp_path, "a.csv", text))
    assert trace[-1].arrival_s == pytest.approx(expected_s, abs=1e-9)


def test_mooncake(tmp_path: Path) -> None:
    text = mooncake_lines(
        {"timestamp": 1500, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 600, "output_length": 0, "hash_ids": [0, 2]},
        {"timestamp": 4000, "input_length": 7, "output_length": 9},
    )
    trace = load_trace(write(tmp_path, "m.jsonl", text + "\n"))  # a trailing blank line is fine
    assert arrivals(trace) == [0.0, 0.5, 3.0]
    assert [r.prefix_hashes for r in trace] == [[0, 2], [0, 1], None]
    assert trace[0].output_tokens == 1  # clamped from 0
    assert prefix_block_reuse(trace) == 0.25  # block 0 seen again: 1 of 4 blocks


def test_lengths_with_poisson_rate(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "l.csv", LENGTHS), rate=2.0, seed=1)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(3772, 54), (2015, 156), (100, 1)]
    assert arrivals(trace) == poisson_arrivals(3, 2.0, seed=1)


def test_lengths_with_another_traces_arrivals(tmp_path: Path) -> None:
    timed = load_trace(write(tmp_path, "a.csv", AZURE))
    trace = load_trace(write(tmp_path, "l.csv", LENGTHS), arrivals=timed)
    assert arrivals(trace) == arrivals(timed)
    short = load_trace(write(tmp_path, "l2.csv", LENGTHS), arrivals=[5.0, 7.5])
    assert arrivals(short) == [0.0, 2.5]  # as many requests as arrivals, re-based to 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of"),
        ({"rate": 1.0, "arrivals": [0.0]}, "exactly one of"),
    ],
)
def test_lengths_needs_one_arrival_source(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        load_trace(write(tmp_path, "l.csv", LENGTHS), **kwargs)


def test_arrivals_only_for_length_traces(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="length-only"):
        load_trace(write(tmp_path, "a.csv", AZURE), arrivals=[0.0, 1.0])


def test_rate_rescales_a_timed_trace(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "a.csv", AZURE), rate=10.0)
    assert trace_stats(trace).mean_rps == pytest.approx(10.0)


def test_max_requests_keeps_the_first(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "a.csv", AZURE), max_requests=2)
    assert [r.prompt_tokens for r in trace] == [374, 10]


@pytest.mark.parametrize(
    ("name", "text", "fmt"),
    [
        ("a.csv", AZURE, "azure"),
        ("l.csv", LENGTHS, "lengths"),
        ("m.jsonl", mooncake_lines({"timestamp": 0, "input_length": 1, "output_length": 1}), "mooncake"),
        ("bom.csv", "\ufeff" + AZURE, "azure"),  # byte-order mark from Excel exports
        ("lower.csv", AZURE.lower(), "azure"),
    ],
)
def test_detect_format(tmp_path: Path, name: str, text: str, fmt: str) -> None:
    path = write(tmp_path, name, text)
    assert detect_format(path) == fmt
    assert load_trace(path, rate=1.0) if fmt == "lengths" else load_trace(path)


def test_empty_traces(tmp_path: Path) -> None:
    assert load_trace(write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n")) == []
    assert load_trace(write(tmp_path, "m.jsonl", ""), fmt="mooncake") == []


# --- errors: file name and line number -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text", "line", "reason"),
    [
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\nyesterday,1,1\n", 3, "timestamp"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,12.5,1\n", 2, "whole number"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n\n2023-11-16 18:15:46,1\n", 3, "2 fields"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,0,5\n", 2, "at least 1"),
        ("a.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-13-16 18:15:46,1,1\n", 2, "month"),
        ("l.csv", "num_prefill_tokens,num_decode_tokens\n5,5\n5,abc\n", 3, "'abc'"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1}\n{"timestamp": 1,\n', 2, "JSON"),
        ("m.jsonl", '\n{"timestamp": 0, "input_length": 1}\n', 2, "output_length"),
        ("m.jsonl", '{"timestamp": "now", "input_length": 1, "output_length": 1}\n', 1, "timestamp"),
        ("m.jsonl", '{"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [1, "x"]}\n', 1, "hash_ids"),
        ("m.jsonl", "[1, 2]\n", 1, "JSON object"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path: Path, name: str, text: str, line: int, reason: str) -> None:
    path = write(tmp_path, name, text)
    fmt = "mooncake" if name.endswith(".jsonl") else "auto"
    with pytest.raises(TraceError, match=reason) as raised:
        load_trace(path, fmt=fmt, rate=1.0) if name == "l.csv" else load_trace(path, fmt=fmt)
    assert str(raised.value).startswith(f"{path}:{line}: ")


def test_missing_column_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46,1\n")
    with pytest.raises(TraceError, match=r":1: cannot tell the trace format"):
        load_trace(path)
    with pytest.raises(TraceError, match=r":1: header lacks column\(s\) \['generatedtokens'\]"):
        load_trace(path, fmt="azure")


def test_missing_file_is_a_trace_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot open"):
        load_trace(tmp_path / "nope.csv")


# --- arrival helpers -------------------------------------------------------------------------


def bursty(n: int = 2000, seed: int = 3) -> list[TraceRequest]:
    """Return a trace with lognormal (bursty) gaps."""
    gaps = np.random.default_rng(seed).lognormal(0.0, 2.0, n - 1)
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    return [TraceRequest(float(t), 100 + i, 10) for i, t in enumerate(times)]


@pytest.mark.parametrize("target_rps", [0.5, 3.0, 250.0])
def test_rescale_hits_target_and_keeps_shape(target_rps: float) -> None:
    trace = bursty()
    scaled = rescale_arrivals(trace, target_rps)
    before, after = trace_stats(trace), trace_stats(scaled)
    assert after.mean_rps == pytest.approx(target_rps)
    assert after.interarrival_cv == pytest.approx(before.interarrival_cv)  # bursts stay bursts
    assert [r.prompt_tokens for r in scaled] == [r.prompt_tokens for r in trace]  # order kept
    assert arrivals(scaled) == sorted(arrivals(scaled)) and scaled[0].arrival_s == 0.0


def test_rescale_edge_cases() -> None:
    together = [TraceRequest(0.0, 1, 1), TraceRequest(0.0, 2, 1)]
    assert rescale_arrivals(together, 5.0) == together  # no rate to scale
    assert rescale_arrivals([], 5.0) == []
    with pytest.raises(ValueError, match="positive"):
        rescale_arrivals(together, 0.0)


@pytest.mark.parametrize("rate", [0.2, 5.0, 400.0])
def test_poisson_rate_and_cv(rate: float) -> None:
    times = poisson_arrivals(20_000, rate, seed=7)
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert 1 / gaps.mean() == pytest.approx(rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV 1


def test_poisson_is_seeded() -> None:
    assert poisson_arrivals(50, 2.0, seed=4) == poisson_arrivals(50, 2.0, seed=4)
    assert poisson_arrivals(50, 2.0, seed=4) != poisson_arrivals(50, 2.0, seed=5)
    assert poisson_arrivals(0, 2.0) == []
    with pytest.raises(ValueError, match="positive"):
        poisson_arrivals(5, 0.0)


def test_with_arrivals_pairs_in_order() -> None:
    trace = [TraceRequest(0.0, p, 1) for p in (10, 20, 30)]
    assert [(r.arrival_s, r.prompt_tokens) for r in with_arrivals(trace, [2.0, 3.0])] == [(0.0, 10), (1.0, 20)]


@pytest.mark.parametrize("contiguous", [True, False])
def test_sample_keeps_order_and_rebases(contiguous: bool) -> None:
    trace = bursty(500)
    picked = sample(trace, 100, seed=2, contiguous=contiguous)
    prompts = [r.prompt_tokens for r in picked]
    assert len(picked) == 100 and prompts == sorted(prompts)
    assert picked[0].arrival_s == 0.0
    if contiguous:
        assert prompts == list(range(prompts[0], prompts[0] + 100))
    assert sample(trace, 100, seed=2, contiguous=contiguous) == picked  # seeded


def test_sample_larger_than_trace_returns_all() -> None:
    trace = bursty(10)
    assert sample(trace, 50) == trace


def test_trace_stats_small_and_empty() -> None:
    trace = [TraceRequest(0.0, 100, 10), TraceRequest(1.0, 300, 30), TraceRequest(3.0, 200, 20)]
    stats = trace_stats(trace)
    assert (stats.count, stats.duration_s, stats.mean_rps) == (3, 3.0, pytest.approx(2 / 3))
    assert stats.interarrival_cv == pytest.approx(0.5 / 1.5)  # gaps 1 and 2
    assert (stats.prompt_mean, stats.prompt_p50, stats.output_p50) == (200.0, 200.0, 20.0)
    assert stats.prefix_block_reuse is None
    empty = trace_stats([])
    assert (empty.count, empty.duration_s, empty.mean_rps, empty.prompt_p99) == (0, 0.0, None, None)


# --- bundled samples -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "cv_range"),
    [
        ("azure-code", 2000, (8.0, 20.0)),  # very bursty
        ("azure-conv", 2000, (0.9, 1.4)),  # near Poisson
        ("arxiv", 2000, (0.9, 1.1)),  # Poisson arrivals given below
        ("mooncake", 500, (0.8, 1.3)),
    ],
)
def test_bundled_samples_load(name: str, count: int, cv_range: tuple[float, float]) -> None:
    path = bundled(name)
    assert path.is_file() and "shared" not in path.parts
    trace = load_trace(path, rate=5.0) if name == "arxiv" else load_trace(path)
    stats = trace_stats(trace)
    assert stats.count == count
    assert cv_range[0] < stats.interarrival_cv < cv_range[1]
    assert trace[0].arrival_s == 0.0 and arrivals(trace) == sorted(arrivals(trace))
    assert min(r.output_tokens for r in trace) >= 1


def test_bundled_mooncake_has_prefix_reuse() -> None:
    assert trace_stats(load_trace(bundled("mooncake"))).prefix_block_reuse > 0.5


def test_bundled_unknown_name() -> None:
    with pytest.raises(KeyError, match="azure-code"):
        bundled("sharegpt")
    assert set(BUNDLED) == {"azure-code", "azure-conv", "arxiv", "mooncake"}


def test_bundled_license_and_readme_ship() -> None:
    data = bundled("azure-code").parent
    assert (data / "LICENSE.azure-CC-BY-4.0.txt").is_file()
    assert "CC-BY 4.0" in (data / "README.md").read_text()
