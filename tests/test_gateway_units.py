"""The gateway's pure parts: request parsing, stop sequences, the status table, chat templates, API keys."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from dio.gpu_worker.chat_template import read_chat_template
from dio.ops.gateway import bodies
from dio.ops.gateway.auth import check_api_key
from dio.ops.gateway.errors import ApiError, error_for_result
from dio.ops.gateway.params import MAX_CHOICES, parse_chat, parse_completion
from dio.ops.gateway.sse import DONE, event
from dio.ops.gateway.stops import StopScanner, cut_at_stop
from dio.protocol import defaults as d
from dio.protocol.models import JobResult, JobStatus, WorkerInfo
from dio.protocol.openai import messages_to_prompt
from dio.protocol.served_models import parse_served

MODEL = "m"
HI = [{"role": "user", "content": "hi"}]


# --- request bodies -----------------------------------------------------------------------------


def test_a_completion_body_becomes_one_job_per_prompt_and_choice():
    ask = parse_completion({"model": MODEL, "prompt": ["a", [5, 6]], "n": 2, "seed": 7, "max_tokens": 9,
                            "temperature": 0.5, "top_p": 0.9, "user": "ann", "stop": "\n",
                            "stream": True, "stream_options": {"include_usage": True}})
    assert [(j.get("prompt"), j.get("prompt_token_ids"), j["seed"]) for j in ask.jobs] == [
        ("a", None, 7), ("a", None, 8), (None, [5, 6], 7), (None, [5, 6], 8)]  # choice i of n: seed + i
    job = ask.jobs[0]
    assert (job["model"], job["max_tokens"], job["temperature"], job["top_p"], job["stream"]) == (MODEL, 9, 0.5,
                                                                                                  0.9, True)
    assert job["metadata"] == {"user": "ann"} and job["stop"] == ["\n"]  # the engine may stop there itself
    assert (ask.n, ask.stops, ask.stream, ask.include_usage, ask.chat) == (2, ["\n"], True, True, False)


def test_dio_fields_ride_along_as_extra_fields():
    ask = parse_chat({"model": MODEL, "messages": HI, "tier": "batch", "deadline_ms": 1500, "ttft_slo_ms": 200,
                      "tpot_slo_ms": 30, "sheddable": True, "ignore_eos": True, "max_completion_tokens": 12})
    job = ask.jobs[0]
    assert {k: job[k] for k in ("tier", "deadline_ms", "ttft_slo_ms", "tpot_slo_ms", "sheddable", "ignore_eos",
                                "max_tokens")} == {"tier": "batch", "deadline_ms": 1500, "ttft_slo_ms": 200,
                                                   "tpot_slo_ms": 30, "sheddable": True, "ignore_eos": True,
                                                   "max_tokens": 12}
    assert ask.deadline_s == 1.5 and "stream" not in job  # a plain request costs no per-token work
    assert job["prompt"] == "user: hi"  # no template registered: the fallback


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"model": MODEL}, "prompt", "'prompt' must be"),
    ({"model": MODEL, "prompt": ""}, "prompt", "must not be empty"),
    ({"model": MODEL, "prompt": "x", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"model": MODEL, "prompt": "x", "n": MAX_CHOICES + 1}, "n", "less than or equal"),
    ({"model": MODEL, "prompt": ["x"] * 65, "n": 2}, "n", "more than 128 choices"),
    ({"model": MODEL, "prompt": "x", "logprobs": 2}, "logprobs", "not supported"),
    ({"model": MODEL, "prompt": "x", "echo": True}, "echo", "not supported"),
    ({"model": MODEL, "prompt": "x", "response_format": {"type": "json_object"}}, "response_format", "text"),
    ({"model": MODEL, "prompt": "x", "best_of": 3}, "best_of", "not supported"),
    ({"model": MODEL, "prompt": "x", "user": "u" * 513}, "user", "at most 512"),
    ({"model": MODEL, "prompt": "x", "tier": "vip"}, "tier", "interactive"),
    ({"model": MODEL, "prompt": "x", "deadline_ms": -1}, "deadline_ms", "greater than 0"),
    ("not an object", None, "JSON object"),
])
def test_bad_completion_bodies_say_which_parameter(body, param, words):
    with pytest.raises(ApiError) as info:
        parse_completion(body)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message


@pytest.mark.parametrize(("body", "words"), [
    ({"model": MODEL}, "'messages' must be a non-empty list"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, "not 'robot'"),
    ({"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, "'tools' is not supported"),
])
def test_bad_chat_bodies_are_refused(body, words):
    with pytest.raises(ApiError) as info:
        parse_chat(body)
    assert info.value.status == 400 and words in info.value.message


def test_unknown_and_ignorable_fields_are_accepted():
    ask = parse_chat({"model": MODEL, "messages": HI, "presence_penalty": 0.5, "store": False, "logprobs": False,
                      "service_tier": "auto", "something_new": {"x": 1}})
    assert ask.jobs == [{"model": MODEL, "prompt": "user: hi"}]


# --- chat templates -----------------------------------------------------------------------------

LLAMA3 = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def test_a_registered_template_renders_as_apply_chat_template_with_a_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text",
                                                                                          "text": "Hi"}]}]
    assert messages_to_prompt(messages, LLAMA3) == (
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")  # no BOS: the worker's tokenizer adds it
    ask = parse_chat({"model": MODEL, "messages": messages}, chat_template=LLAMA3)
    assert ask.jobs[0]["prompt"].endswith("assistant<|end_header_id|>\n\n")


def test_template_features_transformers_provides():
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% if loop.first %}{% break %}{% endif %}"
                "{% endfor %}{{ eos_token }}")
    assert messages_to_prompt([{"role": "user", "content": "a<é"}, HI[0]], template, "</s>") == '"a<é"</s>'
    with pytest.raises(ValueError, match="no system role"):
        messages_to_prompt([{"role": "system", "content": "x"}], template)


@pytest.mark.parametrize("template", ["{{ ''.__class__.__mro__ }}", "{{ messages.pop() }}", "{% for %}"])
def test_a_template_is_sandboxed_and_its_errors_are_clear(template):
    with pytest.raises(ValueError, match="chat template"):
        messages_to_prompt(HI, template)


def test_the_fallback_is_one_line_per_message():
    assert messages_to_prompt([{"role": "system", "content": "Be brief."}, HI[0]]) == "system: Be brief.\nuser: hi"


def test_a_model_folder_registers_its_tokenizers_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": LLAMA3}],
        "eos_token": {"content": "<|eot_id|>", "lstrip": False}}))
    assert read_chat_template(tmp_path) == (LLAMA3, "<|eot_id|>")
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0].content }}")  # the newer file wins
    assert read_chat_template(tmp_path)[0] == "{{ messages[0].content }}"
    (tmp_path / "chat_template.jinja").write_text("x" * (d.MAX_CHAT_TEMPLATE_CHARS + 1))
    assert read_chat_template(tmp_path) == (None, "<|eot_id|>")  # over the bound: not registered
    assert read_chat_template(tmp_path / "missing") == (None, None)


def test_worker_info_bounds_the_template():
    info = dict(id="w", engine="vllm", model=MODEL, gpu="g", kv_capacity_tokens=1, kv_bytes_per_token=1,
                max_num_seqs=1, max_model_len=1)
    assert WorkerInfo(**info, chat_template=LLAMA3, eos_token="</s>").chat_template == LLAMA3
    with pytest.raises(ValueError):
        WorkerInfo(**info, chat_template="x" * (d.MAX_CHAT_TEMPLATE_CHARS + 1))


def test_served_models_group_workers_and_take_a_live_workers_template():
    ids = ["a", "b", "c", "d"]
    replies = [["m1", None, None, "4096", "100", "0"], 0,  # a: registered, dead
               ["m1", LLAMA3, "</s>", "8192", "50", "0"], 1,  # b: alive, with a template
               ["m2", None, None, "2048", "70", "1"], 1,  # c: alive but draining
               [None] * 6, 1]  # d: its hash is gone
    served = parse_served(ids, replies)
    assert set(served) == {"m1", "m2"}
    m1, m2 = served["m1"], served["m2"]
    assert (m1.workers, m1.live, m1.chat_template, m1.eos_token, m1.max_model_len, m1.created) == (
        ["a", "b"], ["b"], LLAMA3, "</s>", 8192, 50)
    assert m1.available and not m2.available  # a draining worker takes no new jobs


# --- stop sequences -----------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "stops", "cut"), [
    ("hello world", ["o w"], ("hell", True)),
    ("hello world", ["x", "wor", "l"], ("he", True)),  # the earliest match wins
    ("hello", ["x"], ("hello", False)),
    ("hello", [], ("hello", False)),
])
def test_cut_at_stop(text, stops, cut):
    assert cut_at_stop(text, stops) == cut


def test_a_stream_holds_back_what_may_begin_a_stop_sequence():
    scanner = StopScanner(["END"])
    assert scanner.feed("abc E") == "abc "  # "E" may begin END
    assert scanner.feed("N") == ""  # "EN" still may
    assert scanner.feed("X more") == "ENX more"  # it did not
    assert scanner.feed(" E") == " " and scanner.flush() == "E"  # the answer ended: release it
    stopping = StopScanner(["END", "\n\n"])
    assert stopping.feed("one\n") == "one" and stopping.feed("\ntwo") == "" and stopping.stopped
    assert stopping.feed("more") == "" and stopping.flush() == ""


def test_without_stops_every_delta_goes_out_at_once():
    scanner = StopScanner([])
    assert [scanner.feed(t) for t in ("a", "E", "")] == ["a", "E", ""] and not scanner.stopped


# --- statuses -----------------------------------------------------------------------------------


def rejected(reason: str, retry_after_s: float | None = None) -> JobResult:
    return JobResult(id="j", status=JobStatus.rejected, reason=reason, retry_after_s=retry_after_s)


@pytest.mark.parametrize(("result", "status", "code"), [
    (rejected("invalid request: max_tokens: too big"), 400, "invalid_request"),
    (rejected("no worker serves model 'x' (served: m)"), 404, "model_not_found"),
    (rejected("too large for every worker: needs 9 KV tokens"), 413, "context_length_exceeded"),
    (rejected("no capacity before its deadline: no live worker for model 'm'", 1.0), 503, "model_unavailable"),
    (rejected("no capacity before its deadline: every worker's queue is full", 2.0), 504, "deadline_exceeded"),
    (rejected("overloaded: 10 requests already waiting", 3.0), 429, "overloaded"),
    (rejected("cannot finish before its deadline: predicted 900 ms", 0.9), 429, "shed"),
    (rejected("cannot meet its SLO: predicted TTFT 900 ms", 0.9), 429, "shed"),
    (rejected("something new under load", 1.5), 429, "overloaded"),  # a retry-after hint means load
    (rejected("the engine refused the prompt"), 400, "rejected"),
    (JobResult(id="j", status=JobStatus.failed, error="worker died 3 times"), 500, "job_failed"),
    (JobResult(id="j", status=JobStatus.cancelled, reason="by an operator"), 500, "job_cancelled"),
])
def test_each_outcome_has_one_status(result, status, code):
    error = error_for_result(result)
    assert (error.status, error.code) == (status, code)
    assert error.body()["error"]["message"] and set(error.body()["error"]) == {"message", "type", "param", "code"}


def test_a_retry_after_hint_becomes_headers_in_whole_seconds_and_in_ms():
    response = error_for_result(rejected("overloaded: busy", 1.2)).response()
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2" and response.headers["retry-after-ms"] == "1200"
    assert "retry-after" not in error_for_result(rejected("too large for every worker")).response().headers


# --- API keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "header", "allowed"), [
    ("/v1/models", "Bearer k2", True),
    ("/v1/models", "bearer k1", True),
    ("/v1/models", "Bearer k3", False),
    ("/v1/models", "k1", False),
    ("/v1/models", None, False),
    ("/v1/models", "Bearer ", False),
    ("/health", None, True),  # probes need no key
    ("/ready", None, True),
])
def test_api_keys(path, header, allowed):
    keys = frozenset({"k1", "k2"})
    if allowed:
        check_api_key(path, header, keys)
        return
    with pytest.raises(ApiError) as info:
        check_api_key(path, header, keys)
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert "k1" not in info.value.message


def test_no_keys_configured_means_none_needed():
    check_api_key("/v1/models", None, frozenset())


# --- response bodies ----------------------------------------------------------------------------


def test_stream_chunks_have_openais_shape():
    maker = bodies.ChunkMaker(chat=True, key="k", created=1, model=MODEL, include_usage=True)
    assert maker.role(0)["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None}]
    assert maker.text(1, "x")["choices"][0]["delta"] == {"content": "x"} and maker.text(1, "x")["usage"] is None
    last = maker.usage(bodies.usage(3, 4))
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    plain = bodies.ChunkMaker(chat=False, key="k", created=1, model=MODEL, include_usage=False)
    assert plain.finish(0, "length") == {"id": "cmpl-k", "object": "text_completion", "created": 1, "model": MODEL,
                                         "system_fingerprint": None,
                                         "choices": [{"index": 0, "text": "", "logprobs": None,
                                                      "finish_reason": "length"}]}
    assert event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode() and DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(("tokens", "cap", "stopped", "reason"), [
    (8, 8, False, "length"), (3, 8, False, "stop"), (8, 8, True, "stop"), (None, 8, False, "stop")])
def test_finish_reason(tokens, cap, stopped, reason):
    assert bodies.finish_reason(tokens, cap, stopped) == reason


async def test_a_vllm_worker_registers_its_models_chat_template(tmp_path):
    """The stand-in vLLM on a model folder with a tokenizer: its template reaches the WorkerInfo."""
    import shutil

    from dio.gpu_worker.vllm_engine import VllmEngine, bundled_model_path
    from dio.gpu_worker.vllm_standin import StandinBackend

    shutil.copy(bundled_model_path("tiny-llama-1b") / "config.json", tmp_path / "config.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3, "eos_token": "</s>"}))
    engine = VllmEngine(str(tmp_path), max_model_len=1024, max_num_seqs=4, backend=StandinBackend())
    await engine.start()
    try:
        info = engine.capacity().worker_info("w-1", "vllm")
    finally:
        await engine.shutdown()
    assert (info.chat_template, info.eos_token) == (LLAMA3, "</s>")
    bare = VllmEngine("tiny-llama-1b", max_model_len=1024, max_num_seqs=4, backend=StandinBackend())
    await bare.start()
    try:
        assert bare.capacity().chat_template is None  # no tokenizer: chat renders with the fallback
    finally:
        await bare.shutdown()


def test_a_missing_dependency_is_one_install_line(monkeypatch):
    import importlib.util

    from dio.ops.gateway import server

    assert server.missing_dependency() is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert server.missing_dependency() == server.MISSING and "pip install 'dio[server]'" in server.MISSING


# --- a stream's events, merged and turned into chunks (fake jobs) --------------------------------


class FakeHandle:
    """A submitted job whose stream yields scripted events."""

    def __init__(self, index: int, events: list, max_tokens: int) -> None:
        from dio.protocol.models import Request

        self.id = f"job-{index}"
        self.request = Request(id=self.id, prompt="four", max_tokens=max_tokens)
        self.events = events
        self.future = None

    def stream(self, timeout: float):
        async def events():
            for ev in self.events:
                await asyncio.sleep(0)
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
            if not self.future.done():
                self.future.set_result(None)

        return events()


class FakeClient:
    def __init__(self) -> None:
        self.cancelled: list[str] = []

    async def cancel(self, job_id: str) -> bool:
        self.cancelled.append(job_id)
        return True


def completed(text: str, tokens: int) -> JobResult:
    return JobResult(id="j", status=JobStatus.completed, output=text, output_tokens=tokens, prompt_tokens=1)


async def run_stream(scripts: list[list], stops: list[str] | None = None, include_usage: bool = True,
                     max_tokens: int = 4) -> tuple[list, FakeClient]:
    from dio.client.stream import StreamEvent  # noqa: F401 - the events the scripts hold
    from dio.ops.gateway.choices import Stream, Timing
    from dio.ops.gateway.params import Ask

    client = FakeClient()
    handles = [FakeHandle(i, script, max_tokens) for i, script in enumerate(scripts)]
    for handle in handles:
        handle.future = asyncio.get_running_loop().create_future()
    ask = Ask(True, MODEL, [{"max_tokens": max_tokens}] * len(handles), len(handles), stops or [], True,
              include_usage, None)
    stream = Stream(client, ask, "k", handles, Timing(time.monotonic(), 10.0))  # type: ignore[arg-type]
    stream.start()
    try:
        first = await stream.first()
        out = [chunk async for chunk in stream.chunks(first)]
    finally:
        stream.stop()
    await asyncio.sleep(0.01)  # the detached cancellations run
    return [json.loads(c[6:]) if c != DONE else "DONE" for c in out], client


def texts(chunks: list, index: int = 0) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                   if isinstance(c, dict) and c.get("choices") and c["choices"][0]["index"] == index)


async def test_two_choices_stream_side_by_side_and_end_with_usage():
    from dio.client.stream import StreamEvent

    a = [StreamEvent(" a1", 1), StreamEvent(" a2", 2), StreamEvent("", 4, result=completed(" a1 a2", 4))]
    b = [StreamEvent(" b1", 1), StreamEvent(" b2", 3, result=completed(" b1 b2", 3))]
    chunks, client = await run_stream([a, b])
    assert texts(chunks, 0) == " a1 a2" and texts(chunks, 1) == " b1 b2"
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"] for c in chunks
                if isinstance(c, dict) and c["choices"] and c["choices"][0]["finish_reason"]}
    assert finishes == {0: "length", 1: "stop"}  # 4 of 4 tokens: the cap; 3 of 4: its EOS
    assert chunks[-2]["usage"] == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8}
    assert chunks[-1] == "DONE" and client.cancelled == []


async def test_a_stop_sequence_ends_a_choice_and_cancels_its_job():
    from dio.client.stream import StreamEvent

    script = [StreamEvent(" one EN", 2), StreamEvent("D two", 4), StreamEvent(" three", 6)]
    chunks, client = await run_stream([script], stops=["END"], max_tokens=100)
    assert texts(chunks) == " one " and client.cancelled == ["job-0"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if isinstance(c, dict) and c["choices"]][-1] == "stop"
    assert chunks[-2]["usage"]["completion_tokens"] == 4  # as far as it was read


async def test_an_error_after_text_is_an_error_event_then_done():
    from dio.client.stream import StreamEvent

    failed = JobResult(id="j", status=JobStatus.failed, error="worker died 3 times")
    chunks, _ = await run_stream([[StreamEvent(" x", 1), StreamEvent("", 1, result=failed)]])
    assert chunks[-2]["error"]["code"] == "job_failed" and chunks[-1] == "DONE"


async def test_a_restart_after_text_ends_the_stream_but_one_before_is_ignored():
    from dio.client.stream import StreamEvent

    restart = StreamEvent("", 0, restarted=True)
    chunks, client = await run_stream([[StreamEvent(" x", 1), restart, StreamEvent(" y", 1)]])
    assert chunks[-2]["error"]["code"] == "stream_restarted" and client.cancelled == ["job-0"]
    chunks, _ = await run_stream([[restart, StreamEvent(" y", 1), StreamEvent("", 1, result=completed(" y", 1))]])
    assert texts(chunks) == " y" and chunks[-1] == "DONE"


async def test_an_error_before_any_event_is_a_plain_http_error():
    from dio.client.exceptions import ResultTimeout
    from dio.client.stream import StreamEvent

    shed = JobResult(id="j", status=JobStatus.rejected, reason="cannot meet its SLO: predicted", retry_after_s=2)
    with pytest.raises(ApiError) as info:
        await run_stream([[StreamEvent("", 0, result=shed)]])
    assert info.value.status == 429 and info.value.retry_after_s == 2
    with pytest.raises(ApiError) as info:
        await run_stream([[ResultTimeout("job-0", 1.0, "running")]])
    assert info.value.status == 504
