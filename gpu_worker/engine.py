"""The ``Engine`` interface every GPU worker engine implements (vLLM, simulated GPU, instant), and its types.

``EngineRequest`` goes in and cumulative ``EngineOutput``s come out; ``EngineCapacity`` is what a
worker registers and ``EngineStats`` what it heartbeats; ``EngineError`` and its subclasses say how
a job ends. The engines themselves live beside this module, and ``engine_factory.make_engine``
builds one by name.

An engine runs many requests at once (continuous batching): the daemon calls ``stream`` for each
job concurrently, from one asyncio event loop, and the engine batches them internally.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

from dio.protocol.models import WorkerInfo


class EngineError(Exception):
    """A request could not be served; the job ends ``failed`` with this message."""


class RequestRejected(EngineError):
    """The engine refuses the request itself (e.g. prompt longer than the model's context).

    A client error: the job ends ``rejected`` with this message and is not retried.
    """


class OutOfMemory(EngineError):
    """The engine ran out of KV-cache memory for this request; the job ends ``failed``."""


@dataclass
class EngineRequest:
    """What an engine needs of a request (translated from ``dio.protocol.models.Request``)."""

    id: str
    prompt_tokens: int  # prompt length in tokens (exact for token ids, declared or estimated for text)
    max_tokens: int
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    prefix_hashes: list[int] | None = None  # leading prompt blocks, for the prefix cache
    priority: int = 0  # lower runs first (vLLM's convention); batch tier uses 1
    # Simulated engines only: where the simulated model emits EOS, in output tokens (max_tokens still
    # caps it; ignore_eos overrides it). From Request.metadata[SIM_EOS_METADATA]; real engines ignore it.
    eos_tokens: int | None = None
    # The client streams the answer: yield outputs as tokens come (with ``text_delta``). Otherwise
    # an engine may yield the final output only (vLLM is then asked for nothing else).
    stream: bool = False
    # Stop sequences (Request.stop): engines that can (vLLM) end the answer before the first one.
    stop: list[str] | None = None


@dataclass
class EngineOutput:
    """A request's output so far (cumulative); the last one yielded has ``finished=True``."""

    output_tokens: int = 0
    text: str | None = None  # cumulative; engines may leave it None until the final output
    # The text since the previous output this stream yielded (set by engines on streaming requests;
    # when None the daemon derives it from the cumulative ``text``).
    text_delta: str | None = None
    token_ids: list[int] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "length", "stop", "abort"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens that came from the prefix cache
    first_token_at: float | None = None  # wall clock (epoch s) of the first output token
    preemptions: int = 0


@dataclass
class EngineCapacity:
    """What the worker registers: the engine's real limits."""

    gpu: str
    model: str
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    max_num_seqs: int
    max_model_len: int
    total_vram_bytes: int = 0
    time_scale: float = 1.0
    weight_bytes: int = 0  # model weights in GPU memory (0: unknown); sets how KV load slows decode
    peak_flops: float = 0.0  # the GPU's datasheet dense bf16 FLOP/s (0: unknown); the predictor's prior
    mem_bandwidth: float = 0.0  # its datasheet memory bandwidth, bytes/s (0: unknown)
    chat_template: str | None = None  # the tokenizer's chat template, for the gateway (None: no tokenizer)
    eos_token: str | None = None  # the tokenizer's end-of-sequence text, which chat templates may use

    def worker_info(self, worker_id: str, engine: str, **extra: object) -> WorkerInfo:
        """The registration of a worker running an engine with these limits."""
        return WorkerInfo(id=worker_id, engine=engine, **asdict(self), **extra)


@dataclass
class EngineStats:
    """Live telemetry for the heartbeat."""

    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0
    kv_usage: float = 0.0
    preemptions: int = 0
    free_vram_bytes: int | None = None
    extra: dict[str, float] = field(default_factory=dict)


class Engine(abc.ABC):
    """An inference engine; one instance per worker process."""

    name: str = "engine"

    async def start(self) -> None:
        """Load the model, allocate the KV cache. Called once before any request."""

    @abc.abstractmethod
    def capacity(self) -> EngineCapacity:
        """Return the engine's limits (valid after ``start``)."""

    @abc.abstractmethod
    def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run one request, yielding cumulative outputs; the last has ``finished=True``.

        Raises ``RequestRejected`` for a request the engine refuses, ``OutOfMemory`` when its KV
        cache cannot hold it, ``EngineError`` for anything else.
        """

    async def generate(self, request: EngineRequest) -> EngineOutput:
        """Run one request to the end and return its final output."""
        last = EngineOutput()
        async for out in self.stream(request):
            last = out
        return last

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a running request (its ``stream`` ends with ``finish_reason='abort'``)."""

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """Return live telemetry (cheap; called every heartbeat)."""

    async def shutdown(self) -> None:
        """Release the engine's resources."""
