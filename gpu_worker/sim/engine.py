"""SimEngine: an Engine whose GPU is the roofline model, run faster than real time by ``time_scale``.

One asyncio task per engine drives the scheduler: it sleeps until the next scheduler event in wall
time (simulated time / time_scale), wakes early when a request arrives or leaves, and hands each
request's events to its stream. Between events it costs nothing, so one process can host many
simulated GPUs on one event loop. A request that streams (``EngineRequest.stream``) also gets its
progress every ``stream_interval_s`` of wall time while it decodes, with the text of its new tokens
(``dio.gpu_worker.sim.text``: a word per token id); the others get their first token and their end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from dio.gpu_worker.engine import (
    Engine,
    EngineCapacity,
    EngineError,
    EngineOutput,
    EngineRequest,
    EngineStats,
    OutOfMemory,
)
from dio.gpu_worker.instant import synthetic_token_ids
from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import (
    DEFAULT_MAX_NUM_SEQS,
    DEFAULT_MAX_PREEMPTIONS,
    BatchScheduler,
    EventKind,
    SchedulerEvent,
    SimRequest,
)
from dio.gpu_worker.sim.text import token_text
from dio.protocol.defaults import DEFAULT_MODEL, PREFIX_BLOCK_TOKENS

log = logging.getLogger(__name__)

STREAM_INTERVAL_S = 0.01  # wall seconds between progress outputs of a streaming request


@dataclass
class _Stream:
    """A request's link between the driver task and its ``stream`` consumer."""

    request: EngineRequest
    queue: asyncio.Queue[EngineOutput | EngineError] = field(default_factory=asyncio.Queue)
    first_token_at: float | None = None
    output_tokens: int = 0
    sent_tokens: int = 0  # streaming: tokens whose text was handed out


