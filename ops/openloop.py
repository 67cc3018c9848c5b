"""Replay a trace open loop against a running DIO and collect what the client saw.

Open loop: each request is submitted at its arrival time, whatever happened to the earlier ones,
as real traffic arrives. Arrival times are simulated seconds played at ``time_scale`` simulated
seconds per wall second; latencies come back in simulated milliseconds (wall ms × time_scale).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dio.client import Client, ResultTimeout
from dio.client.handle import JobHandle
from dio.client.pools import ClientPools
from dio.ops.traces import Trace, TraceRequest
from dio.protocol.keys import SIM_EOS_METADATA
from dio.protocol.models import JobResult, JobStatus

SUBMIT_TICK_S = 0.005  # the submitter sleeps at most this long between checks for due requests
LOST = "lost"  # the status of a request with no terminal state when the run ended


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the client saw of one request; times in simulated milliseconds."""

    status: str  # completed | rejected | failed | cancelled | lost
    worker: str | None = None
    latency_ms: float | None = None  # submitted → finished
    ttft_ms: float | None = None  # submitted → first token
    output_tokens: int = 0
    reason: str | None = None  # rejected: why; failed: the engine's error
    retry_after_s: float | None = None


def request_fields(request: TraceRequest, index: int, model: str, deadline_wall_ms: float | None = None,
                   max_tokens: int | None = None) -> dict:
    """Return the submit fields of one trace request (the prompt is a stand-in of declared length).

    Without ``max_tokens`` the request asks for exactly its true output length (``max_tokens`` =
    the trace's output tokens, ``ignore_eos``): the router knows where it ends. With it, that is
    the cap the router sees, as a real client sends, and the true length travels only to the
    simulated engine, in ``metadata[SIM_EOS_METADATA]`` (where its model emits EOS).
    """
    fields: dict[str, Any] = {"prompt": f"request {index}", "num_prompt_tokens": request.prompt_tokens,
                              "model": model}
    if max_tokens is None:
        fields.update(max_tokens=request.output_tokens, ignore_eos=True)
    else:
        fields.update(max_tokens=max_tokens, metadata={SIM_EOS_METADATA: str(request.output_tokens)})
    if request.prefix_hashes:
        fields["prefix_hashes"] = request.prefix_hashes
    if deadline_wall_ms is not None:
        fields["deadline_ms"] = deadline_wall_ms
    return fields


def submit_on_schedule(client: Client | ClientPools, trace: Trace, time_scale: float,
                       fields: Callable[[int, TraceRequest], dict],
                       on_submit: Callable[[int], None] | None = None) -> list[JobHandle]:
    """Submit each request at its scaled arrival time (open loop); return the handles in trace order.

    ``client`` may be ``ClientPools`` (sharded by model): each request goes to its model's pool.
    """
    handles: list[JobHandle] = []
    start = time.monotonic()
    i = 0
    while i < len(trace):
        now = time.monotonic() - start
        due = []
        while i < len(trace) and trace[i].arrival_s / time_scale <= now:
            due.append(fields(i, trace[i]))
            i += 1
        if due:
            handles += client.submit_many(due)
            if on_submit is not None:
                on_submit(len(due))
        else:
            time.sleep(min(SUBMIT_TICK_S, max(trace[i].arrival_s / time_scale - now, 0.0)))
    return handles


def collect(client: Client, handles: list[JobHandle], timeout_s: float,
            on_result: Callable[[], None] | None = None) -> list[JobResult | None]:
    """Wait up to ``timeout_s`` for every job; return each terminal result, None where none came."""
    try:
        for _ in client.as_completed(handles, timeout=timeout_s):
            if on_result is not None:
                on_result()
    except ResultTimeout:
        pass  # the rest are reported lost: no terminal state within the run's drain window
    return [_settled(h) for h in handles]


def _settled(handle: JobHandle) -> JobResult | None:
    future = handle.future
    if not future.done() or future.exception() is not None:
        return None
    return future.result()


def to_outcome(result: JobResult | None, time_scale: float) -> Outcome:
    """Turn a job's terminal result into an Outcome in simulated milliseconds."""
    if result is None:
        return Outcome(LOST)
    scale = 1000.0 * time_scale
    latency = result.latency_s
    ttft = result.ttft_s
    completed = result.status == JobStatus.completed
    return Outcome(
        status=result.status.value,
        worker=result.worker,
        latency_ms=latency * scale if completed and latency is not None else None,
        ttft_ms=ttft * scale if completed and ttft is not None else None,
        output_tokens=result.output_tokens or 0,
        reason=result.reason if result.status == JobStatus.rejected else result.error,
        retry_after_s=result.retry_after_s,
    )
