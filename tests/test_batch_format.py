"""The OpenAI Batch API line format: parsing input lines and building output records (no Redis)."""

from __future__ import annotations

import json

import pytest

from dio.client.openai_batch import (
    BatchLine,
    BatchLineError,
    iter_raw_lines,
    parse_line,
    result_record,
)
from dio.protocol.models import JobResult, JobStatus, Request
from dio.protocol.openai import messages_to_prompt


def line(obj) -> bytes:
    return (json.dumps(obj) if not isinstance(obj, str) else obj).encode() + b"\n"


def completions(custom_id="c1", **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": "hi", **body}}


@pytest.mark.parametrize(
    "raw, code",
    [
        (None, "line_too_long"),  # iter_raw_lines yields None for an over-long line
        (b"{not json\n", "invalid_json"),
        (b"\xff\xfe\n", "invalid_json"),  # not UTF-8
        (line("[1, 2]"), "invalid_json"),  # JSON, but not an object
        (line({"url": "/v1/completions", "body": {"prompt": "x"}}), "missing_custom_id"),
        (line({"custom_id": 7, "url": "/v1/completions", "body": {}}), "missing_custom_id"),
        (line({"custom_id": "x" * 513, "url": "/v1/completions", "body": {}}), "invalid_custom_id"),
        (line({**completions(), "url": "/v1/embeddings"}), "invalid_url"),
        (line({**completions(), "method": "GET"}), "invalid_request"),
        (line(completions(n=2)), "invalid_request"),
        (line(completions(stream=True)), "invalid_request"),
        (line(completions(prompt=["a", "b"])), "invalid_request"),  # several prompts in one line
        (line({**completions(), "body": "text"}), "invalid_request"),
    ],
)
def test_bad_lines_raise_with_a_code(raw, code):
    with pytest.raises(BatchLineError) as info:
        parse_line(3, raw, max_bytes=1 << 20)
    assert info.value.code == code
    assert "line 3" in info.value.message


def test_errors_after_the_custom_id_keep_it():
    with pytest.raises(BatchLineError) as info:
        parse_line(1, line(completions(custom_id="keep", n=3)), 1 << 20)
    assert info.value.custom_id == "keep"


@pytest.mark.parametrize(
    "body, fields",
    [
        ({"prompt": "hi", "max_tokens": 5, "temperature": 0.0, "user": "ignored"},
         {"prompt": "hi", "max_tokens": 5, "temperature": 0.0}),
        ({"prompt": ["only one"]}, {"prompt": "only one"}),
        ({"prompt": [1, 2, 3], "seed": 4}, {"prompt_token_ids": [1, 2, 3], "seed": 4}),
    ],
)
def test_completion_bodies_map_to_request_fields(body, fields):
    parsed = parse_line(1, line({"custom_id": "c", "url": "/v1/completions", "body": body}), 1 << 20)
    assert parsed.fields == fields


def test_chat_messages_become_one_prompt():
    body = {"model": "m", "max_completion_tokens": 9, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]}
    parsed = parse_line(1, line({"custom_id": "c", "url": "/v1/chat/completions", "body": body}), 1 << 20)
    assert parsed.fields == {"model": "m", "max_tokens": 9, "prompt": "system: Be brief.\nuser: Hi there"}
    for bad in ([], [{"content": "no role"}], [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(ValueError):
            messages_to_prompt(bad)


def test_iter_raw_lines_skips_blank_lines_and_flags_long_ones(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"a": 1}\n\n' + b"x" * 100 + b"\n" + b'{"b": 2}')
    assert list(iter_raw_lines(path, max_bytes=50)) == [(1, b'{"a": 1}\n'), (3, None), (4, b'{"b": 2}')]


def make_result(status: JobStatus, **fields) -> JobResult:
    return JobResult(id="j1", status=status, finished_at=1700000000.0, **fields)


def test_completed_chat_record_has_the_openai_shape():
    parsed = BatchLine("c1", "/v1/chat/completions", {"prompt": "user: hi"})
    request = Request(id="j1", prompt="user: hi", model="m", max_tokens=2)
    record = result_record(parsed, request, make_result(JobStatus.completed, output="Hello", prompt_tokens=3,
                                                        output_tokens=2))
    assert record["id"] == "batch_req_j1" and record["custom_id"] == "c1" and record["error"] is None
    response = record["response"]
    assert (response["status_code"], response["request_id"]) == (200, "j1")
    body = response["body"]
    assert (body["object"], body["model"], body["created"]) == ("chat.completion", "m", 1700000000)
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert body["choices"][0]["finish_reason"] == "length"  # 2 tokens of max_tokens=2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_completed_text_record_and_failures():
    parsed = BatchLine("c1", "/v1/completions", {"prompt": "hi"})
    request = Request(id="j1", prompt="hi", max_tokens=16)
    body = result_record(parsed, request, make_result(JobStatus.completed, output="yo", output_tokens=1))[
        "response"]["body"]
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "yo" and body["choices"][0]["finish_reason"] == "stop"
    rejected = result_record(parsed, request, make_result(JobStatus.rejected, reason="too long"))
    assert rejected["response"] is None
    assert rejected["error"] == {"code": "rejected", "message": "rejected: too long"}
    failed = result_record(parsed, request, make_result(JobStatus.failed, error="OOM"))
    assert failed["error"] == {"code": "failed", "message": "failed: OOM"}
