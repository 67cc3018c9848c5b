"""A CPU stand-in for the parts of vLLM 0.26's AsyncLLM that ``dio.gpu_worker.vllm_engine`` calls.

It follows vLLM's shapes and behaviour where the adapter depends on them (checked against the
vLLM 0.26.0 source):

- ``generate(prompt, sampling_params, request_id, *, priority=0)`` is an async generator of
  cumulative ``RequestOutput``s (``outputs[0].token_ids`` grows, ``finished`` on the last one,
  ``finish_reason`` "length"/"abort", ``num_cached_tokens`` = prompt tokens found in the prefix
  cache in whole blocks, never the whole prompt);
- a prompt of ``max_model_len`` tokens or more raises ValueError with vLLM's message
  (v1/engine/input_processor.py ``_validate_prompt_len``), as does an empty prompt and a text
  prompt without a tokenizer (like vLLM without a tokenizer, token ids are not range-checked);
- ``abort(request_id)`` ends that request's stream with a finished output, finish reason "abort";
- ``SamplingParams.output_kind``: CUMULATIVE outputs each step, DELTA outputs with only the step's
  new tokens and text, FINAL_ONLY the finished output alone; a finished output carries
  ``metrics`` with ``arrival_time`` and ``first_token_latency`` (vLLM's per-request stats);
- with ``detokenize`` the text is one word per token id (`` w<id>``); without it, "" as in vLLM;
- ``vllm_config.cache_config.num_gpu_blocks`` / ``block_size`` / ``kv_cache_size_tokens``,
  ``scheduler_config.max_num_seqs``, ``model_config.max_model_len``;
- ``metrics_snapshot()`` returns Gauge/Counter objects named as vLLM's Prometheus metrics.

One token per ``step_s`` per request; at most ``max_num_seqs`` requests run, the rest wait.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dio.gpu_worker.vllm_engine import VllmBackend

DEFAULT_MAX_NUM_SEQS = 256


def too_long_message(prompt_len: int, max_model_len: int) -> str:
    """Return vLLM 0.26's error text for a decoder prompt longer than max_model_len."""
    return (
        f"The decoder prompt (length {prompt_len}) is longer than the maximum model length of "
        f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of text tokens."
    )


