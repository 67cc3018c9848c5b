"""The OpenAI Batch API file format: read input lines, write output lines.

Input line: ``{"custom_id": "...", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {"model", "prompt" | "messages", "max_tokens", ...}}``.
Output line: ``{"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
"error": null | {"code", "message"}}``, the body being a completion or chat completion object.

Body fields used: model, prompt (text, token ids, or a list of one), messages (rendered with the
served model's chat template when its workers registered one, else the fallback:
``dio.protocol.openai.messages_to_prompt``), max_tokens (chat: also max_completion_tokens),
temperature, top_p, seed, stop (a string or up to 4: the engine stops there where it can, and the
output's text is cut before the first one, ``finish_reason: "stop"``). Other fields (user,
logprobs, ...) are ignored; ``n`` other than 1 and ``stream: true`` are refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dio.protocol import defaults as d
from dio.protocol.models import JobResult, JobStatus, Request
from dio.protocol.openai import messages_to_prompt, parse_prompt

COMPLETIONS_URL = "/v1/completions"
CHAT_URL = "/v1/chat/completions"
MAX_CUSTOM_ID_CHARS = d.MAX_METADATA_CHARS  # the custom_id travels in the request's metadata
SKIP_CHUNK_BYTES = 1 << 16  # an over-long line is skipped reading this much at a time
PASSED_BODY_FIELDS = ("model", "max_tokens", "temperature", "top_p", "seed")

# model (None: the default) -> its chat template and EOS text, (None, None) for the fallback.
ChatTemplates = Callable[[str | None], tuple[str | None, str | None]]


class BatchLineError(ValueError):
    """One input line that cannot become a request; it is answered with an error line."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.custom_id = custom_id


@dataclass(frozen=True)
class BatchLine:
    """One parsed input line: who asked (custom_id), which endpoint, and the request fields."""

    custom_id: str
    url: str
    fields: dict[str, Any]


# --- reading the input --------------------------------------------------------------------------


