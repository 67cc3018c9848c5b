"""Stop sequences: a batch line's ``stop`` to the request, the engine request and vLLM's SamplingParams."""

from __future__ import annotations

import pytest

from dio.client.openai_batch import body_to_fields, cut_at_stop
from dio.gpu_worker.daemon import to_engine_request
from dio.gpu_worker.engine import EngineRequest
from dio.gpu_worker.vllm_engine import VllmEngine
from dio.gpu_worker.vllm_standin import StandinBackend
from dio.protocol.models import Request


@pytest.mark.parametrize(("stop", "expected"), [("\n", ["\n"]), (["a", "", "b"], ["a", "b"]), (None, None)])
def test_a_lines_stop_becomes_the_requests(stop, expected):
    fields = body_to_fields("/v1/completions", {"prompt": "p", "stop": stop})
    assert fields.get("stop") == expected
    request = Request(id="r", **fields)
    assert request.stop == expected and to_engine_request(request).stop == expected


@pytest.mark.parametrize("stop", [5, ["x"] * 5, ["x" * 257], [None]])
def test_bad_stops_are_refused(stop):
    with pytest.raises(ValueError, match="stop"):
        body_to_fields("/v1/completions", {"prompt": "p", "stop": stop})


def test_text_is_cut_before_the_first_stop():
    assert cut_at_stop("one. two. three", [". t", "three"]) == ("one", True)
    assert cut_at_stop("one", ["x"]) == ("one", False) and cut_at_stop("one", None) == ("one", False)


async def test_vllm_is_asked_to_stop():
    backend = StandinBackend()
    engine = VllmEngine("tiny-llama-1b", max_model_len=256, backend=backend)
    await engine.start()
    try:
        await engine.generate(EngineRequest(id="s", prompt_tokens=4, max_tokens=2, prompt_token_ids=[5, 6, 7, 8],
                                            stop=["\n\n"]))
        assert backend.engine.received[-1][1].stop == ["\n\n"]
        await engine.generate(EngineRequest(id="n", prompt_tokens=4, max_tokens=2, prompt_token_ids=[5, 6, 7, 8]))
        assert backend.engine.received[-1][1].stop is None
    finally:
        await engine.shutdown()
