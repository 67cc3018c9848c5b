"""SimEngine on the asyncio clock (fast time scales), and InstantEngine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from dio.gpu_worker.daemon import to_engine_request
from dio.gpu_worker.engine import EngineError, EngineOutput, EngineRequest, OutOfMemory, RequestRejected
from dio.gpu_worker.instant import InstantEngine
from dio.gpu_worker.sim import SimEngine, roofline
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.protocol.keys import SIM_EOS_METADATA
from dio.protocol.models import Request

H100 = get_profile("H100")
LLAMA_3B = get_model("llama-3.2-3b")


@pytest.fixture
async def engine() -> AsyncIterator[SimEngine]:
    sim = SimEngine("H100", "llama-3.2-3b", time_scale=50)
    await sim.start()
    yield sim
    await sim.shutdown()


async def collect(engine, request: EngineRequest) -> list[tuple[float, EngineOutput]]:
    """Return each output of a request's stream with the wall time it arrived."""
    return [(time.time(), out) async for out in engine.stream(request)]


async def test_concurrent_requests_stream_first_token_then_final(engine: SimEngine) -> None:
    requests = [EngineRequest(f"r{i}", prompt_tokens=500 + 100 * i, max_tokens=50 + 10 * i) for i in range(16)]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    for request, outputs in zip(requests, results, strict=True):
        (_, first), (done_at, final) = outputs
        assert (first.output_tokens, first.finished) == (1, False)
        assert final.finished and final.finish_reason == "length"
        assert final.output_tokens == len(final.token_ids) == request.max_tokens
        assert final.prompt_tokens == request.prompt_tokens
        assert final.first_token_at is not None and final.first_token_at <= done_at + 0.01
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_used_tokens) == (0, 0, 0)
    assert stats.extra["finished"] == 16


async def test_wall_time_is_simulated_time_over_time_scale(engine: SimEngine) -> None:
    simulated = roofline.unloaded_service_time_s(H100, LLAMA_3B, 1000, 1500)  # ~5.4 s
    expected = simulated / engine.time_scale  # ~0.11 s of wall time
    start = time.perf_counter()
    await engine.generate(EngineRequest("timed", prompt_tokens=1000, max_tokens=1500))
    wall = time.perf_counter() - start
    assert expected * 0.95 <= wall <= expected * 1.2 + 0.05  # late timers on a busy machine, never early


async def test_abort_ends_the_stream_and_frees_kv(engine: SimEngine) -> None:
    outputs = []

    async def consume() -> None:
        async for out in engine.stream(EngineRequest("long", prompt_tokens=1000, max_tokens=100_000)):
            outputs.append(out)

    task = asyncio.create_task(consume())
    while not outputs:  # wait for the first token
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.02)
    assert engine.stats().kv_used_tokens > 1000
    await engine.abort("long")
    await asyncio.wait_for(task, 1.0)
    final = outputs[-1]
    assert final.finished and final.finish_reason == "abort"
    assert 1 < final.output_tokens < 100_000
    stats = engine.stats()
    assert (stats.running, stats.kv_used_tokens) == (0, 0)


async def test_cancelled_consumer_frees_its_request(engine: SimEngine) -> None:
    task = asyncio.create_task(engine.generate(EngineRequest("gone", prompt_tokens=1000, max_tokens=100_000)))
    await asyncio.sleep(0.05)
    assert engine.stats().running == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.stats().running == 0


async def test_stats_and_capacity_while_running(engine: SimEngine) -> None:
    tasks = [
        asyncio.create_task(engine.generate(EngineRequest(f"s{i}", prompt_tokens=2000, max_tokens=2000)))
        for i in range(8)
    ]
    await asyncio.sleep(0.05)
    stats = engine.stats()
    assert stats.running == 8
    assert 8 * 2000 <= stats.kv_used_tokens <= 8 * 4000
    assert 0 < stats.kv_usage < 0.1
    capacity = engine.capacity()
    assert (capacity.gpu, capacity.model, capacity.time_scale) == ("H100-80GB", "llama-3.2-3b", 50)
    assert capacity.kv_capacity_tokens == roofline.kv_capacity_tokens(H100, LLAMA_3B)
    assert capacity.kv_bytes_per_token == 114_688 and capacity.max_num_seqs == 256
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_too_long_request_is_rejected(engine: SimEngine) -> None:
    with pytest.raises(RequestRejected, match="max_model_len"):
        await engine.generate(EngineRequest("huge", prompt_tokens=200_000, max_tokens=10))


async def test_duplicate_request_id_is_an_error(engine: SimEngine) -> None:
    first = asyncio.create_task(engine.generate(EngineRequest("dup", prompt_tokens=100, max_tokens=1000)))
    await asyncio.sleep(0.01)
    with pytest.raises(EngineError, match="already running"):
        await engine.generate(EngineRequest("dup", prompt_tokens=100, max_tokens=10))
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)