def iter_raw_lines(path: str | Path, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number from 1, raw bytes) for each non-blank line; None for a line over max_bytes."""
    with open(path, "rb") as f:
        line_no = 0
        while raw := f.readline(max_bytes + 1):
            line_no += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                _skip_rest_of_line(f)
                yield line_no, None
            elif raw.strip():
                yield line_no, raw


def _skip_rest_of_line(f: Any) -> None:
    while (chunk := f.readline(SKIP_CHUNK_BYTES)) and not chunk.endswith(b"\n"):
        pass


def parse_line(line_no: int, raw: bytes | None, max_bytes: int, templates: ChatTemplates | None = None) -> BatchLine:
    """Parse one input line; raise BatchLineError saying what is wrong with it.

    ``templates`` gives each model's chat template (None: chat lines render with the fallback).
    """
    if raw is None:
        raise BatchLineError("line_too_long", f"line {line_no} is longer than {max_bytes} bytes")
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BatchLineError("invalid_json", f"line {line_no} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise BatchLineError("invalid_json", f"line {line_no} is not a JSON object")
    custom_id = _custom_id(line_no, obj)
    url = obj.get("url")
    if obj.get("method", "POST") != "POST":
        raise BatchLineError("invalid_request", f"line {line_no}: method must be POST", custom_id)
    if url not in (COMPLETIONS_URL, CHAT_URL):
        raise BatchLineError("invalid_url", f"line {line_no}: url must be {COMPLETIONS_URL} or {CHAT_URL}, "
                             f"not {url!r}", custom_id)
    try:
        fields = body_to_fields(url, obj.get("body"), templates)
    except ValueError as exc:
        raise BatchLineError("invalid_request", f"line {line_no}: {exc}", custom_id) from None
    return BatchLine(custom_id, url, fields)


def _custom_id(line_no: int, obj: dict[str, Any]) -> str:
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BatchLineError("missing_custom_id", f"line {line_no} has no custom_id (a non-empty string)")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise BatchLineError("invalid_custom_id", f"line {line_no}: custom_id is longer than "
                             f"{MAX_CUSTOM_ID_CHARS} characters")
    return custom_id


def body_to_fields(url: str, body: Any, templates: ChatTemplates | None = None) -> dict[str, Any]:
    """Map an OpenAI request body to Request fields; raise ValueError for what DIO cannot serve."""
    if not isinstance(body, dict):
        raise ValueError("'body' must be a JSON object")
    if body.get("stream"):
        raise ValueError("'stream' is not supported in a batch")
    if body.get("n", 1) != 1:
        raise ValueError("'n' must be 1")
    fields = {name: body[name] for name in PASSED_BODY_FIELDS if body.get(name) is not None}
    stops = parse_stop(body.get("stop"))
    if stops:
        fields["stop"] = stops
    if url == CHAT_URL:
        template, eos = templates(body.get("model")) if templates is not None else (None, None)
        fields["prompt"] = messages_to_prompt(body.get("messages"), template, eos)
        if "max_tokens" not in fields and body.get("max_completion_tokens") is not None:
            fields["max_tokens"] = body["max_completion_tokens"]
    else:
        fields.update(_prompt_fields(body.get("prompt")))
    return fields


def parse_stop(value: Any) -> list[str]:
    """Validate OpenAI's ``stop``: a string, or a list of up to MAX_STOP_SEQUENCES (empty ones dropped)."""
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValueError("'stop' must be a string or a list of strings")
    if len(stops) > d.MAX_STOP_SEQUENCES:
        raise ValueError(f"'stop' holds at most {d.MAX_STOP_SEQUENCES} sequences")
    if any(len(s) > d.MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop sequence is limited to {d.MAX_STOP_CHARS} characters")
    return [s for s in stops if s]


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """Return ``text`` before its first stop sequence, and whether one was found."""
    found = [i for i in (text.find(s) for s in stops or []) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def _prompt_fields(prompt: Any) -> dict[str, Any]:
    value = parse_prompt(prompt)
    return {"prompt": value} if isinstance(value, str) else {"prompt_token_ids": value}


# --- writing the output -------------------------------------------------------------------------


def line_record_id(line_no: int) -> str:
    """The output ``id`` of an input line that never became a job (stable across reruns)."""
    return f"batch_req_line_{line_no}"


def job_record_id(job_id: str) -> str:
    """The output ``id`` of a line answered by a job."""
    return f"batch_req_{job_id}"


def error_record(record_id: str, custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """An output line for a request that got no response."""
    return {"id": record_id, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}


def result_record(line: BatchLine, request: Request, result: JobResult) -> dict[str, Any]:
    """The output line of a finished job: a response when it completed, else an error."""
    record_id = job_record_id(result.id)
    if result.status is JobStatus.completed:
        response = {"status_code": 200, "request_id": result.id, "body": completion_body(line, request, result)}
        return {"id": record_id, "custom_id": line.custom_id, "response": response, "error": None}
    return error_record(record_id, line.custom_id, result.status.value, _failure_message(result))


def _failure_message(result: JobResult) -> str:
    if result.status is JobStatus.rejected:
        hint = f" (retry after {result.retry_after_s:g} s)" if result.retry_after_s is not None else ""
        return f"rejected: {result.reason or 'no reason given'}{hint}"
    if result.status is JobStatus.failed:
        return f"failed: {result.error or 'unknown error'}"
    return f"{result.status.value}: {result.reason or result.error or ''}".rstrip(": ")


def completion_body(line: BatchLine, request: Request, result: JobResult) -> dict[str, Any]:
    """A ``text_completion`` or ``chat.completion`` object, as OpenAI's endpoints return."""
    prompt_tokens = result.prompt_tokens or 0
    completion_tokens = result.output_tokens or 0
    chat = line.url == CHAT_URL
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{result.id}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(result.finished_at or time.time()),
        "model": request.model,
        "choices": [_choice(request, result, chat)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _choice(request: Request, result: JobResult, chat: bool) -> dict[str, Any]:
    text, stopped = cut_at_stop(result.output or "", request.stop)
    hit_limit = result.output_tokens is not None and result.output_tokens >= request.max_tokens and not stopped
    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": "length" if hit_limit else "stop"}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if result.output is None and result.output_token_ids is not None:
        choice["token_ids"] = result.output_token_ids
    return choice
