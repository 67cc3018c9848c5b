"""The simulated vLLM scheduler: continuous batching, preemption and OOM, prefix cache, priorities."""

from __future__ import annotations

import pytest

from dio.gpu_worker.engine import RequestRejected
from dio.gpu_worker.sim import roofline
from dio.gpu_worker.sim.profiles import get_model, get_profile
from dio.gpu_worker.sim.scheduler import BatchScheduler, EventKind, SchedulerEvent, SimRequest

H100 = get_profile("H100")
T4 = get_profile("T4")
LLAMA_3B = get_model("llama-3.2-3b")


def drive(sched: BatchScheduler,
          arrivals: list[tuple[float, SimRequest]]) -> dict[str, dict[EventKind, SchedulerEvent]]:
    """Add each request at its arrival time, run to idle; return each request's events by kind."""
    events: list[SchedulerEvent] = []
    for t, request in sorted(arrivals, key=lambda a: a[0]):
        events += sched.advance_to(t)
        sched.add(request, t)
    while (t := sched.next_event_time()) is not None:
        events += sched.advance_to(t)
    by_id: dict[str, dict[EventKind, SchedulerEvent]] = {}
    for e in events:
        by_id.setdefault(e.request_id, {})[e.kind] = e
    return by_id


def req(rid: str, prompt: int = 1000, output: int = 200, **kw) -> SimRequest:
    return SimRequest(rid, prompt, output, **kw)


def test_single_request_matches_the_unloaded_service_time() -> None:
    events = drive(BatchScheduler(H100, LLAMA_3B), [(0.0, req("a"))])["a"]
    assert events[EventKind.first_token].time == pytest.approx(roofline.prefill_time_s(H100, LLAMA_3B, 1000))
    finished = events[EventKind.finished]
    assert finished.time == pytest.approx(roofline.unloaded_service_time_s(H100, LLAMA_3B, 1000, 200))
    assert finished.output_tokens == 200


def test_continuous_batching_serves_32_requests_in_far_less_than_32_times_one() -> None:
    one = roofline.unloaded_service_time_s(H100, LLAMA_3B, 1000, 200)
    events = drive(BatchScheduler(H100, LLAMA_3B), [(0.0, req(str(i))) for i in range(32)])
    last = max(e[EventKind.finished].time for e in events.values())
    assert len(events) == 32
    assert last < 3 * one  # sequential service would take 32x
    for e in events.values():
        assert e[EventKind.first_token].time < e[EventKind.finished].time


def test_requests_that_fit_together_are_never_preempted() -> None:
    # 8 x (2000 + 4000) = 48,000 tokens <= the T4's 59,344.
    sched = BatchScheduler(T4, LLAMA_3B)
    events = drive(sched, [(0.0, req(str(i), 2000, 4000)) for i in range(8)])
    assert all(EventKind.finished in e for e in events.values())
    assert sched.stats().preemptions == 0


@pytest.mark.parametrize(
    "max_preemptions, expect_failures",
    [
        (1, True),  # 64 x 6000 tokens on a 59k-token cache: the latest admitted are preempted twice
        (1000, False),  # with unbounded recompute every request eventually finishes
    ],
)
def test_kv_exhaustion_preempts_then_fails_with_out_of_memory(max_preemptions: int, expect_failures: bool) -> None:
    sched = BatchScheduler(T4, LLAMA_3B, max_preemptions=max_preemptions)
    events = drive(sched, [(0.0, req(str(i), 2000, 4000)) for i in range(64)])
    stats = sched.stats()
    failed = [e[EventKind.failed] for e in events.values() if EventKind.failed in e]
    finished = [e[EventKind.finished] for e in events.values() if EventKind.finished in e]
    assert stats.preemptions > 0
    assert len(failed) + len(finished) == 64  # every request ends exactly once
    assert bool(failed) == expect_failures
    for f in failed:
        assert f.error == f"KV cache exhausted: preempted {max_preemptions + 1} times on T4"
    assert any(f.preemptions > 0 for f in finished)  # some finished after a recompute
    assert stats.kv_used_tokens == 0 and stats.running == 0 and stats.waiting == 0


def test_kv_never_exceeds_capacity_while_running() -> None:
    sched = BatchScheduler(T4, LLAMA_3B, kv_capacity_tokens=20_000)
    for i in range(20):
        sched.add(req(str(i), 1500, 3000), 0.0)
    t, peak = 0.0, 0
    while (nxt := sched.next_event_time()) is not None:
        t = min(t + 0.05, nxt)  # look between events too, not only at them
        sched.advance_to(t)
        stats = sched.stats()
        assert stats.kv_used_tokens <= stats.kv_capacity_tokens
        peak = max(peak, stats.kv_used_tokens)
    assert peak > 0.9 * 20_000


@pytest.mark.parametrize(
    "gpu, model, prompt, output",
    [
        (H100, "tiny-llama-1b", 4000, 200),  # beyond the model's 4096-token context
        (T4, "llama-3.2-3b", 59_000, 1000),  # beyond what the T4's KV cache can hold
    ],
)
def test_too_long_request_is_rejected(gpu, model: str, prompt: int, output: int) -> None:
    sched = BatchScheduler(gpu, get_model(model))
    with pytest.raises(RequestRejected, match="exceeds max_model_len"):
        sched.add(req("long", prompt, output), 0.0)
    assert sched.stats().waiting == 0


