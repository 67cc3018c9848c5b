"""Token streaming end to end: the assembler's rules, the engines' deltas, and real clusters on a real Redis.

The cluster tests run a real dispatcher and simulated workers (``python -m dio.ops.cli ...``), so a
streamed answer crosses the same Redis keys as in production: the worker's batched deltas on
``{prefix}tokens:<job>``, the end marker, the result notice.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from waiting import wait_for

from dio.client import AsyncClient, Client, ClientSettings, StreamEvent
from dio.client.stream import StreamAssembler, Subscriptions
from dio.gpu_worker.engine import EngineOutput, EngineRequest
from dio.gpu_worker.sim.engine import SimEngine
from dio.gpu_worker.token_stream import TokenPublisher
from dio.gpu_worker.vllm_engine import VllmEngine
from dio.gpu_worker.vllm_standin import RequestOutputKind, StandinBackend
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.protocol.keys import (
    TOKEN_COUNT_FIELD,
    TOKEN_END_FIELD,
    TOKEN_OFFSET_FIELD,
    TOKEN_RUN_FIELD,
    TOKEN_TEXT_FIELD,
    Keys,
)
from dio.protocol.models import JobResult, JobStatus

# --- the assembler: entries in, events out (pure) ------------------------------------------------


def delta(run: str, offset: int, text: str, tokens: int) -> dict[str, str]:
    return {TOKEN_RUN_FIELD: run, TOKEN_OFFSET_FIELD: str(offset), TOKEN_TEXT_FIELD: text,
            TOKEN_COUNT_FIELD: str(tokens)}


def end(run: str) -> dict[str, str]:
    return {TOKEN_RUN_FIELD: run, TOKEN_END_FIELD: "completed"}


def completed(text: str | None, tokens: int) -> JobResult:
    return JobResult(id="j", status=JobStatus.completed, output=text, output_tokens=tokens)


def feed_all(assembler: StreamAssembler, entries: list[dict[str, str]]) -> list[StreamEvent]:
    return [event for fields in entries for event in assembler.feed(fields)]


def answer(events: list[StreamEvent]) -> str:
    """The text a careful reader shows: what came after the last restart."""
    last = max((i for i, e in enumerate(events) if e.restarted), default=-1)
    return "".join(e.text for e in events[last + 1:])


@pytest.mark.parametrize(
    ("entries", "final", "texts"),
    [
        # deltas in order, then the result: the last event carries nothing new
        ([delta("a", 0, "Hel", 1), delta("a", 3, "lo", 2), end("a")], "Hello", ["Hel", "lo", ""]),
        # a delta written twice (a retried flush) is taken once; the overlap of a longer one is cut
        ([delta("a", 0, "Hel", 1), delta("a", 0, "Hel", 1), delta("a", 0, "Hello", 2)], "Hello", ["Hel", "lo", ""]),
        # an entry trimmed away (offset 3 never read): no text until the result, which carries the rest
        ([delta("a", 0, "Hel", 1), delta("a", 5, " wor", 3), delta("a", 9, "ld", 4)], "Hello world",
         ["Hel", "lo world"]),
        # tokens without text (a model without tokenizer) still make events
        ([delta("a", 0, "", 1), delta("a", 0, "", 2)], None, ["", "", ""]),
    ],
)
def test_assembled_text_equals_the_final_text(entries, final, texts):
    assembler = StreamAssembler()
    events = feed_all(assembler, entries)
    events += assembler.finish(completed(final, 4))
    assert [e.text for e in events] == texts
    assert events[-1].result is not None and all(e.result is None for e in events[:-1])
    assert not any(e.restarted for e in events)
    if final is not None:
        assert "".join(e.text for e in events) == final


def test_a_new_run_restarts_the_answer_and_late_entries_of_the_old_run_are_dropped():
    assembler = StreamAssembler()
    events = feed_all(assembler, [
        delta("old", 0, "Hello", 2),
        delta("new", 0, "Hi", 1),  # the job runs again elsewhere: the text so far is void
        delta("old", 5, " world", 3),  # the dead worker's last flush, arriving late: dropped
        delta("new", 2, " there", 2),
        end("old"),  # an end of the abandoned run does not end the stream
    ])
    assert not assembler.ended
    events += assembler.finish(completed("Hi there", 2))
    assert [(e.text, e.restarted) for e in events] == [("Hello", False), ("", True), ("Hi", False),
                                                       (" there", False), ("", False)]
    assert answer(events) == "Hi there"
    assert events[1].output_tokens == 0 and events[-1].output_tokens == 2


def test_a_result_that_does_not_continue_the_shown_text_restarts_it():
    assembler = StreamAssembler()
    events = feed_all(assembler, [delta("a", 0, "Hello", 2)])
    events += assembler.finish(completed("Goodbye", 3))  # e.g. a run whose entries never arrived
    assert [(e.text, e.restarted) for e in events] == [("Hello", False), ("", True), ("Goodbye", False)]


def test_a_cancelled_job_ends_the_stream_with_its_result_and_no_more_text():
    assembler = StreamAssembler()
    events = feed_all(assembler, [delta("a", 0, "Hel", 1)])
    events += assembler.finish(JobResult(id="j", status=JobStatus.cancelled, reason="cancelled by the client"))
    assert [e.text for e in events] == ["Hel", ""] and events[-1].result.status is JobStatus.cancelled


def test_garbage_and_wake_ups_make_no_events():
    assembler = StreamAssembler()
    assert feed_all(assembler, [{"wake": "1"}, {TOKEN_RUN_FIELD: "a", TOKEN_OFFSET_FIELD: "x"}, {}]) == []


def test_the_followed_streams_wake_the_reader_once_per_read_and_are_deleted_once_read():
    subs = Subscriptions()
    woken = []
    a = subs.add("k:a")
    a.wake = lambda: woken.append("a")
    assert subs.wake_needed() and not subs.wake_needed()  # one wake-up covers every stream followed until...
    assert subs.offsets() == {"k:a": "0-0"}
    assert subs.wake_needed()  # ...the reader read the offsets: the next new stream wakes it again
    assert subs.deliver("k:a", [("5-0", {"t": "x"})]) and woken == ["a"]
    assert not subs.deliver("k:other", [("1-0", {})])  # not followed: the reader treats it as its own
    assert subs.offsets() == {"k:a": "5-0"} and a.take() == [("5-0", {"t": "x"})] and a.take() == []
    subs.remove(a, delete=True)
    assert subs.offsets() == {} and subs.take_doomed() == ["k:a"] and subs.take_doomed() == []


# --- the worker's publisher (pure bookkeeping; the pipeline is a recorder) ---------------------------


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def xadd(self, key, fields, maxlen=None, approximate=None, nomkstream=False):
        self.calls.append(("xadd", key, fields, maxlen))

    def expire(self, key, seconds):
        self.calls.append(("expire", key, seconds))


def test_the_publisher_merges_a_runs_outputs_into_one_bounded_expiring_entry_per_flush():
    keys = Keys("{t}:")
    pub = TokenPublisher(keys, maxlen=100, ttl_s=30, end_ttl_s=5)
    pub.begin("j")
    assert pub.add("j", EngineOutput(output_tokens=1, text_delta=" a"))
    assert pub.add("j", EngineOutput(output_tokens=2, text_delta=" b"))
    assert not pub.add("j", EngineOutput(output_tokens=2, text_delta=""))  # nothing new: no work
    pipe = Recorder()
    assert pub.queue_deltas(pipe, pub.take()) == 2
    (_, key, fields, maxlen), expire = pipe.calls
    assert key == keys.tokens("j") and maxlen == 100 and expire == ("expire", key, 30)
    assert (fields[TOKEN_OFFSET_FIELD], fields[TOKEN_TEXT_FIELD], fields[TOKEN_COUNT_FIELD]) == ("0", " a b", "2")
    # an engine that gives cumulative text only: the publisher takes what is new
    assert pub.add("j", EngineOutput(output_tokens=3, text=" a b c"))
    later = pub.take()
    pub.restore(later)  # a failed flush puts them back, merged with what came since
    pub.add("j", EngineOutput(output_tokens=4, text_delta=" d"))
    (merged,) = pub.take()
    assert (merged.offset, "".join(merged.pieces), merged.tokens) == (4, " c d", 4)
    run = pub.close("j")
    pipe = Recorder()
    pub.queue_end(pipe, "j", run, "completed")
    assert pipe.calls[0][2] == {TOKEN_RUN_FIELD: run, TOKEN_END_FIELD: "completed"}
    assert pipe.calls[1] == ("expire", key, 5)


# --- the engines' deltas ----------------------------------------------------------------------------


async def test_the_sim_streams_deltas_that_add_up_to_the_text_it_returns():
    engine = SimEngine("L4", time_scale=20.0, stream_interval_s=0.002)
    await engine.start()
    try:
        streamed = [o async for o in engine.stream(EngineRequest("s1", 100, 64, stream=True))]
        plain = [o async for o in engine.stream(EngineRequest("s1", 100, 64))]
    finally:
        await engine.shutdown()
    final = streamed[-1]
    assert len(streamed) > 3 and final.output_tokens == 64
    assert "".join(o.text_delta or "" for o in streamed) == final.text
    assert all(o.text is None for o in streamed[:-1])
    assert [o.output_tokens for o in streamed] == sorted(o.output_tokens for o in streamed)
    # without stream: the first token and the end only, no deltas, the same deterministic text
    assert len(plain) == 2 and all(o.text_delta is None for o in plain)
    assert plain[-1].text == final.text and len(final.text.split()) == 64


async def test_vllm_is_asked_for_the_final_output_only_unless_the_request_streams():
    backend = StandinBackend(step_s=0.001)
    engine = VllmEngine("tiny-llama-1b", max_model_len=512, skip_tokenizer_init=False, backend=backend)
    await engine.start()
    ids = list(range(10, 42))
    t0 = time.time()
    plain = [o async for o in engine.stream(EngineRequest("p", 32, 12, prompt_token_ids=ids, ignore_eos=True))]
    assert backend.engine.received[-1][1].output_kind == RequestOutputKind.FINAL_ONLY
    assert len(plain) == 1 and plain[0].finished and plain[0].output_tokens == 12
    assert plain[0].text is not None and plain[0].text_delta is None
    assert t0 < plain[0].first_token_at < time.time()  # from vLLM's per-request metrics
    streamed = [o async for o in engine.stream(EngineRequest("s", 32, 12, prompt_token_ids=ids, ignore_eos=True,
                                                             stream=True))]
    assert backend.engine.received[-1][1].output_kind == RequestOutputKind.DELTA
    assert len(streamed) == 12 and all(o.text_delta for o in streamed)
    final = streamed[-1]
    assert "".join(o.text_delta or "" for o in streamed) == final.text
    assert final.token_ids is not None and len(final.token_ids) == 12 and final.output_tokens == 12
    assert [o.output_tokens for o in streamed] == list(range(1, 13))


async def test_vllm_without_per_request_metrics_times_first_tokens_from_delta_outputs():
    backend = StandinBackend(step_s=0.001)
    engine = VllmEngine("tiny-llama-1b", max_model_len=512, backend=backend)
    await engine.start()
    backend.engine.per_request_metrics = False
    request = EngineRequest("a", 8, 6, prompt_token_ids=list(range(10, 18)), ignore_eos=True)
    first = await engine.generate(request)
    assert first.first_token_at is None  # a FINAL_ONLY output without metrics cannot say
    second = await engine.generate(EngineRequest("b", 8, 6, prompt_token_ids=list(range(10, 18)), ignore_eos=True))
    assert backend.engine.received[-1][1].output_kind == RequestOutputKind.DELTA
    assert second.first_token_at is not None and second.output_tokens == len(second.token_ids) == 6


# --- on a real cluster ------------------------------------------------------------------------------

END_TTL_S = 2


def tokens_keys(conn: redis.Redis, prefix: str) -> list[str]:
    pattern = Keys(prefix).tokens("*").replace("{", "\\{").replace("}", "\\}")
    return list(conn.scan_iter(match=pattern, count=1000))


def stream_memory(conn: redis.Redis, prefix: str) -> tuple[int, int]:
    """Return the token streams under ``prefix`` and their bytes (MEMORY USAGE), not the server's total."""
    keys = tokens_keys(conn, prefix)
    return len(keys), sum(conn.memory_usage(key) or 0 for key in keys)


