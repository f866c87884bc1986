"""What grpc.health.v1 reports, derived from the registry (pure: names → statuses).

  ""                                       SERVING while the server is up and not draining
                                           (liveness / startup: a restart fixes nothing else)
  "pairdots.v1.PairdotsService"            SERVING when at least one model is served and no
                                           bundle under the root is refused (readiness)
  "pairdots.v1.PairdotsService/<model>"    SERVING for every served model; NOT_SERVING for a
                                           refused bundle (by its directory name) and for a
                                           model that was unlisted (removed or refused)

Draining turns every name NOT_SERVING.
"""

from __future__ import annotations

from collections.abc import Iterable

from grpc_health.v1 import health_pb2

from pairdots.v1 import pairdots_pb2

SERVICE_NAME = pairdots_pb2.DESCRIPTOR.services_by_name["PairdotsService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def model_service_name(model: str) -> str:
    """The per-model health service name: `pairdots.v1.PairdotsService/<model>`."""
    return f"{SERVICE_NAME}/{model}"


def health_statuses(
    serving: bool, models: Iterable[str], refused: Iterable[str], previously: Iterable[str] = ()
) -> dict[str, int]:
    """{health service name: status} for the server state.

    serving: False while starting or draining; models: served model names; refused: the
    directory names of refused bundles; previously: every per-model name reported before
    (those no longer served turn NOT_SERVING rather than vanish: grpc health cannot unset).
    """
    models = sorted(models)
    refused = sorted(refused)
    ready = serving and bool(models) and not refused
    out: dict[str, int] = {name: NOT_SERVING for name in previously}
    for name in refused:
        out[model_service_name(name)] = NOT_SERVING
    for name in models:
        out[model_service_name(name)] = SERVING if serving else NOT_SERVING
    out[""] = SERVING if serving else NOT_SERVING
    out[SERVICE_NAME] = SERVING if ready else NOT_SERVING
    return out
