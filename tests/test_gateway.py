"""``dio gateway`` against a simulated cluster: the ``openai`` package, curl, every error status, disconnects.

A real dispatcher, simulated workers and a batch runner run as processes (``LocalCluster``); the
gateway runs in this process on uvicorn, on a free port. The ``openai`` package talks to it as to
OpenAI (sync, async, streaming, files and batches); curl reads its raw SSE.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from dio.client import Client, ClientSettings
from dio.ops.gateway.hooks import GatewayHooks
from dio.ops.gateway.server import bound_port, make_server
from dio.ops.gateway.settings import GatewaySettings
from dio.ops.local_cluster import LocalCluster, WorkerSpec
from dio.protocol.connection import delete_keys
from dio.protocol.keys import Keys
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

MODEL = "llama-3.2-3b"
TIME_SCALE = 50.0
HI = [{"role": "user", "content": "Say hi"}]


class Reply:
    """An HTTP answer read with the standard library (status, headers, body)."""

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status_code, self.headers, self.content = status, headers, body

    def json(self):
        return json.loads(self.content)


def call(url: str, method: str, path: str, body: object = None, content=None, headers=None) -> Reply:
    """Send one request to ``url`` (http://127.0.0.1:PORT); ``content`` may be an iterable (sent chunked)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    sent = dict(headers or {})
    if body is not None:
        content = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=content, headers=sent, encode_chunked=content is not None and
                     not isinstance(content, bytes))
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


class Recorder(GatewayHooks):
    """Hooks that remember the disconnects and the answered routes the gateway saw."""

    def __init__(self) -> None:
        self.disconnects: list[tuple[str, int]] = []
        self.finished: list[tuple[str, int]] = []

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        self.finished.append((route, status))

    def client_disconnected(self, route: str, jobs_cancelled: int) -> None:
        self.disconnects.append((route, jobs_cancelled))


class RunningGateway:
    """A gateway app on uvicorn in a thread of this process, on a free port."""

    def __init__(self, settings: GatewaySettings, hooks: GatewayHooks | None = None) -> None:
        self.server = make_server(settings.model_copy(update={"gateway_port": 0}), hooks)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 10, "the gateway to listen")
        self.url = f"http://127.0.0.1:{bound_port(self.server)}"

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "x"), max_retries=0, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def prefix(redis_url: str) -> Iterator[str]:
    value = f"{{gw{uuid.uuid4().hex[:8]}}}:"
    yield value
    conn = redis.Redis.from_url(redis_url)
    delete_keys(conn, Keys(value))
    conn.close()


@pytest.fixture(scope="module")
def cluster(redis_url: str, prefix: str) -> Iterator[LocalCluster]:
    running = LocalCluster(redis_url, [WorkerSpec("H100", 1), WorkerSpec("L4", 1)], key_prefix=prefix,
                           time_scale=TIME_SCALE, batch_runner=True)
    running.start()
    yield running
    running.stop()


def gateway_settings(redis_url: str, prefix: str, **extra) -> GatewaySettings:
    return GatewaySettings(redis_url=redis_url, key_prefix=prefix, poll_interval_s=0.2, **extra)


@pytest.fixture(scope="module")
def hooks() -> Recorder:
    return Recorder()


@pytest.fixture(scope="module")
def gateway(cluster: LocalCluster, redis_url: str, prefix: str, hooks: Recorder) -> Iterator[RunningGateway]:
    running = RunningGateway(gateway_settings(redis_url, prefix), hooks)
    yield running
    running.close()


@pytest.fixture
def raw(redis_url: str) -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    yield conn
    conn.close()


# --- the openai package -------------------------------------------------------------------------


def test_openai_completes_and_chat_completes(gateway: RunningGateway):
    client = gateway.openai()
    done = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8)
    assert done.object == "text_completion" and len(done.choices) == 1
    assert done.choices[0].text.strip() and done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_completion_tokens=6, seed=3)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content.strip() and chat.usage.completion_tokens == 6
    assert chat.id.startswith("chatcmpl-")
    default = client.completions.create(model=MODEL, prompt="no max_tokens")  # DIO_MAX_TOKENS applies
    assert default.usage.completion_tokens == 256 and default.choices[0].finish_reason == "length"


