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
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from pairdots_server import errors, telemetry
from pairdots_server.rpc.status import DOMAIN, is_mapped, to_status

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


async def abort_with_info(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                          message: str, reason: str, **metadata: str) -> None:
    """Abort with `code` and a google.rpc.Status carrying ErrorInfo(reason, domain)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=metadata)
    packed = any_pb2.Any()
    packed.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[packed])
    await context.abort_with_status(rpc_status.to_status(status))


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type."""

    def __init__(self, why: str) -> None:
        self.why = why


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """A request deserializer that hands malformed bytes to the handler as _Undecodable
    (grpc would answer UNKNOWN "Unexpected DecodeError"); the ErrorInterceptor answers it."""
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 (DecodeError and the like)
            return _Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}")

    return deserialize


async def _abort_internal(context: grpc.aio.ServicerContext, method: str) -> None:
    """The one fallback for an exception the error table does not name: INTERNAL with an
    incident id that finds the traceback in the log (never a bare UNKNOWN)."""
    incident = uuid.uuid4().hex[:12]
    log.exception("unexpected error in %s (incident %s)", method, incident)
    await abort_with_info(
        context, grpc.StatusCode.INTERNAL,
        f"internal error (incident {incident}); this is a server bug, "
        "please report it with the incident id", "INTERNAL",
        incident=incident,
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Maps domain errors to their status (rpc/status.py, from the table errors.CODES);
    anything the table does not name becomes INTERNAL with an id to find the logged
    traceback (never a bare UNKNOWN)."""

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        method = details.method

        def wrap(inner: Behaviour) -> Behaviour:
            async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await abort_with_info(
                        context, grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request bytes are not a valid message for {method} "
                        f"({request.why}); send a serialized message of the method's request "
                        "type", "MALFORMED_REQUEST")
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except errors.PairdotsError as exc:
                    if is_mapped(exc):
                        await abort_with(context, exc)
                    else:  # a class the table does not name: the fallback below
                        await _abort_internal(context, method)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 (logged with its traceback by _abort_internal)
                    await _abort_internal(context, method)

            return behaviour

        handler = await continuation(details)
        if handler is not None and handler.unary_unary is not None:
            handler = grpc.unary_unary_rpc_method_handler(
                handler.unary_unary,
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return _wrap(handler, wrap)


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
        headers = [value if isinstance(value, str) else value.decode(errors="replace")
                   for key, value in details.invocation_metadata or ()
                   if key == "authorization"]
        if len(headers) > 1:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         f"{len(headers)} authorization headers: send exactly one "
                         "'authorization: Bearer <token>'", "AMBIGUOUS_CREDENTIALS")
        header = headers[0] if headers else ""
        scheme, _, token = header.partition(" ")
        if not header:
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "missing bearer token: send metadata 'authorization: Bearer <token>'",
                         "MISSING_CREDENTIALS")
        if scheme.lower() != "bearer" or not token.strip():
            return _deny(handler, grpc.StatusCode.UNAUTHENTICATED,
                         "malformed authorization metadata: expected 'Bearer <token>'",
                         "MALFORMED_CREDENTIALS")
        given = token.strip().encode()
        if not any(hmac.compare_digest(given, t) for t in self._tokens):
            return _deny(handler, grpc.StatusCode.PERMISSION_DENIED,
                         "the bearer token is not accepted by this server; use a token from "
                         "the server's --auth-tokens-file", "TOKEN_NOT_ACCEPTED")
        return handler


def _deny(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str,
          reason: str) -> grpc.RpcMethodHandler | None:
    def wrap(_inner: Behaviour) -> Behaviour:
        async def behaviour(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort_with_info(context, code, message, reason)

        return behaviour

    return _wrap(handler, wrap)


class MetricsInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts requests by method, code and model, observes latency, and logs one structured
    line per call: method, status code, duration, request id (taken from `x-request-id`
    metadata or generated, echoed as trailing metadata), the model and the trace id when
    tracing is on. `model_of(request)` names the call's model for the label; it must map
    anything that is not a served model to "" (label values stay bounded)."""

    def __init__(self, observe: Callable[[str, str, float, str], None],
                 model_of: Callable[[Any], str] = lambda _request: "") -> None:
        self._observe = observe
        self._model_of = model_of

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
                    model = _safe_model(self._model_of, request)
                    self._observe(method, code, seconds, model)
                    extra: dict[str, Any] = {"request_id": request_id, "method": method,
                                             "code": code, "seconds": round(seconds, 4),
                                             "model": model}
                    trace_id = telemetry.current_trace_id()
                    if trace_id:
                        extra["trace_id"] = trace_id
                    log.info("rpc %s %s %.4fs request_id=%s%s", method, code, seconds,
                             request_id, f" model={model}" if model else "", extra=extra)

            return behaviour

        return _wrap(await continuation(details), wrap)


def _safe_model(model_of: Callable[[Any], str], request: Any) -> str:
    """The model label of a request; "" for undecodable requests or any lookup failure."""
    if isinstance(request, _Undecodable):
        return ""
    try:
        return model_of(request)
    except Exception:  # noqa: BLE001 (a label must never fail the call)
        return ""
