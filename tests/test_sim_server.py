"""The simulated GPU over HTTP answers like a vLLM OpenAI server, checked with the official client."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest

from dio.gpu_worker.engine import EngineRequest
from dio.gpu_worker.sim.engine import SimEngine
from dio.ops.bench.sim_server import (
    ServerSpec,
    parse_prompts,
    prefix_hashes_for_ids,
    prefix_hashes_for_text,
    start_servers,
    token_text,
)

MODEL = "llama-3.2-3b"
TIME_SCALE = 5.0


async def _serve(engine: SimEngine, load_format: str = "vllm-router") -> tuple[str, list]:
    runners = await start_servers([ServerSpec(engine, 0)], load_format=load_format)
    port = runners[0].addresses[0][1]
    return f"http://127.0.0.1:{port}", runners


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, SimEngine]]:
    """Serve a simulated L4 on a free port in this event loop."""
    engine = SimEngine("L4", MODEL, time_scale=TIME_SCALE)
    url, runners = await _serve(engine)
    yield url, engine
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client(server: tuple[str, SimEngine]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0) as oai:
        yield oai


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


# --- prompts --------------------------------------------------------------------------------------


def test_prompt_lengths_and_prefix_hashes() -> None:
    text, ids = parse_prompts("x" * 2049)[0], parse_prompts(list(range(1025)))[0]
    assert text.tokens == 513 and len(text.prefix_hashes) == 2  # ceil(2049 / 4); 2048-character blocks
    assert ids.tokens == 1025 and len(ids.prefix_hashes) == 3  # 512-token blocks, the partial one included
    assert [p.tokens for p in parse_prompts([[1, 2], "abcdefgh"])] == [2, 2]
    shared = prefix_hashes_for_ids(list(range(1024)) + [7])
    other = prefix_hashes_for_ids(list(range(1024)) + [8])
    assert shared[:2] == other[:2] and shared[2] != other[2]
    assert prefix_hashes_for_ids([1] * 512)[0] != prefix_hashes_for_ids([2] + [1] * 511)[0]
    assert prefix_hashes_for_text("a" * 4096)[0] == prefix_hashes_for_text("a" * 2048 + "b" * 10)[0]
    assert all(len(token_text(t)) == 4 for t in (0, 1, 31_999, 46_655))


@pytest.mark.parametrize("bad", [[], "", [1.5], [[1], []], {"a": 1}, [True]])
def test_bad_prompts_are_rejected(bad: object) -> None:
    with pytest.raises(Exception, match="prompt"):
        parse_prompts(bad)


# --- the OpenAI endpoints -------------------------------------------------------------------------


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] > 100_000


async def test_completion_text_and_token_prompts(client: openai.AsyncOpenAI) -> None:
    text = await client.completions.create(model=MODEL, prompt="hello simulated world", max_tokens=7)
    assert text.object == "text_completion" and text.choices[0].finish_reason == "length"
    assert len(text.choices[0].text) == 7 * 4
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (math.ceil(21 / 4), 7)
    ids = await client.completions.create(model=MODEL, prompt=list(range(100)), max_tokens=3,
                                          extra_body={"ignore_eos": True})
    assert (ids.usage.prompt_tokens, ids.usage.completion_tokens, ids.usage.total_tokens) == (100, 3, 103)
    many = await client.completions.create(model=MODEL, prompt=[[1, 2, 3], [4, 5]], max_tokens=2)
    assert sorted(c.index for c in many.choices) == [0, 1] and many.usage.prompt_tokens == 5
    samples = await client.completions.create(model=MODEL, prompt=[1, 2, 3], max_tokens=2, n=2)
    assert len(samples.choices) == 2 and (samples.usage.prompt_tokens, samples.usage.completion_tokens) == (3, 4)


async def test_chat(client: openai.AsyncOpenAI) -> None:
    chat = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=5)
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant" and len(chat.choices[0].message.content) == 20
    assert chat.usage.completion_tokens == 5 and chat.usage.prompt_tokens > 0


async def test_streaming_completion_and_chat(client: openai.AsyncOpenAI) -> None:
    stream = await client.completions.create(model=MODEL, prompt=list(range(50)), max_tokens=9, stream=True,
                                             stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert texts[0] and len("".join(texts)) == 9 * 4  # the first chunk is the first token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 9
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    chat = await client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, stream=True)
    deltas = [c.choices[0].delta async for c in chat]
    assert deltas[0].role == "assistant" and len("".join(d.content or "" for d in deltas)) == 16


async def test_prefix_cache_over_http(client: openai.AsyncOpenAI) -> None:
    shared = list(range(1024))
    await client.completions.create(model=MODEL, prompt=shared + [1] * 100, max_tokens=1)
    second = await client.completions.create(model=MODEL, prompt=shared + [2] * 100, max_tokens=1)
    assert second.usage.prompt_tokens_details.cached_tokens == 1024


async def test_errors_like_vllm(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=10_000_000)
    assert too_long.value.status_code == 400 and "maximum context length" in too_long.value.message
    with pytest.raises(openai.BadRequestError):
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="another-model", prompt="hi", max_tokens=1)


async def test_kv_exhaustion_recomputes_like_vllm_and_a_failure_limit_is_a_500() -> None:
    # vLLM recomputes preempted requests as often as it takes: every request completes, later.
    engine = SimEngine("L4", MODEL, time_scale=50.0, kv_capacity_tokens=1000)  # 3 requests overflow it
    results = await _three_overflowing_requests(engine)
    assert all(not isinstance(r, Exception) and r.usage.completion_tokens == 600 for r in results)
    assert engine.scheduler.stats().preemptions > 0
    # With a failure limit (a what-if, not vLLM's behaviour) the ones preempted past it get a 500.
    limited = SimEngine("L4", MODEL, time_scale=50.0, kv_capacity_tokens=1000, max_preemptions=0)
    results = await _three_overflowing_requests(limited)
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors and all(isinstance(e, openai.InternalServerError) for e in errors)
    assert "KV cache exhausted" in errors[0].message
    assert any(not isinstance(r, Exception) and r.usage.completion_tokens == 600 for r in results)


async def _three_overflowing_requests(engine: SimEngine) -> list:
    url, runners = await _serve(engine)
    try:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oai:
            calls = [oai.completions.create(model=MODEL, prompt=[1] * 300, max_tokens=600) for _ in range(3)]
            return list(await asyncio.gather(*calls, return_exceptions=True))
    finally:
        for runner in runners:
            await runner.cleanup()


# --- the other endpoints --------------------------------------------------------------------------


async def test_health_metrics_and_load(server: tuple[str, SimEngine], client: openai.AsyncOpenAI) -> None:
    url, _ = server
    await client.completions.create(model=MODEL, prompt="abcd" * 10, max_tokens=3)
    assert (await _get(url + "/health"))[0] == 200
    status, text = await _get(url + "/metrics")
    assert status == 200
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
        assert f'{name}{{engine="0",model_name="{MODEL}"}}' in text
    assert f'vllm:prompt_tokens_total{{engine="0",model_name="{MODEL}"}} 10.0' in text
    assert f'vllm:generation_tokens_total{{engine="0",model_name="{MODEL}"}} 3.0' in text
    load = json.loads((await _get(url + "/get_load"))[1])  # vllm-router reads "load" (an integer)
    assert isinstance(load["load"], int) and load["num_reqs"] == 0
    ranks = json.loads((await _get(url + "/get_load?format=sglang"))[1])  # sglang-router sums num_tokens
    assert ranks == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
    assert json.loads((await _get(url + "/load"))[1]) == {"server_load": 0}


async def test_get_load_counts_work_in_flight() -> None:
    engine = SimEngine("T4", MODEL, time_scale=1.0, max_num_seqs=1)
    url, runners = await _serve(engine, load_format="sglang")
    try:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as oai:
            calls = [asyncio.create_task(oai.completions.create(model=MODEL, prompt=[1] * 400, max_tokens=500))
                     for _ in range(2)]
            await asyncio.sleep(0.3)
            ranks = json.loads((await _get(url + "/get_load"))[1])
            for call in calls:
                call.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
    finally:
        for runner in runners:
            await runner.cleanup()
    assert ranks[0]["num_reqs"] == 2 and ranks[0]["num_waiting_reqs"] == 1
    assert ranks[0]["num_tokens"] >= 800  # one request's KV plus the other's queued prompt


async def test_disconnect_aborts_the_request(server: tuple[str, SimEngine]) -> None:
    url, engine = server
    body = {"model": MODEL, "prompt": [1] * 10, "max_tokens": 5000, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/v1/completions", json=body) as response:
            await response.content.readline()  # the first token's chunk
            assert engine.stats().running == 1
    for _ in range(50):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats().running == 0 and engine.stats().kv_used_tokens == 0


# --- timings: the same as the in-process engine -----------------------------------------------------

TIMED = [(1500, 60), (800, 80), (200, 40), (3000, 30)]  # (prompt tokens, output tokens)
SPACING_S = 0.05  # wall seconds between arrivals (0.25 simulated s): batched, yet in a fixed order


async def _timed_http(url: str, attempt: int) -> list[tuple[float, float]]:
    """Stream each request over plain aiohttp (the lightest client) and time it, in simulated seconds."""
    async with aiohttp.ClientSession() as session:
        async def one(i: int, prompt: int, output: int) -> tuple[float, float]:
            tokens = [attempt * len(TIMED) + i + 1] * prompt  # no prefix shared with an earlier attempt
            body = {"model": MODEL, "prompt": tokens, "max_tokens": output, "stream": True}
            await asyncio.sleep(i * SPACING_S)
            started, ttft = time.monotonic(), None
            async with session.post(url + "/v1/completions", json=body) as response:
                async for line in response.content:
                    if ttft is None and line.startswith(b"data: {"):
                        ttft = time.monotonic() - started
            return ttft * TIME_SCALE, (time.monotonic() - started) * TIME_SCALE

        return list(await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(TIMED))))


async def _timed_in_process() -> list[tuple[float, float]]:
    engine = SimEngine("L4", MODEL, time_scale=TIME_SCALE)
    await engine.start()

    async def one(i: int, prompt: int, output: int) -> tuple[float, float]:
        await asyncio.sleep(i * SPACING_S)
        started, ttft = time.monotonic(), None
        async for out in engine.stream(EngineRequest(f"r{i}", prompt, output, prefix_hashes=[i])):
            if ttft is None and out.output_tokens:
                ttft = time.monotonic() - started
        return ttft * TIME_SCALE, (time.monotonic() - started) * TIME_SCALE

    try:
        return list(await asyncio.gather(*(one(i, p, o) for i, (p, o) in enumerate(TIMED))))
    finally:
        await engine.shutdown()


def _mismatches(over_http: list[tuple[float, float]], in_process: list[tuple[float, float]]) -> list[str]:
    """Return the requests whose TTFT or latency differ by more than 5% + 0.1 simulated s."""
    out = []
    for i, (http, local) in enumerate(zip(over_http, in_process, strict=True)):
        for what, a, b in (("ttft", http[0], local[0]), ("latency", http[1], local[1])):
            if a != pytest.approx(b, rel=0.05, abs=0.1):
                out.append(f"request {i} {what}: {a:.3f} s over HTTP, {b:.3f} s in process")
    return out


async def test_timings_match_the_in_process_engine(server: tuple[str, SimEngine]) -> None:
    mismatches: list[str] = []
    for attempt in range(2):  # a loaded machine can stall one hop for tens of ms: one more try
        over_http = await _timed_http(server[0], attempt)
        in_process = await _timed_in_process()
        assert max(lat for _, lat in in_process) > 1.0  # the requests overlapped: batching was exercised
        mismatches = _mismatches(over_http, in_process)
        if not mismatches:
            return
    pytest.fail("; ".join(mismatches))