class SimEngine(Engine):
    """A simulated GPU serving one model: vLLM's scheduling, roofline step times, no kernels."""

    name = "sim"

    def __init__(
        self,
        gpu: str = "H100-80GB",
        model: str = DEFAULT_MODEL,
        *,
        time_scale: float = 1.0,
        gpu_memory_utilization: float = roofline.DEFAULT_GPU_MEMORY_UTILIZATION,
        max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
        max_num_batched_tokens: int = roofline.DEFAULT_MAX_BATCHED_TOKENS,
        max_preemptions: int | None = DEFAULT_MAX_PREEMPTIONS,
        kv_capacity_tokens: int | None = None,
        prefix_block_tokens: int = PREFIX_BLOCK_TOKENS,
        seed: int = 0,
        stream_interval_s: float = STREAM_INTERVAL_S,
    ) -> None:
        """Build the simulated GPU; ``time_scale`` is simulated seconds per wall second.

        Raises:
            ValueError: an unknown GPU or model name, a bad time_scale, or a model that does not
                fit (roofline.ModelDoesNotFit).
        """
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.profile, self.shape = get_profile(gpu), get_model(model)
        self.time_scale = float(time_scale)
        self.seed = seed
        self.stream_interval_s = stream_interval_s
        self.scheduler = BatchScheduler(
            self.profile,
            self.shape,
            kv_capacity_tokens=kv_capacity_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_preemptions=max_preemptions,
            prefix_block_tokens=prefix_block_tokens,
        )
        self._streams: dict[str, _Stream] = {}
        self._streaming: dict[str, _Stream] = {}  # the streams of requests that stream their progress
        self._wake = asyncio.Event()
        self._timer_fired = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wall0 = 0.0  # loop time at simulated time 0
        self._epoch0 = 0.0  # wall clock (epoch s) at simulated time 0

    # --- Engine interface ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the clock and the driver task."""
        if self._task is not None:
            return
        loop = self._loop = asyncio.get_running_loop()
        self._wall0, self._epoch0 = loop.time(), time.time()
        self._task = loop.create_task(self._drive(), name=f"sim-engine-{self.profile.name}")

    def capacity(self) -> EngineCapacity:
        """Return the simulated GPU's limits."""
        return EngineCapacity(
            gpu=self.profile.name,
            model=self.shape.name,
            kv_capacity_tokens=self.scheduler.kv_capacity,
            kv_bytes_per_token=self.shape.kv_bytes_per_token,
            max_num_seqs=self.scheduler.max_num_seqs,
            max_model_len=self.scheduler.max_model_len,
            total_vram_bytes=self.profile.vram_bytes,
            time_scale=self.time_scale,
            weight_bytes=self.shape.weight_bytes,
            peak_flops=self.profile.peak_flops,
            mem_bandwidth=self.profile.mem_bandwidth_bytes_s,
        )

    async def stream(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """Run one request: yield an output at its first token, then the final one."""
        if self._task is None or self._task.done():
            raise EngineError("sim engine is not running")
        if request.id in self._streams:
            raise EngineError(f"request {request.id!r} is already running on this engine")
        sim_request = SimRequest(
            request.id,
            request.prompt_tokens,
            request.max_tokens,
            eos_tokens=None if request.ignore_eos else request.eos_tokens,  # the simulated model's EOS
            priority=request.priority,
            prefix_hashes=request.prefix_hashes,
        )
        self.scheduler.add(sim_request, self._sim_now())  # RequestRejected reaches the caller
        stream = self._streams[request.id] = _Stream(request)
        if request.stream:
            self._streaming[request.id] = stream
        self._wake.set()
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, EngineError):
                    raise item
                yield item
                if item.finished:
                    return
        finally:
            if self._forget(request.id) is not None:
                # The consumer left early (cancelled or closed): free the simulated KV at once.
                self.scheduler.abort(request.id, self._sim_now())
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        """Stop a request; its stream ends with ``finish_reason='abort'``."""
        stream = self._forget(request_id)
        if stream is None:
            return
        request = self.scheduler.abort(request_id, self._sim_now())
        if request is None:  # already ended inside the scheduler; its event is dropped
            output = self._output(stream, stream.output_tokens, finished=True, reason="abort")
        else:
            output = self._output(
                stream,
                request.output_tokens,
                cached=max(request.cached_tokens, 0),
                preemptions=request.preemptions,
                finished=True,
                reason="abort",
            )
        stream.queue.put_nowait(output)
        self._wake.set()

    def stats(self) -> EngineStats:
        """Return the simulated GPU's state now."""
        if self._task is not None and not self._task.done():
            # Bring a long decode run up to now, so KV usage is current, not as of the last event.
            self._dispatch(self.scheduler.advance_to(self._sim_now()))
        s = self.scheduler.stats()
        return EngineStats(
            running=s.running,
            waiting=s.waiting,
            kv_used_tokens=s.kv_used_tokens,
            kv_usage=s.kv_usage,
            preemptions=s.preemptions,
            extra={
                "sim_time_s": self.scheduler.now,
                "finished": float(s.finished),
                "failed": float(s.failed),
                "prefix_hit_tokens": float(s.prefix_hit_tokens),
            },
        )

    async def shutdown(self) -> None:
        """Stop the driver; every open stream fails with EngineError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(EngineError("sim engine shut down"))

    # --- the driver --------------------------------------------------------------------------------

    def _sim_now(self) -> float:
        assert self._loop is not None, "start() first"
        return (self._loop.time() - self._wall0) * self.time_scale

    def _wall_epoch(self, sim_t: float) -> float:
        return self._epoch0 + sim_t / self.time_scale

    async def _drive(self) -> None:
        try:
            await self._drive_forever()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a simulator bug: fail every open request rather than hang it
            log.exception("sim engine driver crashed")
            self._fail_all(EngineError(f"sim engine crashed: {exc!r}"))

    async def _drive_forever(self) -> None:
        loop = asyncio.get_running_loop()
        target: float | None = None
        while True:
            now = self._sim_now()
            if self._timer_fired and target is not None:
                now = max(now, target)  # asyncio may fire a timer a clock tick early
            self._dispatch(self.scheduler.advance_to(now))
            self._publish_progress()
            target = self.scheduler.next_event_time()
            if self._streaming:  # wake to hand the streaming requests their new tokens
                tick = now + self.stream_interval_s * self.time_scale
                target = tick if target is None else min(target, tick)
            self._wake.clear()
            self._timer_fired = False
            timer = None
            if target is not None:
                timer = loop.call_at(self._wall0 + target / self.time_scale, self._on_timer)
            await self._wake.wait()
            if timer is not None:
                timer.cancel()

    def _on_timer(self) -> None:
        self._timer_fired = True
        self._wake.set()

    def _dispatch(self, events: list[SchedulerEvent]) -> None:
        """Hand each event to its request's stream (events of aborted requests are dropped)."""
        for event in events:
            stream = self._streams.get(event.request_id)
            if stream is None:
                continue
            if event.kind is EventKind.first_token:
                stream.first_token_at = self._wall_epoch(event.time)
                stream.queue.put_nowait(self._event_output(stream, event))
                continue
            self._forget(event.request_id)
            if event.kind is EventKind.failed:
                stream.queue.put_nowait(OutOfMemory(event.error or "KV cache exhausted"))
            else:
                stream.queue.put_nowait(self._event_output(stream, event, finished=True))

    def _event_output(self, stream: _Stream, event: SchedulerEvent, finished: bool = False) -> EngineOutput:
        stopped = event.output_tokens < stream.request.max_tokens  # it reached its EOS before the cap
        return self._output(
            stream,
            event.output_tokens,
            cached=event.cached_tokens,
            preemptions=event.preemptions,
            finished=finished,
            reason="stop" if stopped else "length",
        )

    def _output(
        self,
        stream: _Stream,
        tokens: int,
        *,
        cached: int = 0,
        preemptions: int = 0,
        finished: bool = False,
        reason: str = "length",
    ) -> EngineOutput:
        stream.output_tokens = tokens
        request = stream.request
        seed = self.seed if request.seed is None else request.seed
        delta = None
        if request.stream:  # the text of the tokens since the last output
            delta = token_text(synthetic_token_ids(request.id, seed, tokens, stream.sent_tokens))
            stream.sent_tokens = max(stream.sent_tokens, tokens)
        ids = synthetic_token_ids(request.id, seed, tokens) if finished or not request.stream else None
        return EngineOutput(
            output_tokens=tokens,
            text=token_text(ids) if finished and ids is not None else None,
            text_delta=delta,
            token_ids=ids,
            finished=finished,
            finish_reason=reason if finished else None,
            prompt_tokens=request.prompt_tokens,
            cached_tokens=cached,
            first_token_at=stream.first_token_at,
            preemptions=preemptions,
        )

    def _publish_progress(self) -> None:
        """Hand each streaming request that decoded since its last output its new tokens."""
        for request_id, stream in self._streaming.items():
            tokens = self.scheduler.progress(request_id)
            if tokens > stream.output_tokens:
                stream.queue.put_nowait(self._output(stream, tokens))

    def _forget(self, request_id: str) -> _Stream | None:
        """Drop a request's stream (it ended, or its consumer left); return it, None if it was gone."""
        self._streaming.pop(request_id, None)
        return self._streams.pop(request_id, None)

    def _fail_all(self, error: EngineError) -> None:
        streams, self._streams, self._streaming = self._streams, {}, {}
        for stream in streams.values():
            stream.queue.put_nowait(error)
