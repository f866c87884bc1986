"""Server interceptors: errors → status, bearer-token auth, request metrics and ids.

Each wraps the unary-unary behaviour of every method handler. Order on the server:
request id/logging → auth → metrics → errors (innermost, so metrics see the mapped code).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_status import rpc_status

from pairdots_server import errors
from pairdots_server.rpc.status import to_status

log = logging.getLogger("pairdots.rpc")

Behaviour = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]

# Methods callable without a token: probes and discovery tooling.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _wrap(handler: grpc.RpcMethodHandler | None, wrap: Callable[[Behaviour], Behaviour]
          ) -> grpc.RpcMethodHandler | None:
    """Return `handler` with its unary-unary behaviour wrapped (others pass through)."""
    if handler is None or handler.unary_unary is None:
        return handler
    return grpc.unary_unary_rpc_method_handler(
        wrap(handler.unary_unary),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def abort_with(context: grpc.aio.ServicerContext, exc: errors.PairdotsError) -> None:
    """Abort the call with the rich status of a domain error."""
    await context.abort_with_status(rpc_status.to_status(to_status(exc)))


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps domain errors to their status; anything unexpected becomes INTERNAL with an id
    to find the logged traceback (never a bare UNKNOWN)."""

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = details.method

        def wrap(inner: Behaviour) -> Behaviour:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except errors.PairdotsError as exc:
                    await abort_with(context, exc)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    incident = uuid.uuid4().hex[:12]
                    log.exception("unexpected error in %s (incident %s)", method, incident)
                    await context.abort(
                        grpc.StatusCode.INTERNAL,
                        f"internal error (incident {incident}); this is a server bug, "
                        "please report it with the incident id",
                    )

            return behaviour

        return _wrap(await continuation(details), wrap)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Bearer-token auth: `authorization: Bearer <token>` metadata.

    Missing or malformed header → UNAUTHENTICATED; a well-formed token that is not
    accepted → PERMISSION_DENIED. Health and reflection stay public (Kubernetes probes).
    Tokens are compared in constant time.
    """

    def __init__(self, tokens: Sequence[str]) -> None:
        self._tokens = [t.encode() for t in tokens]

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if details.method.startswith(PUBLIC_PREFIXES):
            return handler
        header = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
        scheme, _, token = header.partition(" ")
        if not header:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "missing bearer token: send metadata 'authorization: Bearer <token>'")
        if scheme.lower() != "bearer" or not token.strip():
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "malformed authorization metadata: expected 'Bearer <token>'")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, t) for t in self._tokens):
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                         "the bearer token is not accepted by this server")
        return handler


def _deny(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str
          ) -> grpc.RpcMethodHandler | None:
    def wrap(_inner: Behaviour) -> Behaviour:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(code, message)

        return behaviour

    return _wrap(handler, wrap)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts requests by method and code, observes latency, logs one line per call with a
    request id (taken from `x-request-id` metadata or generated, echoed as trailing metadata)."""

    def __init__(self, observe: Callable[[str, str, float], None]) -> None:
        self._observe = observe

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = details.method
        request_id = next(
            (str(v) for k, v in details.invocation_metadata or () if k == "x-request-id"),
            uuid.uuid4().hex[:16],
        )

        def wrap(inner: Behaviour) -> Behaviour:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                code = "OK"
                try:
                    return await inner(request, context)
                except asyncio.CancelledError:
                    code = "CANCELLED"
                    raise
                except BaseException:
                    got = context.code()
                    code = got.name if isinstance(got, grpc.StatusCode) else "UNKNOWN"
                    raise
                finally:
                    seconds = time.perf_counter() - start
                    context.set_trailing_metadata((("x-request-id", request_id),))
                    self._observe(method, code, seconds)
                    log.info(
                        "rpc done",
                        extra={"request_id": request_id, "method": method, "code": code,
                               "seconds": round(seconds, 4)},
                    )

            return behaviour

        return _wrap(await continuation(details), wrap)
