"""Build and run the gRPC server.

`create_server(config)` loads the bundles, wires the servicers, interceptors, health,
reflection and metrics, binds the port and returns (App, port) without starting the loop's
wait — tests use it on 127.0.0.1:0. `serve(config)` runs until SIGTERM/SIGINT, then drains:
health goes NOT_SERVING, in-flight calls get `grace_s` to finish, running jobs are recorded
as interrupted.

With `config.health_port` set, a second plaintext grpc.aio server serves only grpc.health.v1
from the same HealthServicer (so both ports always report the same status): kubelet gRPC
probes cannot speak TLS. It stays up while the main server drains, so probes see NOT_SERVING,
and stops last.

With `config.http_port` set, the HTTP/JSON gateway (rpc/http_gateway.py) listens there and
calls this same server over a private Unix socket that the server also binds; it stops after
the gRPC server drained (new HTTP calls meanwhile get 503 UNAVAILABLE).

Hot reload: with `config.watch_interval_s` > 0 a task rescans the bundle root every interval
(service/registry.ModelRegistry.refresh, in a thread) and republishes health and the model
gauges after each change. Health names (rpc/health.py): "" (up, not draining),
"pairdots.v1.PairdotsService" (ready: a model is served and no bundle is refused) and
"pairdots.v1.PairdotsService/<model>" per model.

Tracing (telemetry.py): with `config.telemetry.otlp_endpoint`, or a `tracer_provider` passed
in (tests), opentelemetry-instrumentation-grpc's server interceptor runs first and opens a
server span per RPC.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pairdots.v1 import pairdots_pb2, pairdots_pb2_grpc
from pairdots_server import telemetry
from pairdots_server.config import ServerConfig
from pairdots_server.metrics import Metrics
from pairdots_server.rpc.health import SERVICE_NAME, health_statuses
from pairdots_server.rpc.http_gateway import RunningGateway, private_socket, start_gateway
from pairdots_server.rpc.interceptors import AuthInterceptor, ErrorInterceptor, MetricsInterceptor
from pairdots_server.rpc.job_kinds import JOB_KINDS
from pairdots_server.rpc.job_metrics import JobMetricsListener
from pairdots_server.rpc.operations import add_operations_servicer
from pairdots_server.rpc.servicer import PairdotsServicer
from pairdots_server.service.facade import PairdotsService
from pairdots_server.service.jobs.queue import JobQueue
from pairdots_server.service.jobs.runner import JobRunner, JobService, process_owner
from pairdots_server.service.jobs.store import JobStore
from pairdots_server.service.registry import ModelRegistry, model_id

log = logging.getLogger("pairdots.server")

__all__ = ["SERVICE_NAME", "App", "create_server", "serve"]


@dataclass
class App:
    server: grpc.aio.Server
    service: PairdotsService
    health: health.aio.HealthServicer
    metrics: Metrics
    jobs: JobService
    store: JobStore
    port: int
    config: ServerConfig
    health_server: grpc.aio.Server | None = None  # plaintext health-only listener
    health_port: int | None = None
    http: RunningGateway | None = None  # the HTTP/JSON listener
    _stopped: bool = field(default=False)
    _serving: bool = field(default=False)
    _reported: set[str] = field(default_factory=set)  # per-model health names ever set
    _watch_task: asyncio.Task[None] | None = field(default=None)

    @property
    def registry(self) -> ModelRegistry:
        return self.service.registry

    async def set_serving(self, serving: bool) -> None:
        """SERVING (up) or NOT_SERVING (starting, draining); the readiness and per-model
        names follow the registry (rpc/health.py)."""
        self._serving = serving
        await self.publish_health()

    async def publish_health(self) -> None:
        """Set every health name from the registry's current state, and the model gauges."""
        statuses = health_statuses(self._serving, self.registry.names(),
                                   self.registry.refused_names(), self._reported)
        for name, status in statuses.items():
            await self.health.set(name, status)
        self._reported |= {n for n in statuses if n.startswith(SERVICE_NAME + "/")}
        self.metrics.set_models(len(self.registry.names()), len(self.registry.errors))

    async def reload(self) -> bool:
        """One rescan of the bundle root (ModelRegistry.refresh); True when it changed
        anything (health and metrics are then republished)."""
        result = await asyncio.to_thread(self.registry.refresh)
        if result.changed:
            self.metrics.observe_reload(len(result.added), len(result.replaced),
                                        len(result.removed), len(result.refused))
            await self.publish_health()
        return result.changed

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("bundle root scan failed; retrying in %.1f s", interval_s)

    def start_watching(self, interval_s: float) -> None:
        """Rescan the bundle root every `interval_s` seconds until stop()."""
        if self._watch_task is None and interval_s > 0:
            self._watch_task = asyncio.get_running_loop().create_task(self._watch(interval_s))

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, finish in-flight calls within the grace period, stop jobs."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace_s if grace_s is None else grace_s
        if self._watch_task is not None:
            self._watch_task.cancel()
        await self.set_serving(False)
        await self.server.stop(grace)
        interrupted = await asyncio.to_thread(self.jobs.shutdown, grace)
        if interrupted:
            log.warning("%d running job(s) recorded as interrupted", interrupted)
        if self.http is not None:
            await self.http.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        self.service.close()
        self.store.close()
        self.metrics.stop()


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    key = config.tls_key.read_bytes()
    cert = config.tls_cert.read_bytes()
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


