"""Prometheus metrics, in a registry per server (several servers can share a process).

Exposed on a separate HTTP port (`--metrics-port`) at /metrics. Every family that concerns a
model carries a `model` label ("" for calls that name none: ListModels, Operations, health).

  pairdots_requests_total{method,code,model}          RPCs by method, status code and model
  pairdots_request_seconds{method,model}              RPC latency (histogram)
  pairdots_queue_seconds{kind,model}                  time from acceptance until the work held
                                                      its model (kind explain: worker pool +
                                                      compute gate; attack/repair: created →
                                                      running)
  pairdots_stage_seconds{stage,model}                 Explain pipeline stage wall time
                                                      (influence/pipeline.Timer's stages)
  pairdots_solver_iterations{solver,model}            iterations of each s_test solve of an
                                                      Explain (0 for the closed-form solvers)
  pairdots_jobs_total{kind,state,model}               Attack/Repair operations entering a state
  pairdots_queue_depth                                model requests running or waiting
  pairdots_models / pairdots_refused_bundles          served models / refused bundles
  pairdots_bundle_reloads_total{result}               bundle root scans' outcomes (added,
                                                      replaced, removed, refused)
  pairdots_gpu_memory_bytes{device,kind}              allocated / reserved CUDA memory, only
                                                      registered when a GPU is visible
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ITERATION_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
RELOAD_RESULTS = ("added", "replaced", "removed", "refused")


class GpuMemoryCollector(Collector):  # type: ignore[misc]
    """torch.cuda.memory_allocated / memory_reserved per visible device, read at scrape time."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        import torch

        fam = GaugeMetricFamily(
            "pairdots_gpu_memory_bytes",
            "CUDA memory held by this process",
            labels=["device", "kind"],
        )
        for i in range(torch.cuda.device_count()):
            fam.add_metric([f"cuda:{i}", "allocated"], float(torch.cuda.memory_allocated(i)))
            fam.add_metric([f"cuda:{i}", "reserved"], float(torch.cuda.memory_reserved(i)))
        yield fam


def _gpu_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 (no torch / broken driver: no GPU family)
        return False


class Metrics:
    def __init__(self, port: int | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "pairdots_requests",
            "RPCs by method, status code and model",
            ["method", "code", "model"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "pairdots_request_seconds",
            "RPC latency by method and model",
            ["method", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "pairdots_queue_seconds",
            "time from acceptance until the work held its model",
            ["kind", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "pairdots_stage_seconds",
            "Explain pipeline stage wall time",
            ["stage", "model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.solver_iterations = Histogram(
            "pairdots_solver_iterations",
            "iterations of each s_test solve",
            ["solver", "model"],
            buckets=ITERATION_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Counter(
            "pairdots_jobs",
            "Attack/Repair operations entering a state",
            ["kind", "state", "model"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "pairdots_queue_depth", "model requests running or waiting", registry=self.registry
        )
        self.models = Gauge("pairdots_models", "served models", registry=self.registry)
        self.bad_bundles = Gauge(
            "pairdots_refused_bundles", "bundles refused at load", registry=self.registry
        )
        self.reloads = Counter(
            "pairdots_bundle_reloads",
            "bundle root scan outcomes",
            ["result"],
            registry=self.registry,
        )
        for result in RELOAD_RESULTS:  # a sample of each from the start
            self.reloads.labels(result)
        self.queue_depth.set(0)
        if _gpu_visible():
            self.registry.register(GpuMemoryCollector())
        self._server: Any = None
        self.port: int | None = None
        if port is not None:
            self._server, _thread = start_http_server(port, registry=self.registry)
            self.port = int(self._server.server_port)

    def observe_rpc(self, method: str, code: str, seconds: float, model: str = "") -> None:
        self.requests.labels(method, code, model).inc()
        self.latency.labels(method, model).observe(seconds)

    def observe_queue(self, kind: str, model: str, seconds: float) -> None:
        self.queue_seconds.labels(kind, model).observe(max(seconds, 0.0))

    def observe_explain(
        self, model: str, timings: Mapping[str, float], solves: Mapping[str, list[int]]
    ) -> None:
        """One Explain answer: its stage timings and the iterations of each solve by solver."""
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage, model).observe(seconds)
        for solver, iterations in solves.items():
            for n in iterations:
                self.solver_iterations.labels(solver, model).observe(n)

    def observe_job(self, kind: str, state: str, model: str) -> None:
        self.jobs.labels(kind, state, model).inc()

    def observe_reload(self, added: int, replaced: int, removed: int, refused: int) -> None:
        for result, n in zip(RELOAD_RESULTS, (added, replaced, removed, refused)):
            if n:
                self.reloads.labels(result).inc(n)

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