class RequestOutputKind(IntEnum):
    """vllm.sampling_params.RequestOutputKind."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    """The SamplingParams fields the adapter sets (vLLM's defaults, max_tokens=16 included)."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: list[str] | None = None  # accepted, not applied (the batch runner and the gateway cut the text)
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE


def token_word(token_id: int) -> str:
    """The stand-in's text of one token."""
    return f" w{token_id}"


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: Any = None  # a finished output's per-request stats


@dataclass
class Gauge:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class Counter:
    name: str
    labels: dict[str, str]
    value: int


@dataclass
class _Request:
    prompt_ids: list[int]
    max_tokens: int
    blocks: int
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    arrival_time: float = field(default_factory=time.time)
    first_token_time: float | None = None
    sent: int = 0  # tokens already sent (DELTA outputs carry the rest)


class StandinAsyncLLM:
    """Generates random tokens on a timer, with vLLM's request, abort and config surface."""

    def __init__(self, args: dict[str, Any], *, step_s: float, num_gpu_blocks: int, block_size: int) -> None:
        self.args = args
        config = json.loads((Path(args["model"]) / "config.json").read_text())
        self.vocab_size = int(config["vocab_size"])
        max_model_len = int(args.get("max_model_len") or config["max_position_embeddings"])
        self.vllm_config = SimpleNamespace(
            cache_config=SimpleNamespace(
                num_gpu_blocks=num_gpu_blocks, block_size=block_size, kv_cache_size_tokens=None, cache_dtype="auto"
            ),
            scheduler_config=SimpleNamespace(max_num_seqs=int(args.get("max_num_seqs") or DEFAULT_MAX_NUM_SEQS)),
            model_config=SimpleNamespace(max_model_len=max_model_len),
        )
        self.step_s = step_s
        self.per_request_metrics = True  # finished outputs carry metrics (tests turn it off)
        self.received: list[tuple[Any, SamplingParams, str, dict[str, Any]]] = []
        self.fail_next: Exception | None = None
        self.preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self._cached_blocks: set[tuple[int, ...]] = set()
        self._running: dict[str, _Request] = {}
        self._waiting: dict[str, _Request] = {}
        self._slot_free = asyncio.Condition()

    # --- vLLM's surface ---

    async def generate(
        self, prompt: Any, sampling_params: SamplingParams, request_id: str, *, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yield cumulative outputs, one token per step, like AsyncLLM.generate."""
        extra = {"priority": priority} if priority else {}
        self.received.append((prompt, sampling_params, request_id, extra))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        ids = self._validate(prompt)
        cached = self._lookup_prefix(ids)
        max_len = self.vllm_config.model_config.max_model_len
        limit = min(sampling_params.max_tokens or 16, max_len - len(ids))
        block_size = self.vllm_config.cache_config.block_size
        req = _Request(ids, limit, -(-(len(ids) + limit) // block_size))
        self._waiting[request_id] = req
        try:
            await self._admit(request_id, req)
            async for out in self._decode(request_id, req, cached, sampling_params):
                yield out
        finally:
            self._running.pop(request_id, None)
            self._waiting.pop(request_id, None)
            async with self._slot_free:
                self._slot_free.notify_all()

    async def abort(self, request_id: str) -> None:
        """End a request: its stream yields a finished output with finish reason "abort"."""
        req = self._running.get(request_id) or self._waiting.get(request_id)
        if req is not None:
            req.aborted.set()
            async with self._slot_free:  # a waiting request leaves the queue at once
                self._slot_free.notify_all()

    def shutdown(self) -> None:
        """Nothing to free on a CPU."""

    # --- internals ---

    def _validate(self, prompt: Any) -> list[int]:
        """Return the prompt's token ids, raising vLLM's ValueErrors for refused prompts."""
        if isinstance(prompt, str):
            raise ValueError("text prompts need a tokenizer; the engine was started with skip_tokenizer_init")
        ids = list(prompt["prompt_token_ids"])
        max_len = self.vllm_config.model_config.max_model_len
        if not ids:
            raise ValueError("The decoder prompt cannot be empty")
        if len(ids) >= max_len:
            raise ValueError(too_long_message(len(ids), max_len))
        return ids

    def _lookup_prefix(self, ids: list[int]) -> int:
        """Return prompt tokens found in the prefix cache (whole blocks, never the last token)."""
        size = self.vllm_config.cache_config.block_size
        full = (len(ids) - 1) // size
        hits = 0
        while hits < full and tuple(ids[: (hits + 1) * size]) in self._cached_blocks:
            hits += 1
        for i in range(1, len(ids) // size + 1):
            self._cached_blocks.add(tuple(ids[: i * size]))
        self.prefix_queries += len(ids)
        self.prefix_hits += hits * size
        return hits * size

    async def _admit(self, request_id: str, req: _Request) -> None:
        """Wait until fewer than max_num_seqs requests run (or the request is aborted)."""
        limit = self.vllm_config.scheduler_config.max_num_seqs
        async with self._slot_free:
            await self._slot_free.wait_for(lambda: len(self._running) < limit or req.aborted.is_set())
        self._waiting.pop(request_id, None)
        self._running[request_id] = req

    async def _decode(
        self, request_id: str, req: _Request, cached: int, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs (as ``params.output_kind`` says) until max_tokens or an abort, one token per step."""
        rng = random.Random(hash((tuple(req.prompt_ids), params.seed)) if params.seed is not None else None)
        tokens: list[int] = []
        while True:
            if req.aborted.is_set():
                yield self._output(request_id, req, tokens, cached, "abort", params)
                return
            await asyncio.sleep(self.step_s)
            if req.aborted.is_set():
                continue
            tokens.append(rng.randrange(3, self.vocab_size))
            if req.first_token_time is None:
                req.first_token_time = time.time()
            done = len(tokens) >= req.max_tokens
            if done or params.output_kind != RequestOutputKind.FINAL_ONLY:
                yield self._output(request_id, req, tokens, cached, "length" if done else None, params)
            if done:
                return

    def _output(
        self, request_id: str, req: _Request, tokens: list[int], cached: int, reason: str | None,
        params: SamplingParams,
    ) -> RequestOutput:
        start = req.sent if params.output_kind == RequestOutputKind.DELTA else 0
        req.sent = len(tokens)
        ids = tokens[start:] if start else tokens
        text = "".join(token_word(t) for t in ids) if params.detokenize else ""
        completion = CompletionOutput(0, text, ids, reason)
        finished = reason is not None
        metrics = None
        if finished and self.per_request_metrics and req.first_token_time is not None:
            metrics = SimpleNamespace(arrival_time=req.arrival_time,
                                      first_token_latency=req.first_token_time - req.arrival_time)
        return RequestOutput(request_id, req.prompt_ids, [completion], finished, cached, metrics)

    def metrics_snapshot(self) -> list[Gauge | Counter]:
        """Return the engine's state under vLLM's Prometheus metric names."""
        labels = {"model_name": str(self.args.get("served_model_name")), "engine": "0"}
        used = sum(r.blocks for r in self._running.values())
        usage = min(1.0, used / self.vllm_config.cache_config.num_gpu_blocks)
        return [
            Gauge("vllm:num_requests_running", labels, len(self._running)),
            Gauge("vllm:num_requests_waiting", labels, len(self._waiting)),
            Gauge("vllm:kv_cache_usage_perc", labels, usage),
            Counter("vllm:num_preemptions", labels, self.preemptions),
            Counter("vllm:prefix_cache_queries", labels, self.prefix_queries),
            Counter("vllm:prefix_cache_hits", labels, self.prefix_hits),
        ]


class StandinBackend(VllmBackend):
    """A VllmBackend whose engine is a StandinAsyncLLM; ``engine`` is the last one made."""

    def __init__(self, *, step_s: float = 0.002, num_gpu_blocks: int = 4096, block_size: int = 16) -> None:
        self.engine: StandinAsyncLLM | None = None
        self.start_error: Exception | None = None
        self.snapshot_override: list[Any] | Exception | None = None
        self._step_s = step_s
        self._num_gpu_blocks = num_gpu_blocks
        self._block_size = block_size
        super().__init__(self._make_engine, SamplingParams, self._snapshot, RequestOutputKind)

    def _make_engine(self, args: dict[str, Any]) -> StandinAsyncLLM:
        if self.start_error is not None:
            raise self.start_error
        self.engine = StandinAsyncLLM(
            args, step_s=self._step_s, num_gpu_blocks=self._num_gpu_blocks, block_size=self._block_size
        )
        return self.engine

    def _snapshot(self) -> list[Any]:
        if isinstance(self.snapshot_override, Exception):
            raise self.snapshot_override
        if self.snapshot_override is not None:
            return self.snapshot_override
        return self.engine.metrics_snapshot() if self.engine else []
