"""Pydantic models of every message that crosses Redis.

Models reject unknown fields (``extra="forbid"``), bound every size a client controls, and carry a
schema version ``v``. Field names follow OpenAI's where one exists (``max_tokens``, ``*_at``).
Nothing read from Redis is ever unpickled: messages are JSON validated by these models.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from enum import Enum
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dio.protocol import defaults as d

SCHEMA_VERSION = 1

M = TypeVar("M", bound=BaseModel)

JobId = Annotated[str, Field(min_length=1, max_length=d.MAX_ID_CHARS, pattern=r"^[A-Za-z0-9_.:\-]+$")]


class Tier(str, Enum):
    interactive = "interactive"
    batch = "batch"


class JobStatus(str, Enum):
    queued = "queued"
    dispatched = "dispatched"
    running = "running"
    completed = "completed"
    rejected = "rejected"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.completed, JobStatus.rejected, JobStatus.failed, JobStatus.cancelled})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)


class Request(Strict):
    """One inference request, as a client puts it on the intake stream."""

    v: int = SCHEMA_VERSION
    id: JobId
    model: str = Field(default=d.DEFAULT_MODEL, min_length=1, max_length=d.MAX_MODEL_CHARS)
    prompt: str | None = Field(default=None, max_length=d.MAX_PROMPT_CHARS)
    prompt_token_ids: list[Annotated[int, Field(ge=0, lt=2**31)]] | None = Field(
        default=None, max_length=d.MAX_PROMPT_TOKENS
    )
    # Prompt length in tokens when the client knows it (it tokenized a text prompt).
    num_prompt_tokens: int | None = Field(default=None, ge=1, le=d.MAX_PROMPT_TOKENS)
    max_tokens: int = Field(default=256, ge=1, le=d.MAX_OUTPUT_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    ignore_eos: bool = False
    tier: Tier = Tier.interactive
    # Relative deadline (SLO) in milliseconds from submitted_at; None means no deadline.
    deadline_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    # Per-token SLO, in milliseconds: time to first token, and mean time per output token after it.
    ttft_slo_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    tpot_slo_ms: float | None = Field(default=None, gt=0, le=d.MAX_SLO_MS)
    # May DIO reject it at once when it predicts its SLO will be missed on every worker? (The
    # inference gateway's "sheddable" criticality.) Other requests are always served.
    sheddable: bool = False
    # Client id whose reply stream receives the result notice; None: poll the job hash.
    reply_to: str | None = Field(default=None, max_length=d.MAX_ID_CHARS, pattern=r"^[A-Za-z0-9_.:\-]+$")
    submitted_at: float = Field(default_factory=time.time)
    # Hashes of the prompt's leading blocks (equal hashes = reusable KV prefix), for prefix affinity.
    prefix_hashes: list[int] | None = Field(default=None, max_length=d.MAX_PREFIX_HASHES)
    metadata: dict[str, str] | None = Field(default=None, max_length=d.MAX_METADATA_ITEMS)
    # Publish the output as it is generated, on the job's token stream (``Keys.tokens``); requests
    # that do not stream cost no per-token work anywhere.
    stream: bool = False
    # Stop sequences: the answer ends before the first one it contains (OpenAI's ``stop``). Engines
    # that can stop on them do (vLLM); the batch runner and the gateway cut the text at the first one.
    stop: list[Annotated[str, Field(min_length=1, max_length=d.MAX_STOP_CHARS)]] | None = Field(
        default=None, max_length=d.MAX_STOP_SEQUENCES
    )

    @field_validator("v")
    @classmethod
    def _this_schema_version(cls, v: int) -> int:
        # A request written for another version may mean something else by the same fields: the
        # dispatcher rejects it with this message rather than guess.
        if v != SCHEMA_VERSION:
            raise ValueError(f"schema version {v} is not supported (this DIO reads version {SCHEMA_VERSION})")
        return v

    @model_validator(mode="after")
    def _one_prompt(self) -> Request:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise ValueError("give exactly one of 'prompt' (text) or 'prompt_token_ids'")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) == 0:
            raise ValueError("'prompt_token_ids' is empty")
        if self.prompt is not None and self.prompt == "":
            raise ValueError("'prompt' is empty")
        for key, value in (self.metadata or {}).items():
            if len(key) > d.MAX_METADATA_CHARS or len(value) > d.MAX_METADATA_CHARS:
                raise ValueError(f"metadata entries are limited to {d.MAX_METADATA_CHARS} characters")
        for name in ("deadline_ms", "ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"'{name}' must be finite")
        return self

    @property
    def prompt_tokens(self) -> int:
        """Prompt length in tokens: exact for token ids or a declared count, else estimated."""
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        if self.num_prompt_tokens is not None:
            return self.num_prompt_tokens
        # Clients that tokenize pass num_prompt_tokens; the estimate is the usual English BPE average.
        return max(1, math.ceil(len(self.prompt or "") / d.CHARS_PER_TOKEN))

    @property
    def kv_tokens(self) -> int:
        """KV-cache tokens the request can occupy at its longest (prompt + every output token)."""
        return self.prompt_tokens + self.max_tokens

    @property
    def deadline_at(self) -> float | None:
        return None if self.deadline_ms is None else self.submitted_at + self.deadline_ms / 1000.0


class JobResult(Strict):
    """A job's terminal state as the client sees it (also the reply-stream notice)."""

    v: int = SCHEMA_VERSION
    id: JobId
    status: JobStatus
    worker: str | None = None
    output: str | None = None
    output_token_ids: list[int] | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None  # failed: what went wrong
    reason: str | None = None  # rejected: why, in words
    retry_after_s: float | None = None  # rejected under overload: when trying again makes sense
    attempts: int | None = None
    submitted_at: float | None = None
    dispatched_at: float | None = None
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    preemptions: int | None = None

    @property
    def text(self) -> str | None:
        """The output text (``output``'s other name, as streaming speaks of text)."""
        return self.output

    @property
    def latency_s(self) -> float | None:
        if self.finished_at is None or self.submitted_at is None:
            return None
        return self.finished_at - self.submitted_at

    @property
    def ttft_s(self) -> float | None:
        if self.first_token_at is None or self.submitted_at is None:
            return None
        return self.first_token_at - self.submitted_at


