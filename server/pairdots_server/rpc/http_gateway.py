"""HTTP/JSON endpoint: an ASGI app that transcodes HTTP/JSON to the server's own gRPC methods.

`pairdots serve --http-port N` serves it next to the gRPC port. Each request is matched against
the routes of the `google.api.http` annotations (rpc/http_rules.py), turned into the RPC's
request message with protobuf's JSON mapping (json_format: the JSON body for `body: "*"`,
query parameters otherwise, then the path variables), and sent to the same grpc.aio server
over a private Unix socket (a 0700 directory of its own, plaintext; TLS and mutual TLS apply
on the HTTP port instead). So every HTTP call passes the same interceptors (bearer auth from
the `Authorization` header, metrics, the error mapping), the same servicers and the same
service layer as a gRPC call, and gets the same answer.

Answers: 200 with the response message as proto3 JSON (lowerCamelCase field names, fields at
their default value included, int64 as strings, enums by name). Errors: the HTTP status of the
gRPC code (errors.HTTP_STATUS, from the one error table errors.CODES) with the google.rpc.Status
as JSON — `{"code": 3, "message": ..., "details": [{"@type": ".../google.rpc.ErrorInfo", ...},
{"@type": ".../google.rpc.BadRequest", ...}]}` — and `Retry-After` (seconds) when the status
carries google.rpc.RetryInfo. Requests the gateway itself refuses (no route, wrong method, a
body that is not the request message's JSON, a bad query parameter, a body over the size limit)
get the same shape. The optional `X-Server-Timeout` header (seconds) becomes the call's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shutil
import socket
import tempfile
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import grpc
import uvicorn
from google.protobuf import descriptor, json_format, message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pairdots_server import errors
from pairdots_server.config import ServerConfig
from pairdots_server.rpc.http_rules import Route, api_routes
from pairdots_server.rpc.status import to_status

log = logging.getLogger("pairdots.http")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"
_FORWARDED_HEADERS = ("authorization",)
_TIMEOUT_HEADER = "x-server-timeout"
_MAX_ECHO = 300  # characters of a parser message echoed back

# error_details_pb2 must be imported so json_format can print the Any details it packs.
_DETAIL_TYPES = (
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
)


class _Refused(Exception):
    """A request the gateway refuses before any RPC: its google.rpc.Status."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _refuse(exc: errors.PairdotsError) -> _Refused:
    return _Refused(to_status(exc))


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _field(desc: Any, name: str) -> descriptor.FieldDescriptor | None:
    """A field by its proto name (page_size) or its JSON name (pageSize)."""
    field = desc.fields_by_name.get(name)
    if field is None:
        field = next((f for f in desc.fields if f.json_name == name), None)
    return field


def _set_field(msg: message.Message, path: str, values: list[str], where: str) -> None:
    """Set the (possibly nested, dotted) field `path` of `msg` from string values: the path
    variables and query parameters of AIP-127 (proto or JSON field names). Types follow proto3
    JSON (numbers and enum names as strings, bools as true/false)."""
    *parents, leaf = path.split(".")
    target = msg
    for name in parents:
        field = _field(target.DESCRIPTOR, name)
        if field is None or field.message_type is None or field.is_repeated:
            raise _refuse(
                errors.InvalidArgument.for_field(
                    path, f"{where} {path!r} names no field of {msg.DESCRIPTOR.name}"
                )
            )
        target = getattr(target, field.name)
    field = _field(target.DESCRIPTOR, leaf)
    if field is None or (
        field.message_type is not None
        and field.message_type.full_name != "google.protobuf.Duration"
    ):
        raise _refuse(
            errors.InvalidArgument.for_field(
                path, f"{where} {path!r} names no scalar field of {target.DESCRIPTOR.name}"
            )
        )
    repeated = field.is_repeated
    if not repeated and len(values) > 1:
        raise _refuse(
            errors.InvalidArgument.for_field(
                path, f"{where} {path!r} is given {len(values)} times; it is not repeated"
            )
        )

    def convert(value: str) -> Any:
        if field.type == descriptor.FieldDescriptor.TYPE_BOOL:
            if value not in ("true", "false"):
                raise _refuse(
                    errors.InvalidArgument.for_field(
                        path, f"{where} {path!r} is {_clip(value)!r}; use true or false"
                    )
                )
            return value == "true"
        return value

    converted = [convert(v) for v in values]
    try:
        json_format.ParseDict({field.json_name: converted if repeated else converted[0]}, target)
    except json_format.ParseError as exc:
        raise _refuse(
            errors.InvalidArgument.for_field(path, f"{where} {path!r}: {_clip(str(exc))}")
        ) from None


