"""Peer routers in front of simulated GPUs: prompts that share prefixes, sim-servers, a replay through them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest

from dio.ops.bench.peers import (
    LOAD_FORMAT,
    peer_command,
    prompt_text_for,
    prompt_token_ids_for,
    replay_http,
    start_peer,
    start_sim_servers,
    stop_processes,
)
from dio.ops.redis_server import free_port
from dio.ops.traces import TraceRequest, bundled, load_trace, rescale_arrivals

MODEL = "llama-3.2-3b"
TIME_SCALE = 50.0  # a short replay: correctness, not timing


def _runs(command: list[str]) -> str | None:
    """Return None if ``command --help`` runs here, else why not."""
    try:
        done = subprocess.run([*command, "--help"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{command[0]} cannot run here: {exc}"
    return None if done.returncode == 0 else f"{' '.join(command)} --help exited {done.returncode}"


def _peer_skip_reason(name: str) -> str | None:
    launcher = peer_command(name, "round_robin", ["http://127.0.0.1:1", "http://127.0.0.1:2"], 1)
    launcher = launcher[: launcher.index("--worker-urls")]
    return _runs(launcher[:1] if name == "vllm-router" else launcher[:3])


def _trace(n: int) -> list[TraceRequest]:
    """Return the first n requests of the bundled Mooncake trace (shared prefixes), 4 requests a second."""
    return rescale_arrivals(load_trace(bundled("mooncake"), max_requests=n), 4.0)


# --- prompts --------------------------------------------------------------------------------------


def test_prompts_share_the_blocks_their_hash_ids_share() -> None:
    a = TraceRequest(0.0, 1200, 5, prefix_hashes=[11, 12, 13])
    b = TraceRequest(1.0, 1100, 5, prefix_hashes=[11, 12, 99])
    ids_a, ids_b = prompt_token_ids_for(a, 0), prompt_token_ids_for(b, 1)
    assert (len(ids_a), len(ids_b)) == (1200, 1100)
    assert ids_a[:1024] == ids_b[:1024] and ids_a[1024:1100] != ids_b[1024:1100]
    assert prompt_token_ids_for(a, 0) == ids_a  # deterministic
    plain = TraceRequest(0.0, 700, 5)
    assert prompt_token_ids_for(plain, 3) != prompt_token_ids_for(plain, 4)  # no hash ids: unique to the request
    text_a, text_b = prompt_text_for(a, 0), prompt_text_for(b, 1)
    assert len(text_a) == 4 * 1200 and text_a[: 4 * 1024] == text_b[: 4 * 1024]


def test_peer_command_checks_names_and_policies() -> None:
    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    command = peer_command("sglang-router", "cache_aware", urls, 9000)
    assert command[1:3] == ["-m", "sglang_router.launch_router"] and "--prometheus-port" in command
    with pytest.raises(ValueError, match="no policy"):
        peer_command("sglang-router", "kv_aware", urls, 9000)
    with pytest.raises(ValueError, match="unknown peer"):
        peer_command("nginx", "round_robin", urls, 9000)
    with pytest.raises(ValueError, match="at least 2"):
        peer_command("vllm-router", "power_of_two", urls[:1], 9000)


# --- replays --------------------------------------------------------------------------------------


@pytest.fixture
def sim_servers(request: pytest.FixtureRequest) -> Iterator[list[str]]:
    """Two simulated L4s in one sim-server process; the /get_load shape is the test's parameter."""
    servers = start_sim_servers("L4:2", MODEL, TIME_SCALE, load_format=request.param)
    yield [url for url, _ in servers]
    stop_processes([proc for _, proc in servers])


@pytest.mark.parametrize("sim_servers", ["vllm-router"], indirect=True)
def test_replay_straight_to_a_sim_server(sim_servers: list[str]) -> None:
    trace = _trace(10) + [TraceRequest(3.0, 200_000, 10)]  # the last one is longer than the context
    records = asyncio.run(replay_http(sim_servers[0], trace, model=MODEL, time_scale=TIME_SCALE,
                                      prompt_format="tokens"))
    assert [r["status"] for r in records] == ["completed"] * 10 + ["rejected"]
    assert records[-1]["http_status"] == 400 and "maximum context length" in records[-1]["error"]
    assert all(r["output_tokens"] == t.output_tokens for r, t in zip(records[:10], trace, strict=False))
    assert all(0 < r["ttft_s"] <= r["latency_s"] for r in records[:10])


@pytest.mark.parametrize(("peer", "policy", "sim_servers"),
                         [("vllm-router", "round_robin", LOAD_FORMAT["vllm-router"]),
                          ("sglang-router", "power_of_two", LOAD_FORMAT["sglang-router"])],
                         indirect=["sim_servers"])
def test_replay_through_a_peer_router(peer: str, policy: str, sim_servers: list[str]) -> None:
    reason = _peer_skip_reason(peer)
    if reason:
        pytest.skip(reason)
    port = free_port()
    router = start_peer(peer, policy, sim_servers, port)
    try:
        trace = _trace(30)
        records = asyncio.run(replay_http(f"http://127.0.0.1:{port}", trace, model=MODEL, time_scale=TIME_SCALE))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/get_loads", timeout=5) as response:
            loads = json.loads(response.read())["workers"]
    finally:
        stop_processes([router])
    assert sorted(w["worker"] for w in loads) == sorted(sim_servers)
    assert all(w["load"] >= 0 for w in loads)  # the router parsed our /get_load (-1: it could not)
    assert [r["error"] for r in records if r["status"] != "completed"] == []
    assert [r["output_tokens"] for r in records] == [t.output_tokens for t in trace]
    assert all(r["latency_s"] > 0 and r["ttft_s"] is not None for r in records)