@pytest.fixture(scope="module")
def cluster_prefix(redis_url: str) -> Iterator[str]:
    prefix = f"{{ts{os.getpid()}{int(time.time() * 1000) % 100000}}}:"
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1)], key_prefix=prefix, time_scale=5.0,
                           extra_env={"DIO_TOKEN_STREAM_END_TTL_S": str(END_TTL_S)})
    running.start()
    yield prefix
    running.stop()
    from dio.protocol.connection import delete_keys

    conn = redis.Redis.from_url(redis_url)
    delete_keys(conn, Keys(prefix))
    conn.close()


@pytest.fixture
def dio(redis_url: str, cluster_prefix: str) -> Iterator[Client]:
    with Client(ClientSettings(redis_url=redis_url, key_prefix=cluster_prefix, poll_interval_s=0.2)) as client:
        yield client


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


@pytest.mark.integration
def test_sync_stream_text_equals_the_final_text_and_arrives_before_it(dio, raw, cluster_prefix):
    handle = dio.submit("hello", max_tokens=80, stream=True)
    stream = handle.stream(timeout=30)
    events = list(stream)
    result = events[-1].result
    assert result is not None and result.status is JobStatus.completed and result.output_tokens == 80
    assert "".join(e.text for e in events) == result.text and len(result.text.split()) == 80
    assert len(events) > 5 and not any(e.restarted for e in events)
    counts = [e.output_tokens for e in events]
    assert counts == sorted(counts) and counts[-1] == 80
    assert stream.ttft_s is not None and stream.first_token_at < events[-1].received_at
    assert not raw.exists(Keys(cluster_prefix).tokens(handle.id))  # read to the end: deleted at once


