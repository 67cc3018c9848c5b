"""Prometheus plumbing every DIO process shares: the ``/metrics`` endpoint and counters read at scrape time.

Each process kind keeps its metrics in its own module (``dio.dispatcher.metrics``,
``dio.gpu_worker.metrics``, the gateway's) and in its own ``CollectorRegistry``, so two services in
one process (tests, ``dio worker --count``) never share a series by accident. A scrape reads values
already in memory; it never does Redis I/O.

Names follow Prometheus's conventions: a ``dio_`` prefix, base units (``_seconds``, ``_bytes``,
``_tokens``, ``_ratio``), ``_total`` on counters, and labels of bounded cardinality (worker ids, GPU
types, statuses, reason classes; never job ids or free text).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

DEFAULT_METRICS_ADDR = "127.0.0.1"  # DIO_METRICS_ADDR=0.0.0.0 lets a Prometheus on another host scrape
# Latencies of requests, from a few ms (a short answer on an idle H100) to long generations.
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time per output token: a few ms on a fast GPU to a few hundred under prefill stalls.
TOKEN_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
# Suffixes a scrape shows for each metric type (``_created`` left out: no panel graphs it).
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
                   "summary": ("_sum", "_count", ""), "info": ("_info",)}


class MetricsPortError(RuntimeError):
    """The metrics endpoint could not listen (the port is taken, or the address is not this host's)."""


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP server (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = DEFAULT_METRICS_ADDR) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://addr:port/metrics`` on a daemon thread (port 0: any free port).

    Raises MetricsPortError with the address when it cannot listen, so a CLI prints one line.
    """
    try:
        server, thread = start_http_server(port, addr, registry)
    except OSError as exc:
        raise MetricsPortError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    return MetricsEndpoint(server, thread)


class SampledCounter(Collector):
    """A counter whose total lives elsewhere (an ``Outage``'s reconnects, an engine's preemptions), read at scrape.

    ``read`` returns (label values, total) pairs; it runs on the HTTP thread, so it must only read
    memory (a snapshot of plain numbers), never do I/O.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 read: Callable[[], Iterable[tuple[Sequence[str], float]]], registry: CollectorRegistry) -> None:
        self.name = name.removesuffix("_total")
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.read = read
        registry.register(self)

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in self.read():
            family.add_metric(list(labels), value)
        yield family


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a scrape of ``registry`` can show (``dio_x_total``, ``dio_y_seconds_bucket``, ...)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
    return names
