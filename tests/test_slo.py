"""SLOs in TTFT and TPOT (dio.ops.slo), and the demo that reports attainment against them."""

from __future__ import annotations

import pytest

from dio.ops.demo import DemoConfig, demo_slo, fields_for
from dio.ops.slo import PRESETS, max_tokens_cap, meets, parse_slo, preset_for
from dio.ops.traces import TraceRequest
from dio.protocol.keys import SIM_EOS_METADATA

CHAT = PRESETS["chat"]


def test_a_request_meets_its_slo_only_within_both_limits():
    assert meets(CHAT, ttft_ms=1900.0, latency_ms=1900.0 + 99.0 * 10, output_tokens=11)  # TPOT 99 ms
    assert not meets(CHAT, ttft_ms=2100.0, latency_ms=2200.0, output_tokens=2)  # first token late
    assert not meets(CHAT, ttft_ms=100.0, latency_ms=100.0 + 101.0 * 10, output_tokens=11)  # TPOT 101 ms
    assert meets(CHAT, ttft_ms=100.0, latency_ms=5000.0, output_tokens=1)  # one token: no TPOT
    assert not meets(CHAT, ttft_ms=None, latency_ms=None, output_tokens=0)  # never started


def test_slos_are_named_by_preset_or_given_in_ms():
    assert parse_slo("interactive") is PRESETS["interactive"]
    given = parse_slo("750:40")
    assert (given.ttft_ms, given.tpot_ms) == (750.0, 40.0)
    for bad in ("fast", "750", "0:40", "750:-1"):
        with pytest.raises(ValueError, match="preset"):
            parse_slo(bad)
    assert [preset_for(t) for t in ("azure-conv", "azure-code", "arxiv", "mooncake")] == [
        "chat", "chat", "summarization", "long-context"]


def test_the_cap_is_the_power_of_two_at_or_above_the_p99_output():
    assert max_tokens_cap([10] * 90 + [300] * 10) == 512  # the p99 output is 300: the next power of two
    assert max_tokens_cap([3] * 100) == 256  # never below 256


def test_the_demo_sends_the_cap_and_the_slo_in_wall_time():
    config = DemoConfig(time_scale=10.0)
    trace = [TraceRequest(0.0, 100, 20), TraceRequest(0.1, 200, 700)]
    fields = fields_for(config, trace, ["m", "m"])(1, trace[1])
    assert demo_slo(config) is CHAT
    assert fields["max_tokens"] == 1024 and fields["metadata"] == {SIM_EOS_METADATA: "700"}  # the router sees the cap
    assert (fields["ttft_slo_ms"], fields["tpot_slo_ms"]) == (200.0, 10.0)  # simulated ms / time scale