def test_openai_n_choices_and_prompt_lists(gateway: RunningGateway):
    done = gateway.openai().completions.create(model=MODEL, prompt=["a", [11, 12, 13]], n=2, max_tokens=4)
    assert sorted(c.index for c in done.choices) == [0, 1, 2, 3]
    assert all(c.text.strip() for c in done.choices) and done.usage.completion_tokens == 16


def test_dio_fields_pass_as_extra_body(gateway: RunningGateway):
    chat = gateway.openai().chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4,
        extra_body={"tier": "batch", "deadline_ms": 60_000, "sheddable": False, "ttft_slo_ms": 30_000})
    assert chat.usage.completion_tokens == 4


def test_async_openai_fans_out(gateway: RunningGateway):
    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0) as client:
            calls = [client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": f"q{i}"}],
                                                    max_tokens=4) for i in range(20)]
            return await asyncio.gather(*calls)

    answers = asyncio.run(main())
    assert len({a.id for a in answers}) == 20
    assert all(a.choices[0].message.content and a.usage.completion_tokens == 4 for a in answers)


def test_openai_streams_chat_with_a_final_usage_chunk(gateway: RunningGateway):
    chunks = list(gateway.openai().chat.completions.create(model=MODEL, messages=HI, max_tokens=12, stream=True,
                                                           stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 1 and text.strip()
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_async_openai_streams_completions_of_n_choices(gateway: RunningGateway):
    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0) as client:
            stream = await client.completions.create(model=MODEL, prompt="x", n=3, max_tokens=5, stream=True)
            return [chunk async for chunk in stream]

    chunks = asyncio.run(main())
    assert all(c.object == "text_completion" for c in chunks)
    ended = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert ended == {0: "length", 1: "length", 2: "length"}


def test_a_stop_sequence_ends_the_answer_before_it(gateway: RunningGateway, raw: redis.Redis, prefix: str):
    client = gateway.openai()
    stops = [" the", " of", " and", " to"]  # 4 of the simulated model's 64 words: one comes within 200 tokens
    cut = client.completions.create(model=MODEL, prompt="x", max_tokens=200, stop=stops).choices[0]
    assert cut.finish_reason == "stop" and not any(s in cut.text for s in stops)
    assert len(cut.text.split()) < 200
    raw_stream = client.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=2000, stop=stops,
                                                             stream=True, extra_body={"ignore_eos": True})
    job_id = raw_stream.headers["x-dio-job-ids"]
    chunks = list(raw_stream.parse())
    text = "".join(c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and not any(s in text for s in stops)
    # The job is cancelled at the stop sequence: the worker stops generating its 2000 tokens.
    wait_for(lambda: raw.hget(Keys(prefix).job(job_id), "status") in ("cancelled", "completed"), 10, "the job's end")
    assert raw.hget(Keys(prefix).job(job_id), "status") == "cancelled"


def test_models_health_and_ready(gateway: RunningGateway):
    models = gateway.openai().models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "dio"
    assert gateway.openai().models.retrieve(MODEL).id == MODEL
    assert call(gateway.url, "GET", "/health").json() == {"status": "ok"}
    ready = call(gateway.url, "GET", "/ready")
    assert ready.status_code == 200 and ready.json()["models"] == [MODEL]


# --- curl ---------------------------------------------------------------------------------------


def curl(url: str, body: dict, *extra: str) -> tuple[str, bytes]:
    """POST with curl; return (response headers, raw body)."""
    done = subprocess.run(["curl", "-sN", "-D", "-", "-o", "/dev/stderr", "-H", "content-type: application/json",
                           "-d", json.dumps(body), *extra, url], capture_output=True, timeout=30, check=True)
    return done.stdout.decode(), done.stderr


def test_curl_sees_openais_sse_framing(gateway: RunningGateway):
    headers, body = curl(f"{gateway.url}/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 10,
                                                           "stream": True, "stream_options": {"include_usage": True}})
    assert headers.startswith("HTTP/1.1 200") and "content-type: text/event-stream" in headers.lower()
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = body.split(b"\n\n")[:-1]
    assert all(e.startswith(b"data: ") and b"\n" not in e for e in events)  # one data line per event
    payloads = [json.loads(e[len(b"data: "):]) for e in events[:-1]]
    assert all(p["object"] == "text_completion" for p in payloads)
    assert payloads[-1]["usage"]["completion_tokens"] == 10 and payloads[-1]["choices"] == []
    assert "".join(c["text"] for p in payloads for c in p["choices"]).strip()


