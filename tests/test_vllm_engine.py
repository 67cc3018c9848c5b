"""The vLLM adapter: request translation, streaming, abort, rejection, capacity and telemetry.

Tests taking the ``engine`` fixture run twice: against the CPU stand-in (``vllm_standin.py``)
everywhere, and against the real vLLM with the bundled tiny-llama config and random weights when
run with ``pytest -m gpu`` on a machine with a GPU and vLLM (skipped otherwise). The others check
logic that only the stand-in can provoke (injected errors, fixed metrics).
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from dio.gpu_worker import nvml
from dio.gpu_worker.engine import EngineError, EngineOutput, EngineRequest, OutOfMemory, RequestRejected
from dio.gpu_worker.vllm_engine import (
    VllmEngine,
    bundled_model_path,
    kv_bytes_per_token,
    read_model_config,
    synthetic_token_ids,
)
from dio.gpu_worker.vllm_standin import Counter, Gauge, StandinBackend

module_loop = pytest.mark.asyncio(loop_scope="module")  # the loop the module-scoped engine lives in

MODEL = "tiny-llama-1b"
TINY_KV_BYTES_PER_TOKEN = 2 * 16 * 8 * 128 * 2  # K+V x layers x KV heads x head dim x bf16
MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 64
VOCAB = 32000


def _ids(n: int, start: int = 100) -> list[int]:
    return [(start + 7 * i) % (VOCAB - 3) + 3 for i in range(n)]


def _request(rid: str, n_prompt: int = 32, max_tokens: int = 16, **kw: object) -> EngineRequest:
    ids = kw.pop("prompt_token_ids", None) or _ids(n_prompt, start=hash(rid) % 1000)
    return EngineRequest(
        id=rid, prompt_tokens=len(ids), max_tokens=max_tokens, prompt_token_ids=ids, ignore_eos=True, **kw
    )


async def _collect(engine: VllmEngine, request: EngineRequest) -> list[EngineOutput]:
    return [out async for out in engine.stream(request)]


def _skip_without_gpu() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    if nvml.gpu_memory() is None:
        pytest.skip("no GPU visible through NVML")


@pytest_asyncio.fixture(
    scope="module", loop_scope="module", params=["standin", pytest.param("vllm", marks=pytest.mark.gpu)]
)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[VllmEngine]:
    """Yield a started engine: the stand-in, or the real vLLM with tiny-llama and dummy weights."""
    backend = None
    if request.param == "vllm":
        _skip_without_gpu()
    else:
        backend = StandinBackend(step_s=0.002)
    eng = VllmEngine(
        MODEL,
        gpu_memory_utilization=0.3,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=MAX_NUM_SEQS,
        enable_prefix_caching=True,
        backend=backend,
    )
    await eng.start()
    yield eng
    await eng.shutdown()


# --- both backends --------------------------------------------------------------------------------------


@module_loop
async def test_capacity_comes_from_the_engine_config(engine: VllmEngine) -> None:
    cap = engine.capacity()
    cache = engine._engine.vllm_config.cache_config
    expected_kv = getattr(cache, "kv_cache_size_tokens", None) or cache.num_gpu_blocks * cache.block_size
    assert cap.model == MODEL
    assert cap.kv_capacity_tokens == expected_kv > 0
    assert cap.kv_bytes_per_token == TINY_KV_BYTES_PER_TOKEN
    assert cap.max_num_seqs == MAX_NUM_SEQS
    assert cap.max_model_len == MAX_MODEL_LEN
    assert cap.gpu


@module_loop
async def test_token_prompt_streams_cumulative_outputs(engine: VllmEngine) -> None:
    t0 = time.time()
    outs = await _collect(engine, _request("cumulative", n_prompt=32, max_tokens=16, stream=True))
    counts = [o.output_tokens for o in outs]
    final = outs[-1]
    assert counts == sorted(counts) and all(not o.finished for o in outs[:-1])
    assert final.finished and final.finish_reason == "length"
    assert final.output_tokens == len(final.token_ids) == 16
    assert final.prompt_tokens == 32
    assert final.text is None  # no tokenizer: token ids only
    assert final.first_token_at is not None and t0 <= final.first_token_at <= time.time()


@module_loop
async def test_text_prompt_without_tokenizer_becomes_synthetic_ids(engine: VllmEngine) -> None:
    request = EngineRequest(id="text", prompt="hello world " * 30, prompt_tokens=40, max_tokens=4, ignore_eos=True)
    final = await engine.generate(request)
    assert final.finished and final.output_tokens == 4
    assert final.prompt_tokens == 40


@module_loop
async def test_concurrent_requests_finish_and_show_in_telemetry(engine: VllmEngine) -> None:
    requests = [_request(f"conc-{i}", n_prompt=64 + i, max_tokens=48) for i in range(32)]
    seen_running, seen_kv = 0, 0
    task = asyncio.gather(*(engine.generate(r) for r in requests))
    while not task.done():
        stats = engine.stats()
        seen_running, seen_kv = max(seen_running, stats.running), max(seen_kv, stats.kv_used_tokens)
        await asyncio.sleep(0.005)
    finals = await task
    assert all(f.finished and f.output_tokens == 48 for f in finals)
    assert seen_running > 0 and seen_kv > 0
    idle = engine.stats()
    assert (idle.running, idle.waiting, idle.kv_used_tokens) == (0, 0, 0)
    assert idle.preemptions >= 0


@module_loop
async def test_abort_ends_the_stream_with_abort(engine: VllmEngine) -> None:
    outs = []
    async for out in engine.stream(_request("abort-me", max_tokens=900, stream=True)):
        outs.append(out)
        if len(outs) == 3:
            await engine.abort("abort-me")
    final = outs[-1]
    assert final.finished and final.finish_reason == "abort"
    assert 3 <= final.output_tokens < 900


@module_loop
async def test_abort_before_the_stream_starts(engine: VllmEngine) -> None:
    await engine.abort("early")
    outs = await _collect(engine, _request("early"))
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "abort"


@module_loop
@pytest.mark.parametrize("length", [MAX_MODEL_LEN, MAX_MODEL_LEN + 500])
async def test_prompt_longer_than_the_model_is_rejected(engine: VllmEngine, length: int) -> None:
    with pytest.raises(RequestRejected, match="maximum (model|context) length"):
        await engine.generate(_request(f"long-{length}", n_prompt=length))


@module_loop
async def test_token_id_outside_the_vocabulary_is_rejected_before_vllm(engine: VllmEngine) -> None:
    with pytest.raises(RequestRejected, match="vocabulary of 32000"):
        await engine.generate(_request("oov", prompt_token_ids=[5, 6, VOCAB]))


@module_loop
async def test_repeated_prompt_hits_the_prefix_cache(engine: VllmEngine) -> None:
    ids = _ids(256, start=4242)
    first = await engine.generate(_request("prefix-1", prompt_token_ids=ids, max_tokens=2))
    second = await engine.generate(_request("prefix-2", prompt_token_ids=ids, max_tokens=2))
    assert first.cached_tokens == 0
    assert 16 <= second.cached_tokens < 256


# --- stand-in only: translation, errors, metric mapping ----------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def standin() -> AsyncIterator[tuple[VllmEngine, StandinBackend]]:
    backend = StandinBackend(step_s=0.001)
    eng = VllmEngine(MODEL, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, backend=backend)
    await eng.start()
    yield eng, backend
    await eng.shutdown()


def test_engine_args_for_a_bundled_model() -> None:
    args = VllmEngine(MODEL, max_model_len=2048).engine_args()
    assert args["model"] == str(bundled_model_path(MODEL))
    assert args["load_format"] == "dummy" and args["skip_tokenizer_init"] is True
    assert args["enforce_eager"] is True and args["disable_log_stats"] is False
    assert args["max_model_len"] == 2048 and "max_num_seqs" not in args


def test_engine_args_for_a_folder_with_weights_and_tokenizer(tmp_path: Path) -> None:
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (tmp_path / name).write_text("{}")
    eng = VllmEngine(str(tmp_path))
    assert (eng.load_format, eng.skip_tokenizer) == ("auto", False)
    assert VllmEngine("meta-llama/Llama-3.2-3B").engine_args()["load_format"] == "auto"


def test_bundled_shapes() -> None:
    def kv(name: str) -> int:
        return kv_bytes_per_token(read_model_config(str(bundled_model_path(name))))

    assert kv("llama-3.2-3b") == 2 * 28 * 8 * 128 * 2
    assert kv("llama-3.1-8b") == 2 * 32 * 8 * 128 * 2
    assert kv(MODEL) == TINY_KV_BYTES_PER_TOKEN
    with pytest.raises(KeyError, match="bundled"):
        bundled_model_path("no-such-model")


def test_synthetic_ids_are_deterministic_and_share_prefixes() -> None:
    a = synthetic_token_ids("the quick brown fox jumps", 10, VOCAB)
    b = synthetic_token_ids("the quick brown fox sleeps", 10, VOCAB)
    assert a == synthetic_token_ids("the quick brown fox jumps", 10, VOCAB)
    assert len(a) == 10 and all(3 <= t < VOCAB for t in a)
    assert a[:5] == b[:5] and a != b  # 20 equal characters: 5 equal tokens


@module_loop
async def test_request_translation(standin: tuple[VllmEngine, StandinBackend]) -> None:
    eng, backend = standin
    await eng.generate(_request("tr", n_prompt=8, max_tokens=5, temperature=0.5, top_p=0.9, seed=7, priority=1))
    prompt, params, rid, extra = backend.engine.received[-1]
    assert rid == "tr" and prompt == {"prompt_token_ids": _ids(8, start=hash("tr") % 1000)}
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (5, 0.5, 0.9, 7)
    assert params.ignore_eos is True and params.detokenize is False
    assert extra == {}  # fcfs: vLLM gets no priority


@module_loop
async def test_priority_is_passed_under_priority_scheduling() -> None:
    backend = StandinBackend()
    eng = VllmEngine(MODEL, max_model_len=256, scheduling_policy="priority", backend=backend)
    await eng.start()
    await eng.generate(_request("prio", max_tokens=2, priority=1))
    assert backend.engine.received[-1][3] == {"priority": 1}
    assert eng.engine_args()["scheduling_policy"] == "priority"


@module_loop
@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (ValueError("Token id 99999 is out of vocabulary"), RequestRejected),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), OutOfMemory),
        (RuntimeError("something else broke"), EngineError),
    ],
)
async def test_errors_are_translated(
    standin: tuple[VllmEngine, StandinBackend], raised: Exception, expected: type[Exception]
) -> None:
    eng, backend = standin
    wrapped = raised
    if not isinstance(raised, ValueError):  # vLLM wraps unexpected errors: EngineGenerateError from e
        wrapped = type("EngineGenerateError", (Exception,), {})()
        wrapped.__cause__ = raised
    backend.engine.fail_next = wrapped
    with pytest.raises(expected) as info:
        await eng.generate(_request("err"))
    assert type(info.value) is expected


@module_loop
async def test_waiting_requests_show_as_waiting(standin: tuple[VllmEngine, StandinBackend]) -> None:
    eng, _ = standin  # max_num_seqs=8
    task = asyncio.gather(*(eng.generate(_request(f"q-{i}", max_tokens=200)) for i in range(12)))
    await asyncio.sleep(0.01)
    stats = eng.stats()
    assert (stats.running, stats.waiting) == (8, 4)
    await task


@module_loop
async def test_metric_mapping(standin: tuple[VllmEngine, StandinBackend]) -> None:
    eng, backend = standin
    labels = {"model_name": MODEL, "engine": "0"}
    backend.snapshot_override = [
        Gauge("vllm:num_requests_running", labels, 3),
        Gauge("vllm:num_requests_waiting", labels, 2),
        Gauge("vllm:kv_cache_usage_perc", labels, 0.25),
        Counter("vllm:num_preemptions", labels, 4),
    ]
    eng._active = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}  # five requests in flight
    stats = eng.stats()
    assert (stats.running, stats.waiting, stats.preemptions) == (3, 2, 4)
    assert stats.kv_usage == 0.25
    assert stats.kv_used_tokens == round(0.25 * eng.capacity().kv_capacity_tokens)
    eng._active = {"a": 1}  # gauges from a busier step are capped by what is in flight
    assert (eng.stats().running, eng.stats().waiting) == (1, 0)
    eng._active = {}


@module_loop
@pytest.mark.parametrize("snapshot", [[], RuntimeError("registry broke")])
async def test_missing_metrics_never_break_the_heartbeat(
    standin: tuple[VllmEngine, StandinBackend], snapshot: object
) -> None:
    eng, backend = standin
    backend.snapshot_override = snapshot
    stats = eng.stats()
    assert (stats.running, stats.waiting, stats.kv_used_tokens, stats.preemptions) == (0, 0, 0, 0)


@module_loop
async def test_start_failure_is_an_engine_error() -> None:
    backend = StandinBackend()
    backend.start_error = ValueError("No available memory for the cache blocks")
    with pytest.raises(EngineError, match="could not start"):
        await VllmEngine(MODEL, backend=backend).start()
    backend.start_error = RuntimeError("CUDA out of memory")
    with pytest.raises(OutOfMemory):
        await VllmEngine(MODEL, backend=backend).start()