class Completion(Strict):
    """What a worker reports on the completions stream for every job it ended."""

    v: int = SCHEMA_VERSION
    job: JobId
    worker: str
    status: JobStatus
    prompt_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    service_ms: float = 0.0  # from the worker starting the job to its end
    ttft_ms: float | None = None
    free_kv_tokens: int | None = None
    finished_at: float = Field(default_factory=time.time)


class WorkerInfo(Strict):
    """A worker's capabilities, registered once at start."""

    v: int = SCHEMA_VERSION
    id: JobId
    engine: str  # "sim", "vllm", "instant"
    model: str
    gpu: str  # profile or pynvml device name
    kv_capacity_tokens: int = Field(ge=0)
    kv_bytes_per_token: int = Field(ge=0)
    max_num_seqs: int = Field(ge=1)
    max_model_len: int = Field(ge=1)
    total_vram_bytes: int = 0
    weight_bytes: int = 0  # model weights in GPU memory (0: unknown)
    peak_flops: float = Field(default=0.0, ge=0)  # the GPU's dense bf16 FLOP/s per its datasheet (0: unknown)
    mem_bandwidth: float = Field(default=0.0, ge=0)  # its memory bandwidth, bytes/s (0: unknown)
    time_scale: float = 1.0  # simulated engines: simulated seconds per wall second
    # The tokenizer's chat template (jinja2) and end-of-sequence text, for the gateway to render chat
    # messages with (``dio.protocol.openai``); None: no tokenizer, or a template over the bound.
    chat_template: str | None = Field(default=None, max_length=d.MAX_CHAT_TEMPLATE_CHARS)
    eos_token: str | None = Field(default=None, max_length=d.MAX_SPECIAL_TOKEN_CHARS)
    host: str = ""
    pid: int = 0
    started_at: float = Field(default_factory=time.time)


class WorkerTelemetry(Strict):
    """A worker's live state, refreshed every heartbeat."""

    v: int = SCHEMA_VERSION
    running: int = 0
    waiting: int = 0
    in_flight: int = 0  # jobs the daemon holds (running + waiting inside the engine)
    kv_used_tokens: int = 0
    kv_usage: float = 0.0  # fraction of the KV cache in use, 0..1
    free_vram_bytes: int | None = None
    preemptions: int = 0
    completed: int = 0
    failed: int = 0
    draining: bool = False
    updated_at: float = Field(default_factory=time.time)


# --- helpers to store flat models in Redis hashes -------------------------------------------------


def to_hash(model: BaseModel) -> dict[str, str]:
    """Flatten a model into string fields for HSET (lists as JSON, None left out)."""
    out: dict[str, str] = {}
    for name, value in model.model_dump(mode="json", exclude_none=True).items():
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, (list, dict)):
            out[name] = json.dumps(value, separators=(",", ":"))
        else:
            out[name] = str(value)
    return out


def hash_json_fields(cls: type[BaseModel]) -> frozenset[str]:
    """Return the fields of ``cls`` that a hash stores as JSON: those holding lists or dicts."""
    return frozenset(name for name, info in cls.model_fields.items() if _holds_container(info.annotation))


def _holds_container(annotation: Any) -> bool:
    if get_origin(annotation) in (list, dict):
        return True
    return any(_holds_container(arg) for arg in get_args(annotation))  # list[int] | None, Annotated[...]


def from_hash(cls: type[M], fields: Mapping[str, str], **extra: Any) -> M:
    """Rebuild a model from HGETALL fields, ignoring fields the model does not define.

    The inverse of ``to_hash``: lists and dicts are JSON, booleans "1"/"0"; every other field is
    kept as text for pydantic to validate (an output that looks like JSON stays text).
    ``extra`` fields (e.g. the job id, which is in the key, not the hash) override the hash's.
    """
    json_fields = hash_json_fields(cls)
    data: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        if name not in fields:
            continue
        raw = fields[name]
        if name in json_fields:
            data[name] = json.loads(raw)
        elif info.annotation is bool:
            data[name] = raw in ("1", "true", "True")
        else:
            data[name] = raw
    data.update(extra)
    return cls.model_validate(data)


def describe_validation_error(exc: ValidationError) -> str:
    """Turn a pydantic error into one readable line for a rejection reason."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ())) or "request"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)