def test_curl_plain_completion(gateway: RunningGateway):
    headers, body = curl(f"{gateway.url}/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 3})
    answer = json.loads(body)
    assert "content-type: application/json" in headers.lower() and "x-dio-job-ids:" in headers.lower()
    assert answer["choices"][0]["message"]["content"] and answer["usage"]["completion_tokens"] == 3


# --- errors -------------------------------------------------------------------------------------


def error_of(response: Reply) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_400_bad_input(gateway: RunningGateway):
    client = gateway.openai()
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=5)
    assert info.value.status_code == 400 and "temperature" in info.value.message
    bad_json = call(gateway.url, "POST", "/v1/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in error_of(bad_json)["message"]
    no_model = call(gateway.url, "POST", "/v1/completions", {"prompt": "x"})
    assert no_model.status_code == 400 and error_of(no_model)["param"] == "model"
    no_route = call(gateway.url, "GET", "/v1/nothing")
    assert no_route.status_code == 404 and error_of(no_route)["code"] == "unknown_url"


def test_401_without_a_valid_api_key(cluster: LocalCluster, redis_url: str, prefix: str):
    secured = RunningGateway(gateway_settings(redis_url, prefix, api_keys="k-one,k-two"))
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            secured.openai(api_key="wrong").models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert call(secured.url, "POST", "/v1/files").status_code == 401  # every /v1 route
        assert secured.openai(api_key="k-two").chat.completions.create(model=MODEL, messages=HI, max_tokens=2)
        assert call(secured.url, "GET", "/health").status_code == 200  # probes need no key
    finally:
        secured.close()


def test_404_unknown_model(gateway: RunningGateway):
    with pytest.raises(openai.NotFoundError) as info:
        gateway.openai().chat.completions.create(model="no-such-model", messages=HI)
    assert info.value.code == "model_not_found" and MODEL in info.value.message


def test_413_too_large(cluster: LocalCluster, gateway: RunningGateway, redis_url: str, prefix: str):
    with pytest.raises(openai.APIStatusError) as info:  # prompt + max_tokens over every worker's context
        gateway.openai().completions.create(model=MODEL, prompt="word " * 100_000, max_tokens=65_536)
    assert info.value.status_code == 413 and info.value.code == "context_length_exceeded"
    assert "too large for every worker" in info.value.message
    small = RunningGateway(gateway_settings(redis_url, prefix, gateway_max_body_bytes=4096))
    try:
        over = call(small.url, "POST", "/v1/completions", {"model": MODEL, "prompt": "x" * 5000})
        assert over.status_code == 413 and error_of(over)["code"] == "request_too_large"
        chunked = call(small.url, "POST", "/v1/completions", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
        assert chunked.status_code == 413  # no Content-Length: counted as it arrives
    finally:
        small.close()


SHED_ATTEMPTS = 5  # on a loaded machine the shed can reach the gateway after the 200 ms deadline (a 504): try again


def test_429_with_retry_after_when_dio_sheds(gateway: RunningGateway):
    body = {"model": MODEL, "messages": HI, "max_tokens": 4000, "deadline_ms": 200, "sheddable": True}
    for _ in range(SHED_ATTEMPTS):
        shed = call(gateway.url, "POST", "/v1/chat/completions", body)
        if shed.status_code != 504:
            break
    assert shed.status_code == 429, shed.content
    assert error_of(shed)["code"] == "shed" and int(shed.headers["retry-after"]) >= 1
    assert int(shed.headers["retry-after-ms"]) > 0
    for attempt in range(SHED_ATTEMPTS):  # the same through the package, also when streaming
        try:
            gateway.openai().chat.completions.create(model=MODEL, messages=HI, max_tokens=4000, stream=True,
                                                     extra_body={"deadline_ms": 200, "sheddable": True})
        except openai.RateLimitError:
            break
        except openai.InternalServerError as late:
            if late.status_code != 504 or attempt == SHED_ATTEMPTS - 1:
                raise
        else:
            pytest.fail("a request DIO sheds was answered")


def test_503_when_no_live_worker_serves_the_model(redis_url: str, redis_prefix: str):
    conn = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = Keys(redis_prefix)
    idle = RunningGateway(gateway_settings(redis_url, redis_prefix, gateway_models_cache_s=0))
    try:
        with pytest.raises(openai.InternalServerError) as info:  # no worker registered at all
            idle.openai().chat.completions.create(model=MODEL, messages=HI)
        assert info.value.status_code == 503
        conn.sadd(keys.workers, "dead-1")  # registered, its heartbeat gone
        conn.hset(keys.worker("dead-1"), mapping={"model": MODEL, "max_model_len": "4096", "started_at": "1"})
        with pytest.raises(openai.InternalServerError) as info:
            idle.openai().chat.completions.create(model=MODEL, messages=HI)
        assert info.value.status_code == 503 and info.value.code == "model_unavailable"
        assert info.value.response.headers["retry-after"] == "1"
        assert call(idle.url, "GET", "/ready").status_code == 503
        assert idle.openai().models.list().data == []  # only live models are listed
    finally:
        idle.close()
        conn.close()


def jobs_since(conn: redis.Redis, prefix: str, since: float) -> dict[str, dict]:
    """The job hashes under ``prefix`` submitted after ``since``."""
    found = {}
    for key in conn.scan_iter(match=Keys(prefix).job("*").replace("{", "\\{").replace("}", "\\}"), count=1000):
        fields = conn.hgetall(key)
        if float(fields.get("submitted_at", 0)) > since:
            found[key] = fields
    return found


def test_504_past_the_deadline_and_the_job_is_cancelled(gateway: RunningGateway, raw: redis.Redis, prefix: str):
    since = time.time()
    with pytest.raises(openai.APIStatusError) as info:
        gateway.openai().completions.create(model=MODEL, prompt="x", max_tokens=20_000,
                                            extra_body={"deadline_ms": 300, "ignore_eos": True})
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
    jobs = jobs_since(raw, prefix, since)
    assert len(jobs) == 1
    wait_for(lambda: all(j["status"] in ("cancelled", "rejected") for j in jobs_since(raw, prefix, since).values()),
             10, "the job to be cancelled")


# --- a client that goes away cancels its jobs ----------------------------------------------------


def test_a_client_that_disconnects_cancels_its_job(gateway: RunningGateway, raw: redis.Redis, prefix: str,
                                                    hooks: Recorder):
    since = time.time()
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 20_000, "ignore_eos": True}).encode()
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        wait_for(lambda: any(j["status"] == "running" for j in jobs_since(raw, prefix, since).values()), 10,
                 "the job to start")
    wait_for(lambda: [j["status"] for j in jobs_since(raw, prefix, since).values()] == ["cancelled"], 10,
             "the job to be cancelled")
    assert ("/v1/completions", 1) in hooks.disconnects


