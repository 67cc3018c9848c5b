"""Per-request SLOs in the units the field uses: time to first token and time per output token (pure).

A request meets its SLO when its TTFT is within the TTFT limit and its mean time per output token
after the first (TPOT) within the TPOT limit; one that did not complete misses it. The named
presets carry their source. ``dio demo`` reports attainment against one (``chat`` by default) and
``dio bench goodput`` measures goodput against them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dio.protocol import defaults as d

MIN_CAP_TOKENS = 256  # the max_tokens cap is never below this
CAP_PERCENTILE = 99  # ...and is the power of two at or above this percentile of the trace's outputs


@dataclass(frozen=True)
class Slo:
    """A per-request SLO: time to first token and mean time per output token after it (ms)."""

    name: str
    ttft_ms: float
    tpot_ms: float
    source: str = ""
    standard: bool = True  # held to the goodput benchmark's feasibility rule (every GPU type meets it idle)

    def brief(self) -> dict[str, Any]:
        return {"name": self.name, "ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms}


PRESETS: dict[str, Slo] = {s.name: s for s in (
    Slo("chat", 2000.0, 100.0, "MLPerf Inference v5.1, Llama-3.1-8B, server scenario: TTFT 2 s, TPOT 100 ms "
        "(Azure conversation, Azure code, ShareGPT)"),
    Slo("summarization", 15000.0, 150.0, "DistServe (OSDI'24) Table 1, summarization on LongBench: TTFT 15 s, "
        "TPOT 150 ms (arXiv summarization)"),
    Slo("long-context", 30000.0, 100.0, "DIO's setting for Mooncake's long contexts (mean ~15k, p99 ~66k prompt "
        "tokens): TTFT 30 s, TPOT 100 ms"),
    Slo("interactive", 500.0, 30.0, "MLPerf Inference v5.1, Llama-3.1-8B, interactive scenario: TTFT 500 ms, "
        "TPOT 30 ms (deliberately tight; not held to the feasibility rule)", standard=False),
)}


def parse_slo(text: str) -> Slo:
    """Return the SLO ``text`` names: a preset, or ``TTFT_MS:TPOT_MS``; ValueError, saying what is allowed, else."""
    text = text.strip()
    if text in PRESETS:
        return PRESETS[text]
    ttft, sep, tpot = text.partition(":")
    try:
        slo = Slo(f"{float(ttft):g}:{float(tpot):g}", float(ttft), float(tpot), "given on the command line")
    except ValueError:
        slo = None
    if not sep or slo is None or not (0 < slo.ttft_ms <= d.MAX_SLO_MS and 0 < slo.tpot_ms <= d.MAX_SLO_MS):
        raise ValueError(f"--slo takes a preset ({', '.join(PRESETS)}) or TTFT_MS:TPOT_MS, got {text!r}")
    return slo


def tpot_ms(ttft_ms: float, latency_ms: float, output_tokens: int) -> float | None:
    """A request's mean time per output token after the first (None: one token, no TPOT)."""
    if output_tokens <= 1:
        return None
    return (latency_ms - ttft_ms) / (output_tokens - 1)


def meets(slo: Slo, ttft_ms: float | None, latency_ms: float | None, output_tokens: int) -> bool:
    """Whether a completed request's times meet ``slo`` (a one-token output meets any TPOT limit)."""
    if ttft_ms is None or latency_ms is None or ttft_ms > slo.ttft_ms:
        return False
    tpot = tpot_ms(ttft_ms, latency_ms, output_tokens)
    return tpot is None or tpot <= slo.tpot_ms


def max_tokens_cap(output_tokens: Sequence[int]) -> int:
    """The ``max_tokens`` every request of a trace is sent with: the power of two at or above its p99 output, >= 256.

    A real client does not know how long an answer will be; it sends a cap, and the router sees
    only that (the true length stays inside the simulated engine, where its model "stops at EOS").
    """
    p99 = float(np.percentile(np.asarray(output_tokens, dtype=float), CAP_PERCENTILE))
    cap = max(MIN_CAP_TOKENS, 2 ** math.ceil(math.log2(max(p99, 1.0))))
    return min(cap, d.MAX_OUTPUT_TOKENS)


def preset_for(trace: str) -> str:
    """The preset a trace is measured against, by name: summarization (arXiv), long-context (Mooncake), else chat."""
    name = trace.lower()
    if "arxiv" in name:
        return "summarization"
    if "mooncake" in name:
        return "long-context"
    return "chat"