@pytest.mark.integration
def test_async_stream_text_equals_the_final_text(redis_url, cluster_prefix):
    async def run() -> list[StreamEvent]:
        settings = ClientSettings(redis_url=redis_url, key_prefix=cluster_prefix, poll_interval_s=0.2)
        async with AsyncClient(settings) as client:
            handles = [await client.submit(f"q{i}", max_tokens=40, stream=True) for i in range(3)]

            async def collect(h) -> list[StreamEvent]:
                return [event async for event in h.stream(timeout=30)]

            return await asyncio.gather(*(collect(h) for h in handles))

    for events in asyncio.run(run()):
        result = events[-1].result
        assert result.status is JobStatus.completed and len(events) > 3
        assert "".join(e.text for e in events) == result.text


@pytest.mark.integration
def test_many_concurrent_streams_share_the_clients_one_reader_connection(redis_url, cluster_prefix):
    async def run() -> tuple[list[list[StreamEvent]], int]:
        settings = ClientSettings(redis_url=redis_url, key_prefix=cluster_prefix, poll_interval_s=0.2)
        async with AsyncClient(settings) as client:
            handles = await client.submit_many([{"prompt": f"c{i}", "max_tokens": 30, "stream": True}
                                                for i in range(300)])
            name = f"dio-client:{client.client_id}"
            async def collect(h) -> list[StreamEvent]:
                return [event async for event in h.stream(timeout=60)]

            collected = asyncio.gather(*(collect(h) for h in handles))
            peak = 0
            while not collected.done():  # this client's connections while its 300 streams are open
                peak = max(peak, sum(1 for c in await client.redis.client_list() if c["name"] == name))
                await asyncio.sleep(0.02)
            return list(await collected), peak

    streams, connections = asyncio.run(run())
    assert all(events[-1].result.status is JobStatus.completed for events in streams)
    assert all("".join(e.text for e in events) == events[-1].result.text for events in streams)
    assert sum(len(events) for events in streams) > 3 * len(streams)  # streamed in steps, not in one piece
    assert connections <= 5  # not one per stream (redis-py's async pool would refuse past 100)