def test_a_stream_whose_client_disconnects_cancels_its_job(gateway: RunningGateway, raw: redis.Redis,
                                                           prefix: str, hooks: Recorder):
    keys = Keys(prefix)
    port = int(gateway.url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v1/chat/completions", body=json.dumps({
        "model": MODEL, "messages": HI, "max_tokens": 20_000, "ignore_eos": True, "stream": True}),
        headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    job_id = response.getheader("x-dio-job-ids")
    assert response.readline().startswith(b"data: ")
    assert raw.hget(keys.job(job_id), "status") == "running"
    conn.sock.shutdown(socket.SHUT_RDWR)  # the client goes away mid-stream
    conn.close()
    wait_for(lambda: raw.hget(keys.job(job_id), "status") == "cancelled", 10, "the streamed job to be cancelled")
    wait_for(lambda: ("/v1/chat/completions", 1) in hooks.disconnects, 5, "the disconnect to be reported")


# --- batches ------------------------------------------------------------------------------------


def batch_lines(count: int) -> bytes:
    lines = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 4}}
             for i in range(count)]
    # The protocol refuses max_tokens over 65,536: the line is answered in the error file.
    lines.append({"custom_id": "too-many-tokens", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": MODEL, "messages": HI, "max_tokens": 70_000}})
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def custom_ids(jsonl: bytes) -> set[str]:
    return {json.loads(line)["custom_id"] for line in jsonl.splitlines() if line.strip()}


def test_openai_runs_a_batch_with_the_same_custom_ids_as_dio_batch_submit(gateway: RunningGateway, redis_url: str,
                                                                           prefix: str, tmp_path: Path,
                                                                           hooks: Recorder):
    client = gateway.openai()
    data = batch_lines(12)
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.bytes == len(data) and client.files.retrieve(uploaded.id).filename == "requests.jsonl"
    assert client.files.content(uploaded.id).read() == data
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"who": "test"})
    assert batch.status == "validating" and batch.request_counts.total == 13
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", 60, "the batch to complete")
    done = client.batches.retrieve(batch.id)
    assert (done.request_counts.completed, done.request_counts.failed) == (12, 1)
    output = client.files.content(done.output_file_id).read()
    errors = client.files.content(done.error_file_id).read()
    assert all(json.loads(line)["response"]["status_code"] == 200 for line in output.splitlines())
    assert custom_ids(errors) == {"too-many-tokens"}
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]
    assert ("/v1/batches/{batch_id}", 200) in hooks.finished  # hooks see route templates, not ids

    path = tmp_path / "requests.jsonl"
    path.write_bytes(data)
    with Client(ClientSettings(redis_url=redis_url, key_prefix=prefix)) as dio:
        records = dio.submit_batch(path).results(timeout=60)
    assert {r["custom_id"] for r in records} == custom_ids(output) | custom_ids(errors) == custom_ids(data)


