"""Prometheus metrics, in a registry per server (several servers can share a process).

Exposed on a separate HTTP port (`--metrics-port`) at /metrics.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Metrics:
    def __init__(self, port: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pairdots_requests", "RPCs by method and status code", ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pairdots_request_seconds", "RPC latency by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pairdots_queue_depth", "model requests running or waiting", registry=self.registry
        )
        self.models = Gauge("pairdots_models", "served models", registry=self.registry)
        self.bad_bundles = Gauge(
            "pairdots_refused_bundles", "bundles refused at load", registry=self.registry
        )
        self._server: Any = None
        self.port: int | None = None
        if port is not None:
            self._server, _thread = start_http_server(port, registry=self.registry)
            self.port = int(self._server.server_port)

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.requests.labels(method, code).inc()
        self.latency.labels(method).observe(seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def set_models(self, good: int, bad: int) -> None:
        self.models.set(good)
        self.bad_bundles.set(bad)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