@pytest.mark.integration
def test_cancel_mid_stream_ends_the_stream_with_a_cancelled_result(dio):
    handle = dio.submit("long", max_tokens=5000, stream=True)
    seen: list[StreamEvent] = []
    cancelled_at = None
    for event in handle.stream(timeout=30):
        seen.append(event)
        if len(seen) == 3:
            assert handle.cancel()
            cancelled_at = time.monotonic()
    assert seen[-1].result.status is JobStatus.cancelled
    assert time.monotonic() - cancelled_at < 1.0  # ended by the cancel, not by the answer's end
    assert seen[-2].output_tokens < 5000


@pytest.mark.integration
def test_a_request_that_does_not_stream_creates_no_token_stream(dio, raw, cluster_prefix):
    handle = dio.submit("plain", max_tokens=200)
    key = Keys(cluster_prefix).tokens(handle.id)
    seen = []
    while not handle.done():
        seen.append(raw.exists(key))
        time.sleep(0.005)
    assert handle.result(timeout=10).output_tokens == 200
    assert len(seen) > 10 and not any(seen) and not raw.exists(key)
    # handle.stream() of it still works: one event, the whole text
    (event,) = list(handle.stream(timeout=5))
    assert event.text == event.result.text and event.result.status is JobStatus.completed


@pytest.mark.integration
def test_dio_submit_stream_prints_the_answer_as_it_comes(redis_url, cluster_prefix):
    from typer.testing import CliRunner

    from dio.ops.cli import app

    env = {"DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": cluster_prefix}
    result = CliRunner().invoke(app, ["submit", "hello", "--stream", "--max-tokens", "12"], env=env)
    assert result.exit_code == 0, result.output
    text, status = result.stdout.splitlines()[:2]
    assert len(text.split()) == 12 and status.startswith("completed on L4-1")
    assert "first token after" in result.stderr