def test_batch_errors(gateway: RunningGateway):
    client = gateway.openai()
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("bad.jsonl", b"not json\n"), purpose="batch")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h")
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        client.files.content("file-nope")
    uploaded = client.files.create(file=("one.jsonl", batch_lines(1)), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
    cancelled = client.batches.cancel(batch.id)
    assert cancelled.status in ("cancelling", "cancelled", "completed")


# --- the examples -------------------------------------------------------------------------------

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.mark.parametrize(("example", "expect"), [
    ("submit.py", "completed on"),
    ("fan_out.py", "50 answers"),
    ("stream.py", "tokens, first token after"),
    ("openai_chat.py", "unknown model: 404 model_not_found"),
    ("openai_batch.py", "explain-00:"),
    ("curl.sh", "data: [DONE]"),
])
def test_the_examples_run(gateway: RunningGateway, redis_url: str, prefix: str, example: str, expect: str):
    env = {**os.environ, "DIO_REDIS_URL": redis_url, "DIO_KEY_PREFIX": prefix, "OPENAI_BASE_URL": f"{gateway.url}/v1",
           "GATEWAY": gateway.url}
    command = ["bash"] if example.endswith(".sh") else [sys.executable]
    done = subprocess.run([*command, str(EXAMPLES / example)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert expect in done.stdout, done.stdout
