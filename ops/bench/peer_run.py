"""One replay run through a peer router (``vllm-router``, ``sglang-router``) on the same simulated GPUs.

The counterpart of ``cluster_run.run_trace`` for ``dio bench replay --peers``: one sim-server per GPU
of the cluster (``dio bench sim-server``, same model and time scale as DIO's runs), the peer router in
front of them, the trace replayed over HTTP open loop (``dio.ops.bench.peers.replay_http``), everything
stopped afterwards. It returns a ``RunRecord`` so that ``summarize_run`` gives the same figures.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from dio.ops.bench.cluster_run import RunRecord
from dio.ops.bench.cpu import CpuMeter
from dio.ops.bench.peers import (
    LOAD_FORMAT,
    PEER_POLICIES,
    as_outcomes,
    cluster_profiles,
    replay_http,
    start_peer,
    start_sim_servers,
    stop_processes,
)
from dio.ops.redis_server import free_port
from dio.ops.traces import Trace

SUCCESS = re.compile(r'^vllm:request_success_total\{[^}]*\}\s+([0-9.eE+-]+)$', re.MULTILINE)
LOAD_POLLS = re.compile(r'^dio_sim:get_load_requests_total\{[^}]*\}\s+([0-9.eE+-]+)$', re.MULTILINE)


def parse_peer(spec: str, gpus: int) -> tuple[str, str]:
    """Return (router, policy) of ``vllm-router:round_robin``; raise ValueError on an unknown one."""
    router, _, policy = spec.partition(":")
    if router not in PEER_POLICIES:
        raise ValueError(f"unknown peer {spec!r}: use ROUTER:POLICY with ROUTER one of {', '.join(PEER_POLICIES)}")
    if policy not in PEER_POLICIES[router]:
        raise ValueError(f"{router} has no policy {policy!r}; choose one of {', '.join(PEER_POLICIES[router])}")
    if policy == "power_of_two" and gpus < 2:
        raise ValueError(f"{spec} needs at least 2 GPUs in --cluster")
    return router, policy


def _served(url: str) -> tuple[int | None, int | None]:
    """Return how many requests the sim-server at ``url`` finished and how often its /get_load was polled."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None, None
    polls = LOAD_POLLS.findall(text)
    return int(sum(float(v) for v in SUCCESS.findall(text))), int(float(polls[0])) if polls else None


def run_peer(spec: str, cluster: str, model: str, trace: Trace, time_scale: float, drain_wall_s: float,
             log_dir: Path | None = None, *, max_tokens: int | None = None,
             seed: int = 0) -> tuple[RunRecord, dict[str, dict[str, Any]]]:
    """Replay ``trace`` through peer ``spec`` in front of the simulated GPUs of ``cluster``.

    ``max_tokens``: every request's cap, its true length to the simulated engine only
    (``peers.request_body``); None: the true length as ``max_tokens`` (``dio bench replay``).
    ``seed``: the prompts' text for what the trace leaves unique to a request.

    Returns the run's record and, per sim-server, its GPU, the requests it finished, their share and
    the /get_load polls it answered (the outcomes carry no worker: the router's choice is read
    from each server's /metrics).
    """
    router, policy = parse_peer(spec, len(cluster_profiles(cluster)))
    began = time.monotonic()
    servers = start_sim_servers(cluster, model, time_scale, load_format=LOAD_FORMAT[router], log_dir=log_dir)
    procs = [proc for _, proc in servers]
    urls = [url for url, _ in servers]
    try:
        port = free_port()
        log = None if log_dir is None else log_dir / f"{router}-{policy}.log"
        procs.append(start_peer(router, policy, urls, port, log_path=log))
        setup_s = time.monotonic() - began
        meter = CpuMeter({"sim_servers": servers[0][1].pid, "router": procs[-1].pid})
        meter.start()
        started = time.monotonic()
        records = asyncio.run(replay_http(f"http://127.0.0.1:{port}", trace, model=model, time_scale=time_scale,
                                          drain_wall_s=drain_wall_s, max_tokens=max_tokens, seed=seed))
        wall_s = time.monotonic() - started
        cpu = meter.stop()
        served = {f"{profile}@{url.rsplit(':', 1)[-1]}": (profile, _served(url))
                  for profile, url in zip(cluster_profiles(cluster), urls, strict=True)}
    finally:
        ending = time.monotonic()
        stop_processes(procs)
    record = RunRecord(as_outcomes(records), wall_s, cpu=cpu,
                       worker_gpus={worker: gpu for worker, (gpu, _) in served.items()})
    record.overhead_s = {"start": round(setup_s, 2), "stop": round(time.monotonic() - ending, 2)}
    total = max(sum(n or 0 for _, (n, _) in served.values()), 1)
    workers = {worker: {"gpu": gpu, "jobs": n, "share": 0.0 if n is None else round(n / total, 4),
                        "load_polls": polls}
               for worker, (gpu, (n, polls)) in served.items()}
    return record, workers