def build_request(
    route: Route, bound: dict[str, str], query: bytes, body: bytes
) -> message.Message:
    """The RPC request of an HTTP call: body (for body "*") or query parameters, then the
    path variables (they win over the body, as in AIP-127)."""
    request = route.input_type()
    if route.body == "*":
        text = body.strip()
        if text:
            try:
                json_format.Parse(text, request)
            except (json_format.ParseError, UnicodeDecodeError) as exc:
                raise _refuse(
                    errors.InvalidArgument(
                        f"the request body is not a valid {route.input_type.DESCRIPTOR.full_name} "
                        f"in proto3 JSON: {_clip(str(exc))}"
                    )
                ) from None
    params: dict[str, list[str]] = {}
    try:
        pairs = parse_qsl(query.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        raise _refuse(errors.InvalidArgument("the query string is not UTF-8")) from None
    for key, value in pairs:
        params.setdefault(key, []).append(value)
    if params and route.body == "*":
        raise _refuse(
            errors.InvalidArgument(
                f"{route.http_method} {route.template} takes its fields from the JSON body; "
                f"move the query parameter(s) {sorted(params)} into the body"
            )
        )
    for key, values in params.items():
        if key in bound:
            raise _refuse(
                errors.InvalidArgument.for_field(
                    key,
                    f"is bound by the path {route.template}; do not repeat it as a query parameter",
                )
            )
        _set_field(request, key, values, "query parameter")
    for path, value in bound.items():
        _set_field(request, path, [value], "path variable")
    return request


def _status_from_error(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status of a failed call: the server's `grpc-status-details-bin`
    trailer when present (ErrorInfo, BadRequest, RetryInfo), else code and message."""
    trailer: Any = exc.trailing_metadata() or ()
    for key, value in trailer:
        if key == _STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            with contextlib.suppress(Exception):
                status.ParseFromString(value)
                return status
    return status_pb2.Status(code=exc.code().value[0], message=exc.details() or "")


def _retry_after(status: status_pb2.Status) -> str | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return str(max(1, math.ceil(info.retry_delay.ToTimedelta().total_seconds())))
    return None


def _json(msg: message.Message) -> bytes:
    return json_format.MessageToJson(
        msg, always_print_fields_with_no_presence=True, indent=None
    ).encode("utf-8")


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _error_reply(status: status_pb2.Status) -> _Reply:
    headers = [(b"content-type", b"application/json")]
    retry = _retry_after(status)
    if retry is not None:
        headers.append((b"retry-after", retry.encode()))
    return _Reply(errors.http_status(status.code), _json(status), tuple(headers))


class HttpGateway:
    """The ASGI app. `target` is the gRPC address of the server's private Unix socket."""

    def __init__(self, target: str, *, max_body_bytes: int) -> None:
        self.routes = api_routes()
        self.max_body_bytes = max_body_bytes
        self._channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", max_body_bytes),
            ],
        )
        self._calls = {
            r.grpc_path: self._channel.unary_unary(
                r.grpc_path,
                request_serializer=r.input_type.SerializeToString,
                response_deserializer=r.output_type.FromString,
            )
            for r in self.routes
        }

    async def close(self) -> None:
        await self._channel.close(None)

    def route(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        """The route of (method, path) and its bound path variables; NOT_FOUND when no
        template matches, INVALID_ARGUMENT naming the allowed methods when only the method
        is wrong."""
        allowed: list[str] = []
        for r in self.routes:
            bound = r.match(path)
            if bound is None:
                continue
            if r.http_method == method:
                return r, bound
            allowed.append(r.http_method)
        if allowed:
            raise _refuse(
                errors.InvalidArgument(
                    f"{method} is not served on {_clip(path)}; use {' or '.join(sorted(set(allowed)))}"
                )
            )
        templates = ", ".join(f"{r.http_method} {r.template}" for r in self.routes)
        raise _refuse(
            errors.NotFound(
                f"no HTTP/JSON method at {method} {_clip(path)}; the API serves {templates}"
            )
        )

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await receive()
            if event["type"] == "http.disconnect":
                break
            chunk = event.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _refuse(
                    errors.InvalidArgument(
                        f"the request body is over {self.max_body_bytes} bytes; send fewer or "
                        "shorter inputs per call"
                    )
                )
            chunks.append(chunk)
            if not event.get("more_body", False):
                break
        return b"".join(chunks)

    async def handle(self, scope: Scope, receive: Receive) -> _Reply:
        """Answer one HTTP request (never raises for anything the caller sent)."""
        try:
            route, bound = self.route(scope["method"], scope["path"])
            body = await self._read_body(receive)
            request = build_request(route, bound, scope.get("query_string", b""), body)
            metadata, timeout = _call_settings(scope["headers"])
        except _Refused as refused:
            return _error_reply(refused.status)
        try:
            response = await self._calls[route.grpc_path](
                request, metadata=metadata, timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return _error_reply(_status_from_error(exc))
        return _Reply(200, _json(response), ((b"content-type", b"application/json"),))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            reply = await self.handle(scope, receive)
        except Exception:  # a gateway bug must still answer, like the interceptor
            log.exception("HTTP gateway failure on %s %s", scope.get("method"), scope.get("path"))
            reply = _error_reply(
                status_pb2.Status(
                    code=code_pb2.INTERNAL,
                    message="internal error in the HTTP gateway; the server log has the traceback",
                )
            )
        headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


def _call_settings(
    headers: list[tuple[bytes, bytes]],
) -> tuple[tuple[tuple[str, str], ...], float | None]:
    """(gRPC metadata, deadline in seconds) from the HTTP headers: `Authorization` is forwarded
    as is (every copy: the auth interceptor wants exactly one); `X-Server-Timeout: <seconds>`
    becomes the call's deadline."""
    metadata: list[tuple[str, str]] = []
    timeout: float | None = None
    for raw_key, raw_value in headers:
        key = raw_key.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        if key in _FORWARDED_HEADERS:
            metadata.append((key, value))
        elif key == _TIMEOUT_HEADER:
            try:
                timeout = float(value)
            except ValueError:
                timeout = -1.0
            if not (math.isfinite(timeout) and 0 < timeout <= 86_400):
                raise _refuse(
                    errors.InvalidArgument(
                        f"X-Server-Timeout is {_clip(value)!r}; give the deadline in seconds, "
                        "> 0 and at most 86400"
                    )
                )
    return tuple(metadata), timeout


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handlers: `pairdots serve` owns SIGTERM/SIGINT and stops
    the gateway as part of its drain (rpc/app.py)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningGateway:
    """A started HTTP/JSON listener; `stop()` ends it and removes the private socket."""

    gateway: HttpGateway
    server: uvicorn.Server
    task: asyncio.Task[None]
    port: int
    socket_dir: Path

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.task, 10)
        await self.gateway.close()
        shutil.rmtree(self.socket_dir, ignore_errors=True)


def private_socket() -> tuple[Path, str]:
    """A fresh 0700 directory and the gRPC address of a Unix socket inside it, for the gRPC
    server to listen on (rpc/app.py binds it) and the gateway to call."""
    socket_dir = Path(tempfile.mkdtemp(prefix="pairdots-http-"))
    return socket_dir, f"unix:{socket_dir / 'grpc.sock'}"


def _listen(host: str, port: int) -> socket.socket:
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot bind the HTTP port {host}:{port} ({exc}); is it in use?") from exc
    sock.listen(128)
    sock.setblocking(False)
    return sock


async def start_gateway(config: ServerConfig, socket_dir: Path, target: str) -> RunningGateway:
    """Serve the gateway on config.host:config.http_port (HTTPS with the server's certificate
    when TLS is configured; client certificates required under mutual TLS)."""
    assert config.http_port is not None
    gateway = HttpGateway(target, max_body_bytes=2 * config.max_message_bytes)
    sock = _listen(config.host, config.http_port)
    ssl: dict[str, Any] = {}
    if config.tls_cert is not None and config.tls_key is not None:
        import ssl as ssl_mod

        ssl = {"ssl_certfile": str(config.tls_cert), "ssl_keyfile": str(config.tls_key)}
        if config.tls_client_ca is not None:
            ssl |= {
                "ssl_ca_certs": str(config.tls_client_ca),
                "ssl_cert_reqs": ssl_mod.CERT_REQUIRED,
            }
    server = _QuietServer(
        uvicorn.Config(
            gateway,
            lifespan="off",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=max(1, math.ceil(config.grace_s)),
            **ssl,
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await gateway.close()
            task.result()
            raise OSError("the HTTP/JSON listener stopped while starting")
        await asyncio.sleep(0.01)
    port = int(sock.getsockname()[1])
    log.info("HTTP/JSON on %s:%d (%s)", config.host, port, "HTTPS" if ssl else "plaintext")
    return RunningGateway(gateway, server, task, port, socket_dir)


__all__ = ["HttpGateway", "RunningGateway", "build_request", "private_socket", "start_gateway"]
