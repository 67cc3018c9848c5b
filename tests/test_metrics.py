"""Prometheus metrics: names and labels, the Grafana dashboard, and real scrapes while requests flow.

The integration test runs the dispatcher and two simulated workers as the processes an operator
starts (``dio dispatcher|worker --metrics-port``), scrapes each ``/metrics`` over HTTP before and
after requests flow, and checks that the counters, histograms and gauges moved.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dio.client import Client, JobRejected
from dio.dispatcher.metrics import DispatcherMetrics, reason_class
from dio.gpu_worker.metrics import WorkerMetrics
from dio.ops.gateway.metrics import OTHER, GatewayMetrics
from dio.ops.local_cluster import LocalCluster, WorkerSpec, assign_metrics_ports
from dio.protocol.metrics import metric_names, serve_metrics
from dio.protocol.retry import Outage
from tests.waiting import wait_for

DASHBOARD = Path(__file__).resolve().parents[1] / "ops" / "grafana" / "dio-dashboard.json"
METRIC = re.compile(r"\bdio_[a-z0-9_]+")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def registries() -> list:
    return [DispatcherMetrics().registry, WorkerMetrics().registry, GatewayMetrics().registry]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples named ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and want <= have)


# --- names, labels, the dashboard (no Redis) ------------------------------------------------------

@pytest.mark.parametrize("reason, label", [
    ("overloaded: 100 requests already waiting (DIO_MAX_BACKLOG=100)", "overloaded"),
    ("no capacity before its deadline: no worker has 900 free KV tokens now", "expired"),
    ("cannot finish before its deadline: predicted 900 ms on the best worker, 10 ms left", "predicted_late"),
    ("cannot meet its SLO: predicted TTFT 900 ms and TPOT 40.0 ms on the best worker", "predicted_late"),
    ("too large for every worker: needs 251000 KV tokens", "too_large"),
    ("no worker serves model 'x' (served: llama-3.2-3b)", "unknown_model"),
    ("something new", "other"),  # a reason not classified yet: still one bounded label
    (None, "other"),
])
def test_a_rejection_reason_becomes_one_of_a_few_labels(reason, label):
    assert reason_class(reason) == label


def test_names_follow_prometheus_conventions():
    for registry in registries():
        for family in registry.collect():
            assert family.name.startswith("dio_"), family.name
            if family.type == "histogram":
                assert family.name.endswith("_seconds"), family.name  # every histogram here is a duration
    for name in set().union(*(metric_names(r) for r in registries())):
        assert not re.search(r"_(ms|milliseconds|percent)\b", name), f"{name}: not a base unit"


def test_the_grafana_dashboard_loads_and_graphs_only_existing_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set().union(*(metric_names(r) for r in registries()))
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    graphed = set()
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            names = set(METRIC.findall(target["expr"]))
            assert names, target["expr"]
            assert names <= exported, f"{panel['title']}: {sorted(names - exported)} are not exported"
            graphed |= names
    # Each process kind has panels: dispatcher, workers, gateway.
    assert {n.split("_")[1] for n in graphed} == {"dispatcher", "worker", "gateway"}


def test_reconnects_are_the_outages_the_process_rode_out():
    metrics = DispatcherMetrics()
    outage = Outage(logging.getLogger("test"), "test", rng=lambda: 0.0)
    metrics.watch(outage)
    outage.failed(ConnectionError("refused"))
    outage.failed(ConnectionError("refused"))
    outage.ok()
    sample = metrics.registry.get_sample_value
    assert sample("dio_dispatcher_redis_reconnects_total") == 1
    assert sample("dio_dispatcher_redis_errors_total") == 2


def test_gateway_labels_stay_bounded_whatever_clients_send():
    metrics = GatewayMetrics()
    for i in range(200):
        metrics.request_started(f"/v1/nope-{i}")
        metrics.request_finished(f"/v1/nope-{i}", 404, 0.001)
    endpoints = {s.labels["endpoint"] for f in metrics.registry.collect() if f.name == "dio_gateway_requests"
                 for s in f.samples}
    assert len(endpoints) == 65 and OTHER in endpoints
    assert metrics.registry.get_sample_value("dio_gateway_requests_total", {"endpoint": OTHER, "status": "404"}) == 136
    assert metrics.registry.get_sample_value("dio_gateway_requests_in_progress") == 0


def test_a_taken_metrics_port_is_one_error_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "dio.ops.cli", "dispatcher", "--metrics-port", str(port)],
                              capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}" in done.stderr and "Traceback" not in done.stderr


def test_port_zero_serves_on_a_free_port():
    metrics = WorkerMetrics()
    endpoint = serve_metrics(metrics.registry, 0)
    try:
        assert ("dio_worker_redis_reconnects_total", frozenset()) not in scrape(endpoint.port)  # no worker yet
        assert endpoint.port > 0
    finally:
        endpoint.close()


# --- real processes, real scrapes -----------------------------------------------------------------

@pytest.fixture
def cluster(redis_url: str, redis_prefix: str):
    running = LocalCluster(redis_url, [WorkerSpec("H100", 1), WorkerSpec("T4", 1)], key_prefix=redis_prefix,
                           time_scale=5.0, gateway_port=0)
    running.metrics_ports = assign_metrics_ports(running.child_names())
    running.start()
    yield running
    running.stop()


def _chat(gateway_url: str, n: int) -> None:
    """Send ``n`` chat completions through the gateway, as an OpenAI client would."""
    body = json.dumps({"model": "llama-3.2-3b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
    for _ in range(n):
        request = urllib.request.Request(f"{gateway_url}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 200


def _gateway_metrics(gateway_url: str) -> Samples:
    text = urllib.request.urlopen(f"{gateway_url}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _flow(client: Client, n: int) -> None:
    handles = client.submit_many([{"prompt": "x", "num_prompt_tokens": 400, "max_tokens": 64} for _ in range(n)])
    results = client.wait_all(handles, timeout=60)
    assert {r.status.value for r in results} == {"completed"}


@pytest.mark.integration
@pytest.mark.slow
def test_every_endpoint_shows_dio_metrics_that_move_as_requests_flow(cluster, redis_url, redis_prefix):
    ports = cluster.metrics_ports
    assert set(ports) == {"dispatcher", "H100-1", "T4-1"}
    workers = [name for name in ports if name != "dispatcher"]
    with Client(redis_url=redis_url, key_prefix=redis_prefix) as dio:
        _flow(dio, 20)
        wait_for(lambda: total(scrape(ports["dispatcher"]), "dio_dispatcher_completions_total") >= 20, 10,
                 "the dispatcher to learn the first completions")
        _chat(cluster.gateway_url, 2)
        first = {name: scrape(port) for name, port in ports.items()}
        gateway_first = _gateway_metrics(cluster.gateway_url)
        # While a burst runs, the live gauges show it (read by the dispatcher each second, by workers each beat).
        handles = dio.submit_many([{"prompt": "x", "num_prompt_tokens": 400, "max_tokens": 2000} for _ in range(60)])
        wait_for(lambda: total(scrape(ports["dispatcher"]), "dio_dispatcher_outstanding_jobs") > 0, 10,
                 "jobs outstanding in the dispatcher's gauges")
        wait_for(lambda: sum(total(scrape(ports[w]), "dio_worker_running_sequences") for w in workers) > 0, 10,
                 "running sequences in a worker's gauges")
        assert {r.status.value for r in dio.wait_all(handles, timeout=60)} == {"completed"}
        with pytest.raises(JobRejected):
            dio.submit("x", num_prompt_tokens=250_000, max_tokens=1000).result(timeout=30)
        _flow(dio, 17)
        _chat(cluster.gateway_url, 3)
        wait_for(lambda: total(scrape(ports["dispatcher"]), "dio_dispatcher_completions_total") >= 102, 10,
                 "the dispatcher to learn every completion")
    second = {name: scrape(port) for name, port in ports.items()}
    gateway_second = _gateway_metrics(cluster.gateway_url)

    d0, d1 = first["dispatcher"], second["dispatcher"]
    moved = {"dio_dispatcher_requests_total": 80, "dio_dispatcher_routing_decisions_total": 80,
             "dio_dispatcher_decision_seconds_count": 80, "dio_dispatcher_completions_total": 80,
             "dio_dispatcher_predictor_error_seconds_count": 80}
    for name, at_least in moved.items():
        assert total(d1, name) - total(d0, name) >= at_least, name
    assert total(d1, "dio_dispatcher_requests_total", outcome="rejected", reason="too_large") == 1
    for target in ("e2e", "ttft", "tpot"):
        assert total(d1, "dio_dispatcher_predictor_error_seconds_count", target=target) > 0, target
    assert total(d1, "dio_dispatcher_workers", state="alive") == 2
    assert total(d1, "dio_dispatcher_active") == 1

    jobs = {w: total(second[w], "dio_worker_jobs_total") - total(first[w], "dio_worker_jobs_total") for w in workers}
    assert sum(jobs.values()) == 80, jobs  # 60 + 17 + 3 through the gateway
    for w in workers:
        if not jobs[w]:
            continue  # the router may leave the T4 idle: nothing of it has to move
        for name in ("dio_worker_ttft_seconds_count", "dio_worker_tpot_seconds_count", "dio_worker_e2e_seconds_count",
                     "dio_worker_tokens_total"):
            assert total(second[w], name) > total(first[w], name), (w, name)
        assert total(second[w], "dio_worker_kv_capacity_tokens") > 0
        assert total(second[w], "dio_worker_info", worker=w) == 1

    chat = {"endpoint": "/v1/chat/completions"}
    assert total(gateway_second, "dio_gateway_requests_total", status="200", **chat) == 5
    assert total(gateway_second, "dio_gateway_requests_total", status="200", **chat) - \
        total(gateway_first, "dio_gateway_requests_total", status="200", **chat) == 3
    assert total(gateway_second, "dio_gateway_request_seconds_count", **chat) == 5
    assert total(gateway_second, "dio_gateway_jobs_submitted_total", **chat) == 5
    assert total(gateway_second, "dio_gateway_tokens_total", kind="completion", **chat) == 5 * 8