def test_prefix_cache_hits_skip_prefill() -> None:
    sched = BatchScheduler(H100, LLAMA_3B)
    hashes = [11, 12, 13, 14]  # 4 blocks of 512 tokens
    cold = drive(sched, [(0.0, req("cold", 2100, 10, prefix_hashes=hashes))])["cold"]
    start = sched.now + 1.0
    warm = drive(sched, [(start, req("warm", 2100, 10, prefix_hashes=hashes))])["warm"]
    partial = drive(sched, [(start + 1.0, req("partial", 2100, 10, prefix_hashes=[11, 12, 99, 98]))])["partial"]
    assert cold[EventKind.first_token].cached_tokens == 0
    assert warm[EventKind.finished].cached_tokens == 2048
    assert partial[EventKind.finished].cached_tokens == 1024
    ttft_cold = cold[EventKind.first_token].time
    ttft_warm = warm[EventKind.first_token].time - start
    ttft_partial = partial[EventKind.first_token].time - start - 1.0
    assert ttft_warm < ttft_partial < ttft_cold
    assert sched.stats().prefix_hit_tokens == 3072


def test_prefix_cache_evicts_least_recently_used_blocks() -> None:
    sched = BatchScheduler(H100, LLAMA_3B, prefix_cache_tokens=2 * 512)
    drive(sched, [(0.0, req("a", 1100, 1, prefix_hashes=[1, 2]))])
    drive(sched, [(1.0, req("b", 1100, 1, prefix_hashes=[3, 4]))])  # evicts 1, 2
    again = drive(sched, [(2.0, req("a2", 1100, 1, prefix_hashes=[1, 2]))])["a2"]
    assert again[EventKind.finished].cached_tokens == 0


def test_priority_then_fifo_order() -> None:
    # One seat: "busy" runs, then the waiting queue is served lowest priority value first, FIFO within.
    sched = BatchScheduler(H100, LLAMA_3B, max_num_seqs=1)
    arrivals = [
        (0.0, req("busy")),
        (0.001, req("batch-1", priority=1)),
        (0.002, req("batch-2", priority=1)),
        (0.003, req("interactive-1", priority=0)),
        (0.004, req("interactive-2", priority=0)),
    ]
    events = drive(sched, arrivals)
    order = sorted(events, key=lambda rid: events[rid][EventKind.first_token].time)
    assert order == ["busy", "interactive-1", "interactive-2", "batch-1", "batch-2"]


def test_max_num_seqs_bounds_the_batch() -> None:
    sched = BatchScheduler(H100, LLAMA_3B, max_num_seqs=4)
    for i in range(10):
        sched.add(req(str(i)), 0.0)
    sched.advance_to(0.05)
    stats = sched.stats()
    assert (stats.running, stats.waiting) == (4, 6)


def test_newcomer_joins_a_running_decode_batch_at_the_next_step() -> None:
    sched = BatchScheduler(H100, LLAMA_3B)
    events = drive(sched, [(0.0, req("long", 1000, 5000)), (1.0, req("late", 1000, 10))])
    late_ttft = events["late"][EventKind.first_token].time - 1.0
    assert late_ttft < 2 * roofline.prefill_time_s(H100, LLAMA_3B, 1000) + 0.02  # no waiting for "long"
    assert events["late"][EventKind.finished].time < events["long"][EventKind.finished].time


def test_stepping_in_small_increments_gives_the_same_times_as_jumping() -> None:
    def build() -> BatchScheduler:
        sched = BatchScheduler(H100, LLAMA_3B)
        for i in range(5):
            sched.add(req(str(i), 500 * (i + 1), 100 * (i + 1)), 0.0)
        return sched

    jumped = build()
    jump_events = []
    while (t := jumped.next_event_time()) is not None:
        jump_events += jumped.advance_to(t)
    stepped, stepped_events, t = build(), [], 0.0
    while stepped.next_event_time() is not None:
        t += 0.0037
        stepped_events += stepped.advance_to(t)
    assert [(e.request_id, e.kind) for e in stepped_events] == [(e.request_id, e.kind) for e in jump_events]
    assert [e.time for e in stepped_events] == pytest.approx([e.time for e in jump_events], rel=1e-9)


def test_abort_frees_the_kv_cache() -> None:
    sched = BatchScheduler(H100, LLAMA_3B)
    sched.add(req("a", 1000, 1000), 0.0)
    sched.add(req("b", 1000, 1000), 0.0)
    sched.advance_to(1.0)
    used = sched.stats().kv_used_tokens
    aborted = sched.abort("a", 1.0)
    assert aborted is not None and 0 < aborted.output_tokens < 1000
    assert sched.stats().kv_used_tokens < used
    assert sched.abort("a", 1.0) is None
    sched.abort("b", 1.0)
    assert sched.stats().kv_used_tokens == 0
    assert sched.next_event_time() is None


def test_stats_mid_run() -> None:
    sched = BatchScheduler(H100, LLAMA_3B)
    for i in range(10):
        sched.add(req(str(i), 1000, 1000), 0.0)
    sched.advance_to(2.0)
    stats = sched.stats()
    assert stats.running == 10 and stats.waiting == 0
    # Every request holds its prompt plus the tokens decoded so far (less the one being sampled).
    assert 10 * 1000 < stats.kv_used_tokens < 10 * 2000
    assert stats.kv_usage == pytest.approx(stats.kv_used_tokens / stats.kv_capacity_tokens)


def test_duplicate_request_id_is_refused() -> None:
    sched = BatchScheduler(H100, LLAMA_3B)
    sched.add(req("a"), 0.0)
    with pytest.raises(ValueError, match="already"):
        sched.add(req("a"), 0.0)