@pytest.mark.integration
def test_stream_memory_returns_to_baseline_after_1000_streamed_requests(dio, raw, cluster_prefix):
    # Streams left by the tests before (a cancelled job's last deltas, written after its reader left) expire.
    wait_for(lambda: stream_memory(raw, cluster_prefix) == (0, 0), END_TTL_S + 2.0, "earlier streams to expire")
    baseline = stream_memory(raw, cluster_prefix)
    handles = dio.submit_many([{"prompt": f"m{i}", "max_tokens": 8, "stream": True} for i in range(1000)])
    read = handles[:50]  # these are read (and so deleted by their reader); the rest nobody reads
    texts: dict[str, list[StreamEvent]] = {}
    threads = [threading.Thread(target=lambda h=h: texts.__setitem__(h.id, list(h.stream(timeout=60))))
               for h in read]
    for thread in threads:
        thread.start()
    peak, ttls = (0, 0), []
    while not all(h.future.done() for h in handles):
        peak = max(peak, stream_memory(raw, cluster_prefix))
        ttls += [raw.pttl(key) for key in tokens_keys(raw, cluster_prefix)[:20]]
        time.sleep(0.05)
    results = dio.wait_all(handles, timeout=60)
    for thread in threads:
        thread.join(30)
    assert all(r.status is JobStatus.completed for r in results)
    assert len(texts) == 50
    assert all("".join(e.text for e in events) == events[-1].result.text for events in texts.values())
    assert peak[0] > 0 and peak[1] > 0  # the streams were there, in Redis memory
    assert ttls and -1 not in ttls  # each one expiring (-2: it expired between SCAN and PTTL)
    count, _ = stream_memory(raw, cluster_prefix)
    assert count <= len(handles) - len(read)  # the read ones are gone at once
    wait_for(lambda: stream_memory(raw, cluster_prefix) == baseline, END_TTL_S + 2.0, "the streams to expire")


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_killed_mid_stream_restarts_the_answer_on_another(redis_url, redis_prefix):
    fast = {"DIO_HEARTBEAT_TTL_S": "1.0", "DIO_HEARTBEAT_INTERVAL_S": "0.2"}
    running = LocalCluster(redis_url, [WorkerSpec("L4", 1), WorkerSpec("T4", 1)], key_prefix=redis_prefix,
                           time_scale=1.0, extra_env=fast)
    running.start()
    try:
        settings = ClientSettings(redis_url=redis_url, key_prefix=redis_prefix, poll_interval_s=0.2)
        with Client(settings) as dio:
            handle = dio.submit("survive", max_tokens=120, stream=True)
            events: list[StreamEvent] = []
            killed = None
            for event in handle.stream(timeout=60):
                events.append(event)
                if killed is None and sum(len(e.text) for e in events) > 20:
                    killed = dio.get(handle.id).worker
                    victim = running.processes[1 + [w for w in ("L4-1", "T4-1")].index(killed)]
                    os.killpg(victim.pid, signal.SIGKILL)
        result = events[-1].result
        assert result.status is JobStatus.completed and result.worker != killed and result.attempts >= 2
        restarts = [i for i, e in enumerate(events) if e.restarted]
        assert len(restarts) == 1 and "".join(e.text for e in events[:restarts[0]])  # text was shown, then voided
        assert answer(events) == result.text  # never the dead run's text glued to the new one
        assert len(result.text.split()) == 120
    finally:
        running.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_a_stream_rides_out_a_redis_restart_and_stays_consistent(restartable_redis):
    prefix = "{st}:"
    running = LocalCluster(restartable_redis.url, [WorkerSpec("L4", 1)], key_prefix=prefix, time_scale=1.0)
    running.start()
    try:
        settings = ClientSettings(redis_url=restartable_redis.url, key_prefix=prefix, poll_interval_s=0.2)
        with Client(settings) as dio:
            handle = dio.submit("outlast", max_tokens=200, stream=True)
            events: list[StreamEvent] = []
            outage = None
            for event in handle.stream(timeout=60):
                events.append(event)
                if outage is None and event.output_tokens >= 20:
                    outage = restartable_redis.outage(1.0)  # its data kept: a restart, mid-answer
        outage.join(10)
        result = events[-1].result
        assert result.status is JobStatus.completed and result.output_tokens == 200
        assert not any(e.restarted for e in events)  # the same run went on: nothing was taken back
        assert "".join(e.text for e in events) == result.text  # a delta re-sent after the outage is taken once
    finally:
        running.stop()
