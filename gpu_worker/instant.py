"""InstantEngine: answers every request at once with synthetic tokens, to benchmark the pipeline alone."""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator

from dio.gpu_worker.engine import (
    Engine,
    EngineCapacity,
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestRejected,
)
from dio.protocol.defaults import DEFAULT_MODEL

DEFAULT_KV_CAPACITY_TOKENS = 10_000_000  # large enough that KV never limits a pipeline benchmark
DEFAULT_MAX_NUM_SEQS = 1024
SYNTHETIC_VOCAB = 32_000  # synthetic token ids stay below this


def synthetic_token_ids(request_id: str, seed: int, count: int, start: int = 0) -> list[int]:
    """Return deterministic token ids, positions start..count-1: the same request id and seed give the same ids."""
    base = zlib.crc32(request_id.encode()) ^ seed
    return [(base + 7919 * i) % SYNTHETIC_VOCAB for i in range(start, count)]


class InstantEngine(Engine):
    """An engine with no compute: each request ends as soon as it starts, with max_tokens tokens."""

    name = "instant"

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        kv_capacity_tokens: int = DEFAULT_KV_CAPACITY_TOKENS,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.kv_capacity_tokens = kv_capacity_tokens
        self.seed = seed
        self.completed = 0
        self._running = 0

    def capacity(self) -> EngineCapacity:
        """Return generous limits: KV never binds, only max_num_seqs does."""
        return EngineCapacity(
            gpu="instant",
            model=self.model,
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_bytes_per_token=0,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.kv_capacity_tokens,
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Yield the final output at once."""
        if request.prompt_tokens + request.max_tokens > self.kv_capacity_tokens:
            raise RequestRejected(
                f"prompt + max_tokens = {request.prompt_tokens + request.max_tokens}"
                f" exceeds max_model_len {self.kv_capacity_tokens}"
            )
        self._running += 1
        self.completed += 1
        tokens = request.max_tokens
        if request.eos_tokens is not None and not request.ignore_eos:  # a simulated EOS, as the sim engine's
            tokens = min(request.eos_tokens, request.max_tokens)
        try:
            seed = self.seed if request.seed is None else request.seed
            yield EngineOutput(
                output_tokens=tokens,
                text=f"[instant: {tokens} tokens]",
                token_ids=synthetic_token_ids(request.id, seed, tokens),
                finished=True,
                finish_reason="stop" if tokens < request.max_tokens else "length",
                prompt_tokens=request.prompt_tokens,
                first_token_at=time.time(),
            )
        finally:
            self._running -= 1

    async def abort(self, request_id: str) -> None:
        """Do nothing: a request is over before anyone could abort it."""

    def stats(self) -> EngineStats:
        """Return the requests between their start and their output being taken."""
        return EngineStats(running=self._running, extra={"completed": float(self.completed)})
