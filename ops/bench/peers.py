"""Peer routers in front of simulated GPUs: the building blocks for benchmarking DIO against them.

- ``start_sim_servers``: the simulated GPUs of a cluster spec, served over HTTP as vLLM servers
  (``dio bench sim-server``), in one or a few processes;
- ``start_peer``: ``vllm-router`` or ``sglang-router`` in front of them, waiting until it routes;
- ``replay_http``: an open-loop asyncio HTTP client that sends each trace request at its arrival
  time, streaming, and records latency, TTFT and errors per request;
- ``prompt_token_ids_for`` / ``prompt_text_for``: deterministic prompts in which trace requests that
  share Mooncake ``hash_ids`` share their leading tokens (and text), so prefix-aware peers see it.

Times: trace arrivals are simulated seconds played at ``time_scale`` simulated seconds per wall
second; the latencies recorded are simulated seconds (wall seconds × time_scale).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dio.gpu_worker.instant import SYNTHETIC_VOCAB
from dio.ops.bench.sim_server import EOS_FIELD, token_text
from dio.ops.local_cluster import parse_workers
from dio.ops.redis_server import free_port
from dio.ops.traces import TraceRequest
from dio.protocol.defaults import PREFIX_BLOCK_TOKENS

PEER_POLICIES: dict[str, tuple[str, ...]] = {
    "vllm-router": ("random", "round_robin", "power_of_two", "cache_aware", "kv_aware", "consistent_hash",
                    "sticky_least_loaded"),
    "sglang-router": ("random", "round_robin", "cache_aware", "power_of_two"),
}
LOAD_FORMAT = {"vllm-router": "vllm-router", "sglang-router": "sglang"}  # the /get_load shape each one reads
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.1
REJECTED_HTTP = (400, 404, 413, 422)
JSON_HEADERS = {"Content-Type": "application/json"}


# --- processes ------------------------------------------------------------------------------------


def _http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """Return the HTTP status of GET ``url``, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def _get_json(url: str, timeout_s: float = 2.0) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _spawn(args: list[str], log_path: Path | None) -> subprocess.Popen:
    out: Any = subprocess.DEVNULL
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(ready: Any, procs: Sequence[subprocess.Popen], what: str, timeout_s: float) -> None:
    """Poll ``ready()`` until true; raise if a process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited early (code {proc.returncode}): {' '.join(map(str, proc.args))}")
        if ready():
            return
        time.sleep(POLL_S)
    raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")


def stop_processes(procs: Sequence[subprocess.Popen], timeout_s: float = STOP_TIMEOUT_S) -> None:
    """Stop each process (SIGTERM to its group, then SIGKILL); a process listed twice is stopped once."""
    unique = list({proc.pid: proc for proc in procs}.values())
    for proc in unique:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in unique:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cluster_profiles(cluster_spec: str) -> list[str]:
    """Return one GPU profile per GPU of ``H100:1,L4:2`` (in order)."""
    return [spec.profile for spec in parse_workers(cluster_spec) for _ in range(spec.count)]


def start_sim_servers(
    cluster_spec: str,
    model: str,
    time_scale: float,
    base_port: int = 0,
    *,
    processes: int = 1,
    load_format: str = "vllm-router",
    max_num_seqs: int | None = None,
    host: str = "127.0.0.1",
    log_dir: Path | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> list[tuple[str, subprocess.Popen]]:
    """Serve each simulated GPU of ``cluster_spec`` over HTTP (``dio bench sim-server``); return ``(url, process)``.

    Ports are ``base_port``, ``base_port + 1``, ... or, with ``base_port=0`` (the default, immune to
    port races), whatever free ports the OS gives. The GPUs are spread over ``processes`` processes
    (one asyncio loop each serves all its GPUs, so the default 1 keeps CPU use low); a process
    appears once per GPU it serves. Returns, in the spec's order, once every server answers /health.
    """
    profiles = cluster_profiles(cluster_spec)
    groups = np.array_split(np.arange(len(profiles)), max(1, min(processes, len(profiles))))
    with tempfile.TemporaryDirectory(prefix="dio-sim-") as tmp:
        procs: list[tuple[subprocess.Popen, Path, int]] = []
        for n, group in enumerate(groups):
            spec = ",".join(f"{profiles[i]}:1" for i in group)
            port = base_port + int(group[0]) if base_port else 0
            ports_file = Path(tmp) / f"ports-{n}.json"
            args = [sys.executable, "-m", "dio.ops.cli", "bench", "sim-server", "--cluster", spec, "--model", model,
                    "--port", str(port), "--host", host, "--time-scale", str(time_scale),
                    "--load-format", load_format, "--ports-file", str(ports_file)]
            if max_num_seqs is not None:
                args += ["--max-num-seqs", str(max_num_seqs)]
            log_path = None if log_dir is None else log_dir / f"sim-server-{n}.log"
            procs.append((_spawn(args, log_path), ports_file, len(group)))
        try:
            _wait(lambda: all(f.exists() for _, f, _ in procs), [p for p, _, _ in procs], "sim-server", timeout_s)
            out = [(f"http://{host}:{port}", proc) for proc, f, _ in procs for port in json.loads(f.read_text())]
            _wait(lambda: all(_http_status(f"{url}/health") == 200 for url, _ in out),
                  [p for p, _, _ in procs], "sim-server", timeout_s)
        except BaseException:
            stop_processes([p for p, _, _ in procs])
            raise
    return out


def peer_command(name: str, policy: str, worker_urls: Sequence[str], port: int, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = ()) -> list[str]:
    """Return the command line that starts peer ``name`` with ``policy`` in front of ``worker_urls``."""
    if name not in PEER_POLICIES:
        raise ValueError(f"unknown peer {name!r}; choose one of {', '.join(PEER_POLICIES)}")
    if policy not in PEER_POLICIES[name]:
        raise ValueError(f"{name} has no policy {policy!r}; choose one of {', '.join(PEER_POLICIES[name])}")
    if policy == "power_of_two" and len(worker_urls) < 2:
        raise ValueError("power_of_two needs at least 2 workers")
    if name == "vllm-router":
        launcher = [shutil.which("vllm-router", path=str(Path(sys.executable).parent)) or "vllm-router",
                    "--log-level", "warning"]
    else:  # sglang-router logs every request at "info": keep its CPU for routing
        launcher = [sys.executable, "-m", "sglang_router.launch_router", "--log-level", "warn"]
    # Each router exports Prometheus metrics on a port of its own (the default one is shared).
    return [*launcher, "--worker-urls", *worker_urls, "--policy", policy, "--host", host, "--port", str(port),
            "--prometheus-port", str(free_port(host)), *extra_args]


def _routes_to_all(url: str, worker_urls: Sequence[str]) -> bool:
    """Return True when the router answers and lists every worker in its /get_loads."""
    loads = _get_json(f"{url}/get_loads")
    if not isinstance(loads, dict):
        return False
    listed = {w.get("worker", "").rstrip("/") for w in loads.get("workers", []) if isinstance(w, dict)}
    return {u.rstrip("/") for u in worker_urls} <= listed and _http_status(f"{url}/v1/models") == 200


def start_peer(name: str, policy: str, worker_urls: Sequence[str], port: int, *, host: str = "127.0.0.1",
               extra_args: Sequence[str] = (), log_path: Path | None = None,
               timeout_s: float = READY_TIMEOUT_S) -> subprocess.Popen:
    """Start ``vllm-router`` or ``sglang-router`` with ``policy`` in front of ``worker_urls``.

    Returns once the router lists every worker and routes ``/v1/models``. The workers must answer
    ``/get_load`` in the peer's shape: start them with ``load_format=LOAD_FORMAT[name]``.

    Raises:
        ValueError: an unknown peer or policy.
        RuntimeError, TimeoutError: the router exited or did not come up.
    """
    proc = _spawn(peer_command(name, policy, worker_urls, port, host, extra_args), log_path)
    url = f"http://{host}:{port}"
    try:
        _wait(lambda: _routes_to_all(url, worker_urls), [proc], name, timeout_s)
    except BaseException:
        stop_processes([proc])
        raise
    return proc


# --- prompts --------------------------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _block_ids(hash_id: int) -> np.ndarray:
    """Return the token ids of the prompt block named ``hash_id`` (always the same for one id)."""
    rng = np.random.default_rng([hash_id & 0xFFFFFFFFFFFFFFFF, 0x5EED])
    return rng.integers(0, SYNTHETIC_VOCAB, PREFIX_BLOCK_TOKENS, dtype=np.int64)


@lru_cache(maxsize=1)
def _token_texts() -> np.ndarray:
    """Return the text of every synthetic token id (4 characters each) as a numpy string array."""
    return np.array([token_text(t) for t in range(SYNTHETIC_VOCAB)], dtype="<U4")


def _prompt_ids(request: TraceRequest, index: int, seed: int) -> np.ndarray:
    blocks: list[np.ndarray] = []
    covered = 0
    for hash_id in request.prefix_hashes or ():
        if covered >= request.prompt_tokens:
            break
        blocks.append(_block_ids(hash_id))
        covered += PREFIX_BLOCK_TOKENS
    missing = request.prompt_tokens - covered
    if missing > 0:
        rng = np.random.default_rng([index, seed, 0x7A11])
        blocks.append(rng.integers(0, SYNTHETIC_VOCAB, missing, dtype=np.int64))
    return np.concatenate(blocks)[: request.prompt_tokens]


def prompt_token_ids_for(request: TraceRequest, index: int, *, seed: int = 0) -> list[int]:
    """Return the prompt token ids of a trace request, exactly ``prompt_tokens`` long.

    Each Mooncake hash id names a block of 512 ids derived from the id alone, so requests that share
    leading hash ids share leading tokens; whatever the hash ids do not cover comes from the request's
    index and ``seed`` (unique to the request).
    """
    return _prompt_ids(request, index, seed).tolist()


def prompt_text_for(request: TraceRequest, index: int, *, seed: int = 0) -> str:
    """Return a text prompt of the same tokens: 4 characters per token, so the server counts it exactly."""
    texts = _token_texts()[_prompt_ids(request, index, seed)]
    return texts.tobytes().decode("utf-32-le")  # every entry is exactly 4 characters: no padding to strip


def request_body(request: TraceRequest, index: int, model: str, *, prompt_format: str = "text",
                 seed: int = 0, max_tokens: int | None = None) -> dict[str, Any]:
    """Return the /v1/completions body of a trace request (streamed, usage in the last chunk).

    ``max_tokens``: the cap every request carries; the true output length then goes to the
    simulated engine only, as ``dio_eos_tokens`` (``sim_server.EOS_FIELD``), where its model stops.
    None: ``max_tokens`` is the true length itself, with ``ignore_eos`` (the oracle).
    """
    if prompt_format == "text":
        prompt: Any = prompt_text_for(request, index, seed=seed)
    elif prompt_format == "tokens":
        prompt = prompt_token_ids_for(request, index, seed=seed)
    else:
        raise ValueError(f"prompt_format must be 'text' or 'tokens', got {prompt_format!r}")
    body = {"model": model, "prompt": prompt, "max_tokens": request.output_tokens, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if max_tokens is not None:
        body |= {"max_tokens": max_tokens, "ignore_eos": False, EOS_FIELD: max(1, request.output_tokens)}
    return body


# --- the open-loop HTTP client --------------------------------------------------------------------


def _record(request: TraceRequest, status: str, *, latency: float | None = None, ttft: float | None = None,
            output_tokens: int = 0, error: str | None = None, http_status: int | None = None) -> dict[str, Any]:
    return {"arrival": request.arrival_s, "prompt_tokens": request.prompt_tokens, "output_tokens": output_tokens,
            "latency_s": latency, "ttft_s": ttft, "status": status, "error": error, "http_status": http_status}


async def _read_stream(response: Any, started: float, scale: float) -> tuple[float | None, int, str | None]:
    """Read an SSE completion stream; return (TTFT in simulated s, tokens received, error or None)."""
    ttft: float | None = None
    tokens, error, done = 0, None, False
    async for raw in response.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = str(chunk["error"].get("message") if isinstance(chunk["error"], dict) else chunk["error"])
            continue
        if ttft is None and any(c.get("text") for c in chunk.get("choices") or ()):
            ttft = (time.monotonic() - started) * scale
        if chunk.get("usage"):
            tokens = int(chunk["usage"].get("completion_tokens") or 0)
    if error is None and not done:
        error = "the stream ended without [DONE]"
    return ttft, tokens, error


async def _send(session: Any, url: str, request: TraceRequest, body: bytes, scale: float,
                wait_s: float | None = None) -> dict[str, Any]:
    """Send one streamed request (a JSON body) and return its record; "lost" if it outlasts ``wait_s``."""
    import aiohttp

    started = time.monotonic()
    timeout = {} if wait_s is None else {"timeout": aiohttp.ClientTimeout(total=max(wait_s, 0.001))}
    try:
        async with session.post(f"{url}/v1/completions", data=body, headers=JSON_HEADERS, **timeout) as response:
            if response.status != 200:
                text = await response.text()
                status = "rejected" if response.status in REJECTED_HTTP else "failed"
                return _record(request, status, error=_error_message(text), http_status=response.status)
            ttft, tokens, error = await _read_stream(response, started, scale)
    except TimeoutError as exc:  # no answer when the client stopped waiting: lost, as in DIO's replay
        return _record(request, "lost", error=f"{type(exc).__name__}: {exc}")
    except (OSError, ValueError) as exc:  # aiohttp's errors are OSError / ValueError subclasses
        return _record(request, "failed", error=f"{type(exc).__name__}: {exc}")
    latency = (time.monotonic() - started) * scale
    if error is not None:
        return _record(request, "failed", latency=latency, ttft=ttft, output_tokens=tokens, error=error,
                       http_status=200)
    return _record(request, "completed", latency=latency, ttft=ttft, output_tokens=tokens, http_status=200)


def _error_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return text[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]


async def replay_http(url: str, requests: Sequence[TraceRequest], *, model: str, time_scale: float = 1.0,
                      prompt_format: str = "text", timeout_s: float = 1800.0, seed: int = 0,
                      drain_wall_s: float | None = None, max_tokens: int | None = None) -> list[dict[str, Any]]:
    """Send each request to ``url`` at its arrival time (open loop, streamed); return one record each.

    A record: ``arrival`` (simulated s), ``prompt_tokens``, ``output_tokens`` (received),
    ``latency_s`` and ``ttft_s`` (simulated s; None when unknown), ``status`` ("completed", "rejected"
    for HTTP 4xx, "failed" for 5xx, an error in the stream or a broken connection, "lost" for no
    answer in time), ``error`` and ``http_status``. Records come back in the order of ``requests``.
    ``prompt_format`` "text" (default) lets text-based prefix-aware routers see shared prefixes.
    ``drain_wall_s``: stop waiting this many wall seconds after the last arrival (as DIO's replay
    does); None: each request may take ``timeout_s``. ``max_tokens``: every request's cap, the true
    length in ``dio_eos_tokens`` (``request_body``); None: the true length as ``max_tokens``.
    """
    import aiohttp

    bodies = [json.dumps(request_body(r, i, model, prompt_format=prompt_format, seed=seed,
                                      max_tokens=max_tokens)).encode()
              for i, r in enumerate(requests)]
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        loop = asyncio.get_running_loop()
        start = loop.time()
        last = max((r.arrival_s for r in requests), default=0.0) / time_scale
        tasks = []
        for request, body in zip(requests, bodies, strict=True):
            delay = start + request.arrival_s / time_scale - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            wait_s = None if drain_wall_s is None else start + last + drain_wall_s - loop.time()
            tasks.append(asyncio.create_task(_send(session, url.rstrip("/"), request, body, time_scale, wait_s)))
        return list(await asyncio.gather(*tasks))


def as_outcomes(records: Sequence[dict[str, Any]]) -> list[Any]:
    """Convert records to ``dio.ops.openloop.Outcome`` (times in simulated ms), as DIO's replay reports."""
    from dio.ops.openloop import Outcome

    def ms(seconds: float | None) -> float | None:
        return None if seconds is None else seconds * 1000.0

    def done(r: dict[str, Any], key: str) -> float | None:  # as to_outcome: times of completed requests only
        return ms(r[key]) if r["status"] == "completed" else None

    return [Outcome(status=r["status"], worker=r.get("worker"), latency_ms=done(r, "latency_s"),
                    ttft_ms=done(r, "ttft_s"), output_tokens=r["output_tokens"], reason=r["error"]) for r in records]
