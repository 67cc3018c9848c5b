"""OpenAI request bodies → DIO requests: what ``/v1/completions`` and ``/v1/chat/completions`` accept.

OpenAI's parameters used: ``model`` (required), ``prompt`` (text, token ids, or a list of either:
one choice set per prompt) or ``messages``, ``max_tokens`` (chat: also ``max_completion_tokens``;
absent: ``DIO_MAX_TOKENS``, 256), ``temperature``, ``top_p``, ``seed`` (choice ``i`` of ``n`` gets
``seed + i``), ``stop`` (a string or up to 4: passed to the engine, and the gateway cuts the text at
the first one, so the simulated engine honours it too), ``n`` (one DIO job per
choice), ``user`` (kept in the job's metadata), ``stream`` and ``stream_options.include_usage``.
DIO's own, as extra fields (``extra_body=`` in the ``openai`` package): ``tier`` ("interactive" |
"batch", DIO's priority), ``deadline_ms`` (the request's SLO; past it the gateway answers 504 and
cancels the job), ``ttft_slo_ms``, ``tpot_slo_ms``, ``sheddable`` (DIO may refuse it at once, 429,
when it predicts the deadline will be missed everywhere) and ``ignore_eos``.

Parameters DIO cannot honour are refused (400) when they ask for something (``logprobs``, ``echo``,
``suffix``, ``tools``, ``logit_bias``, a non-text ``response_format``, ``best_of`` > ``n``); the rest
(penalties, ``store``, ``service_tier``, ...) are accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dio.ops.gateway.errors import ApiError, bad_request
from dio.protocol import defaults as d
from dio.protocol.models import Tier
from dio.protocol.openai import messages_to_prompt, parse_prompts

MAX_CHOICES = 128  # jobs one request may create: n × prompts
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "tool_choice", "logit_bias")
USER_METADATA = "user"  # the metadata key that keeps OpenAI's ``user``


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class CommonBody(BaseModel):
    """The fields both endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=d.MAX_MODEL_CHARS)
    max_tokens: int | None = Field(default=None, ge=1, le=d.MAX_OUTPUT_TOKENS)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    best_of: int | None = Field(default=None, ge=1)
    user: str | None = Field(default=None, max_length=d.MAX_METADATA_CHARS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    # DIO's own fields.
    tier: Tier | None = None
    deadline_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    ttft_slo_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    tpot_slo_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    sheddable: bool | None = None
    ignore_eos: bool | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > d.MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {d.MAX_STOP_SEQUENCES} stop sequences")
        if any(len(s) > d.MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is limited to {d.MAX_STOP_CHARS} characters")
        return value


class CompletionBody(CommonBody):
    prompt: Any = None


class ChatBody(CommonBody):
    messages: Any = None
    max_completion_tokens: int | None = Field(default=None, ge=1, le=d.MAX_OUTPUT_TOKENS)


@dataclass
class Ask:
    """One HTTP request, parsed: the DIO requests it becomes (one per choice) and how to answer it."""

    chat: bool
    model: str
    jobs: list[dict[str, Any]]  # Request fields, choice i's at index i (prompt k's n choices: k*n .. k*n+n-1)
    n: int
    stops: list[str]
    stream: bool
    include_usage: bool
    deadline_s: float | None  # seconds from arrival, from deadline_ms


def parse_completion(raw: Any) -> Ask:
    """Validate a ``/v1/completions`` body; raise ApiError 400 saying what is wrong."""
    body = _validated(CompletionBody, raw)
    try:
        prompts = parse_prompts(body.prompt)
    except ValueError as exc:
        raise bad_request(str(exc), "prompt") from None
    fields = [{"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p} for p in prompts]
    return _ask(body, fields, chat=False)


def parse_model(raw: Any) -> str:
    """Return a body's ``model`` (the catalog is checked before the rest is parsed); 400 when missing."""
    model = raw.get("model") if isinstance(raw, dict) else None
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (a model that `GET /v1/models` lists)", "model")
    return model


def parse_chat(raw: Any, chat_template: str | None = None, eos_token: str | None = None) -> Ask:
    """Validate a ``/v1/chat/completions`` body, rendering its messages into one prompt; 400 when wrong."""
    body = _validated(ChatBody, raw)
    try:
        prompt = messages_to_prompt(body.messages, chat_template, eos_token)
    except ValueError as exc:
        raise bad_request(str(exc), "messages") from None
    if body.max_tokens is None and body.max_completion_tokens is not None:
        body.max_tokens = body.max_completion_tokens
    return _ask(body, [{"prompt": prompt}], chat=True)


def _validated(model: type[CommonBody], raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        body = model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = ".".join(str(p) for p in err.get("loc", ())) or None
        raise bad_request(f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid"),
                          param) from None
    _refuse_unsupported(raw, body)
    return body


def _refuse_unsupported(raw: dict[str, Any], body: CommonBody) -> None:
    for name in UNSUPPORTED:
        if raw.get(name) not in (None, False, 0, [], {}):
            raise bad_request(f"'{name}' is not supported by DIO's gateway", name)
    if body.response_format is not None and body.response_format.get("type", "text") != "text":
        raise bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if body.best_of is not None and body.best_of > body.n:
        raise bad_request("'best_of' greater than 'n' is not supported", "best_of")


def _ask(body: CommonBody, prompts: list[dict[str, Any]], chat: bool) -> Ask:
    if len(prompts) * body.n > MAX_CHOICES:
        raise ApiError(400, f"{len(prompts)} prompts × n={body.n} asks for more than {MAX_CHOICES} choices",
                       param="n", code="invalid_request")
    stops = [s for s in ([body.stop] if isinstance(body.stop, str) else body.stop or []) if s]
    base = _request_fields(body, stops)
    jobs = []
    for prompt in prompts:
        for i in range(body.n):
            job = {**base, **prompt}
            if body.seed is not None:
                job["seed"] = body.seed + i  # n samples of one seed differ, reproducibly
            jobs.append(job)
    include_usage = body.stream and body.stream_options is not None and body.stream_options.include_usage
    deadline_s = None if body.deadline_ms is None else body.deadline_ms / 1000.0
    return Ask(chat, body.model, jobs, body.n, stops, body.stream, include_usage, deadline_s)


def _request_fields(body: CommonBody, stops: list[str]) -> dict[str, Any]:
    given = {"model": body.model, "max_tokens": body.max_tokens, "temperature": body.temperature,
             "top_p": body.top_p, "seed": body.seed, "tier": body.tier, "deadline_ms": body.deadline_ms,
             "ttft_slo_ms": body.ttft_slo_ms, "tpot_slo_ms": body.tpot_slo_ms, "sheddable": body.sheddable,
             "ignore_eos": body.ignore_eos}
    fields: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    if body.user:
        fields["metadata"] = {USER_METADATA: body.user}
    if body.stream:
        fields["stream"] = True
    if stops:
        fields["stop"] = stops  # an engine that can stop on them does; the gateway cuts the text too
    return fields