async def test_overcommitted_kv_cache_fails_requests_with_out_of_memory() -> None:
    sim = SimEngine("T4", "llama-3.2-3b", time_scale=2000, kv_capacity_tokens=4096, max_preemptions=0)
    await sim.start()
    try:
        requests = [EngineRequest(f"o{i}", prompt_tokens=500, max_tokens=1500) for i in range(6)]
        results = await asyncio.gather(*(sim.generate(r) for r in requests), return_exceptions=True)
    finally:
        await sim.shutdown()
    failures = [r for r in results if isinstance(r, OutOfMemory)]
    assert failures and "KV cache exhausted: preempted 1 times on T4" in str(failures[0])
    assert any(isinstance(r, EngineOutput) and r.output_tokens == 1500 for r in results)


async def test_several_engines_share_one_event_loop() -> None:
    engines = [SimEngine(gpu, "llama-3.2-3b", time_scale=100) for gpu in ("H100", "A100", "L4")]
    for sim in engines:
        await sim.start()
    try:
        outputs = await asyncio.gather(
            *(sim.generate(EngineRequest(f"e{i}", prompt_tokens=1000, max_tokens=100)) for i, sim in enumerate(engines))
        )
    finally:
        for sim in engines:
            await sim.shutdown()
    assert [o.output_tokens for o in outputs] == [100, 100, 100]


async def test_shutdown_fails_open_streams() -> None:
    sim = SimEngine("H100", "llama-3.2-3b", time_scale=10)
    await sim.start()
    task = asyncio.create_task(sim.generate(EngineRequest("open", prompt_tokens=100, max_tokens=10_000)))
    await asyncio.sleep(0.01)
    await sim.shutdown()
    with pytest.raises(EngineError, match="shut down"):
        await task


def test_model_that_does_not_fit_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        SimEngine("T4", "llama-3.1-8b")


async def test_instant_engine_returns_max_tokens_at_once() -> None:
    engine = InstantEngine(max_num_seqs=64)
    outputs = await asyncio.gather(
        *(engine.generate(EngineRequest(f"i{i}", prompt_tokens=10, max_tokens=5 + i)) for i in range(100))
    )
    assert [o.output_tokens for o in outputs] == [5 + i for i in range(100)]
    assert all(o.finished and len(o.token_ids) == o.output_tokens for o in outputs)
    again = await engine.generate(EngineRequest("i0", prompt_tokens=10, max_tokens=5))
    assert again.token_ids == outputs[0].token_ids  # deterministic
    capacity = engine.capacity()
    assert capacity.max_num_seqs == 64 and capacity.kv_capacity_tokens >= 1_000_000
    assert engine.stats().running == 0
    with pytest.raises(RequestRejected):
        await engine.generate(EngineRequest("big", prompt_tokens=20_000_000, max_tokens=1))


@pytest.mark.parametrize(("eos", "ignore_eos", "tokens", "reason"), [
    (7, False, 7, "stop"),  # the simulated model emits EOS after 7 tokens, well under its cap
    (500, False, 64, "length"),  # max_tokens caps it
    (7, True, 64, "length"),  # ignore_eos runs it to max_tokens, as vLLM
    (None, False, 64, "length"),  # no EOS given: it runs to max_tokens
])
async def test_sim_engine_stops_at_the_eos_it_was_given(engine: SimEngine, eos, ignore_eos, tokens, reason) -> None:
    final = await engine.generate(EngineRequest("e", prompt_tokens=100, max_tokens=64, eos_tokens=eos,
                                                ignore_eos=ignore_eos))
    assert (final.output_tokens, len(final.token_ids or []), final.finish_reason) == (tokens, tokens, reason)


async def test_instant_engine_honours_the_eos_too() -> None:
    engine = InstantEngine()
    assert (await engine.generate(EngineRequest("e", prompt_tokens=10, max_tokens=64, eos_tokens=7))).output_tokens == 7
    capped = await engine.generate(EngineRequest("c", prompt_tokens=10, max_tokens=64, eos_tokens=700))
    assert (capped.output_tokens, capped.finish_reason) == (64, "length")


@pytest.mark.parametrize(("metadata", "expected"), [
    (None, None),
    ({"user": "u1"}, None),  # other metadata is not the engine's
    ({SIM_EOS_METADATA: "7"}, 7),
    ({SIM_EOS_METADATA: "0"}, RequestRejected),  # the model must emit at least one token
    ({SIM_EOS_METADATA: "-3"}, RequestRejected),
    ({SIM_EOS_METADATA: "soon"}, RequestRejected),
    ({SIM_EOS_METADATA: "7.5"}, RequestRejected),
])
def test_the_worker_reads_the_simulated_eos_from_metadata(metadata, expected) -> None:
    request = Request(id="r", prompt="x", max_tokens=256, metadata=metadata)
    if expected is RequestRejected:
        with pytest.raises(RequestRejected, match=SIM_EOS_METADATA):
            to_engine_request(request)
    else:
        assert to_engine_request(request).eos_tokens == expected
