"""OpenTelemetry tracing: off by default, spans per Explain pipeline stage when on.

`configure(settings)` builds an SDK TracerProvider exporting over OTLP (gRPC) when
`--otlp-endpoint` is given; `install(provider)` makes any provider the one this module's
spans use (tests install one with an in-memory exporter). Without either, and without the
`telemetry` extra installed, every call here is a no-op costing one attribute lookup.

The spans:
  server span per RPC            opentelemetry-instrumentation-grpc's aio server interceptor
                                 (rpc/app.py), parent of everything below
  pairdots.explain               the Explain computation in its worker thread (attributes:
                                 pairdots.model, pairdots.queue_seconds)
  pairdots.stage.<stage>         one per influence/pipeline.Timer stage (saliency, grad_score,
                                 solve, candidates, exact_scoring, token_influence); stages
                                 timed with Timer.add are recorded afterwards with their
                                 measured start and end
The worker pool runs work in a copy of the caller's contextvars (service/workers.py), so the
stage spans are children of the RPC's server span.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pairdots_server.config import TelemetrySettings

log = logging.getLogger("pairdots.telemetry")

try:  # the `telemetry` extra
    from opentelemetry import trace as _trace
except ImportError:  # pragma: no cover - exercised where the extra is not installed
    _trace = None  # type: ignore[assignment]

TRACER_NAME = "pairdots"
STAGE_PREFIX = "pairdots.stage."


_provider: Any = None  # the installed TracerProvider, or None (the global one is used)


def available() -> bool:
    """Whether opentelemetry (the `telemetry` extra) is importable."""
    return _trace is not None


def install(provider: Any) -> None:
    """Use `provider` (an opentelemetry TracerProvider, or None to go back to the global
    one) for this module's spans."""
    global _provider
    _provider = provider


def installed_provider() -> Any:
    return _provider


def configure(settings: TelemetrySettings) -> Any:
    """An SDK TracerProvider with a batching OTLP/gRPC exporter, installed; None when tracing
    is off. Raises FailedPrecondition when asked for tracing without the `telemetry` extra."""
    if not settings.enabled:
        return None
    if _trace is None:
        from pairdots_server.errors import FailedPrecondition

        raise FailedPrecondition(
            "--otlp-endpoint needs OpenTelemetry: pip install 'pairdots[telemetry]'"
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure)
        )
    )
    install(provider)
    log.info(
        "tracing on: OTLP/gRPC to %s (sample ratio %.3g)",
        settings.otlp_endpoint,
        settings.sample_ratio,
    )
    return provider


def _tracer() -> Any:
    if _trace is None:
        return None
    if _provider is not None:
        return _provider.get_tracer(TRACER_NAME)
    return _trace.get_tracer(TRACER_NAME)


@contextlib.contextmanager
def span(name: str, **attributes: str | float | bool) -> Iterator[Any]:
    """A span around the block (current for the block); yields it (None when off)."""
    tracer = _tracer()
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes or None) as current:
        yield current


def stage_span(stage: str) -> contextlib.AbstractContextManager[Any]:
    """The span of one pipeline stage (influence/pipeline.Timer.stage)."""
    return span(STAGE_PREFIX + stage)


def record_stage(stage: str, seconds: float) -> None:
    """A finished stage span that ended now and lasted `seconds` (Timer.add)."""
    tracer = _tracer()
    if tracer is None:
        return
    end = time.time_ns()
    start = end - int(max(seconds, 0.0) * 1e9)
    tracer.start_span(STAGE_PREFIX + stage, start_time=start).end(end_time=end)


def current_trace_id() -> str:
    """The hex trace id of the current span ("" when none is recording)."""
    if _trace is None:
        return ""
    ctx = _trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def server_interceptor() -> Any:
    """The grpc.aio server interceptor of opentelemetry-instrumentation-grpc (a server span
    per RPC, W3C trace context from the caller's metadata), for the installed provider."""
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return aio_server_interceptor(tracer_provider=_provider)
