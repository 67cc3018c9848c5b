"""OpenAI response objects: completions, chat completions, their stream chunks, usage, models (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Choice:
    """One finished choice: its text and why it ended ("stop" or "length")."""

    index: int
    text: str
    finish_reason: str


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(output_tokens: int | None, max_tokens: int | None, stopped: bool) -> str:
    """Return "length" when the answer reached its cap (and no stop sequence ended it first), else "stop"."""
    if stopped:
        return "stop"
    return "length" if max_tokens is not None and (output_tokens or 0) >= max_tokens else "stop"


def response_id(chat: bool, key: str) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{key}"


def completion(chat: bool, key: str, created: int, model: str, choices: list[Choice],
               use: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` or ``chat.completion`` object."""
    return {"id": response_id(chat, key), "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "system_fingerprint": None,
            "choices": [_choice(chat, c) for c in choices], "usage": use}


def _choice(chat: bool, choice: Choice) -> dict[str, Any]:
    out: dict[str, Any] = {"index": choice.index, "logprobs": None, "finish_reason": choice.finish_reason}
    if chat:
        out["message"] = {"role": "assistant", "content": choice.text, "refusal": None}
    else:
        out["text"] = choice.text
    return out


@dataclass
class ChunkMaker:
    """The stream chunks of one request: every chunk carries the same id, created time and model."""

    chat: bool
    key: str
    created: int
    model: str
    include_usage: bool

    def _chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": response_id(self.chat, self.key),
                                 "object": "chat.completion.chunk" if self.chat else "text_completion",
                                 "created": self.created, "model": self.model, "system_fingerprint": None,
                                 "choices": choices}
        if self.include_usage:
            chunk["usage"] = None  # every chunk but the last, as OpenAI sends them
        return chunk

    def role(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk of a choice: the assistant role, empty content."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def text(self, index: int, text: str) -> dict[str, Any]:
        return self._chunk([self._delta(index, {"content": text}, text, None)])

    def finish(self, index: int, reason: str) -> dict[str, Any]:
        return self._chunk([self._delta(index, {}, "", reason)])

    def _delta(self, index: int, delta: dict[str, Any], text: str, reason: str | None) -> dict[str, Any]:
        if self.chat:
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}

    def usage(self, use: dict[str, int]) -> dict[str, Any]:
        """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
        chunk = self._chunk([])
        chunk["usage"] = use
        return chunk


def error_event(message: str, type_: str, code: str | None) -> dict[str, Any]:
    """An error inside a stream that has begun (vLLM's shape: the error object in a data event)."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "dio"}