async def _start_health_server(config: ServerConfig, servicer: health.aio.HealthServicer
                               ) -> tuple[grpc.aio.Server, int]:
    """A plaintext server on config.health_port with only grpc.health.v1 (no auth: probes)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{config.host}:{config.health_port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind the health port {address}; is it in use?")
    await server.start()
    return server, port


def make_job_service(config: ServerConfig, store: JobStore) -> JobService:
    """The in-process JobRunner (default) or, with run_jobs False (--no-worker), a JobQueue
    whose jobs `pairdots worker` processes run. An embedded (SQLite) store with an in-process
    runner first marks what a previous process left unfinished as interrupted; a shared store
    (and --no-worker) relies on leases, since other processes may be running those jobs."""
    limits = config.jobs
    if not config.run_jobs:
        return JobQueue(store, JOB_KINDS, max(1, limits.max_queued), limits.poll_s)
    if not store.shared:
        interrupted = store.mark_interrupted_on_startup()
        if interrupted:
            log.warning("%d job(s) from a previous run marked as interrupted", interrupted)
    return JobRunner(store, limits.max_concurrent, limits.max_queued,
                     owner=process_owner("serve"), lease_s=limits.lease_s,
                     poll_s=limits.poll_s)


async def create_server(config: ServerConfig, registry: ModelRegistry | None = None, *,
                        tracer_provider: Any = None) -> tuple[App, int]:
    """Load bundles, build the server, bind and start it; health turns SERVING at the end.

    tracer_provider: an opentelemetry TracerProvider to trace with (installed for the
    process, telemetry.install); else one from config.telemetry when an endpoint is set."""
    if tracer_provider is not None:
        telemetry.install(tracer_provider)
    else:
        tracer_provider = telemetry.configure(config.telemetry)
    if registry is None:
        registry = ModelRegistry(
            config.bundles, device=config.resolve_device(),
            cache_size=config.explain.s_test_cache_size,
            scope_input_max_bytes=config.explain.scope_input_max_bytes,
        )
        await asyncio.to_thread(registry.load_all)
    served = registry  # bound for the label lambda below

    def model_label(request: Any) -> str:
        name = getattr(request, "model", None)
        if name is None and type(request) is pairdots_pb2.GetModelRequest:
            name = request.name
        if not isinstance(name, str):
            return ""
        name = model_id(name)
        return name if name in served.names() else ""

    metrics = Metrics(config.metrics_port)
    interceptors: list[grpc.aio.ServerInterceptor] = [
        MetricsInterceptor(metrics.observe_rpc, model_label)]
    tokens = config.load_tokens()
    if tokens:
        interceptors.insert(0, AuthInterceptor(tokens))
    interceptors.append(ErrorInterceptor())
    if tracer_provider is not None:  # outermost: the server span covers the whole call
        interceptors.insert(0, telemetry.server_interceptor())
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=options)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    metrics.set_models(len(registry.names()), len(registry.errors))
    service = PairdotsService(config, registry, metrics)
    service.pool.on_depth_change = metrics.set_queue_depth
    pairdots_pb2_grpc.add_PairdotsServiceServicer_to_server(PairdotsServicer(service), server)

    store = await asyncio.to_thread(JobStore, config.jobs_db_spec)
    jobs = make_job_service(config, store)
    jobs.add_listener(JobMetricsListener(store, metrics))
    service.jobs = jobs
    add_operations_servicer(server, store, jobs)

    if config.reflection:
        from grpc_reflection.v1alpha import reflection

        reflection.enable_server_reflection(
            (SERVICE_NAME, "google.longrunning.Operations", health.SERVICE_NAME,
             reflection.SERVICE_NAME),
            server,
        )

    address = f"{config.host}:{config.port}"
    creds = _credentials(config)
    port = (server.add_secure_port(address, creds) if creds
            else server.add_insecure_port(address))
    if port == 0:
        raise OSError(f"cannot bind {address}; is the port in use?")
    http_socket = private_socket() if config.http_port is not None else None
    if http_socket is not None and server.add_insecure_port(http_socket[1]) == 0:
        raise OSError(f"cannot bind the gateway's socket {http_socket[1]}")
    await server.start()
    health_server, health_port = None, None
    if config.health_port is not None:
        try:
            health_server, health_port = await _start_health_server(config, health_servicer)
        except BaseException:
            await server.stop(0)
            raise
        log.info("grpc.health.v1 (plaintext) on %s:%d", config.host, health_port)
    http = None
    if http_socket is not None:
        try:
            http = await start_gateway(config, *http_socket)
        except BaseException:
            await server.stop(0)
            if health_server is not None:
                await health_server.stop(0)
            raise
    app = App(server, service, health_servicer, metrics, jobs, store, port, config,
              health_server, health_port, http)
    await app.set_serving(True)
    app.start_watching(config.watch_interval_s)
    log.info("pairdots listening on %s:%d (%s)", config.host, port, "TLS" if creds else "plaintext")
    return app, port


async def serve(config: ServerConfig) -> None:
    """Run until SIGTERM/SIGINT, then drain within config.grace_s."""
    app, _port = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: draining (grace %.1f s)", config.grace_s)
    await app.stop()
