"""Typed exceptions built from gRPC errors and google.rpc.Status messages.

The server puts a google.rpc.Status in the ``grpc-status-details-bin`` trailer of every error
(see the proto's header): google.rpc.ErrorInfo gives a stable ``reason`` (domain
"pairdots.dev"), google.rpc.BadRequest names the bad fields, google.rpc.RetryInfo says when to
retry. `error_from_rpc` turns a raised grpc.RpcError (sync or asyncio) into the matching
`PairdotsError` subclass; `error_from_status` does the same for an Operation's ``error``.

Class names avoid the builtins and asyncio: the CANCELLED class is `RpcCancelledError` (not
``CancelledError``) and the DEADLINE_EXCEEDED class is `DeadlineExceededError` (not
``TimeoutError``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import grpc

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PairdotsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RpcCancelledError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnexpectedResponseError",
    "UnimplementedError",
    "UnknownError",
    "error_from_rpc",
    "error_from_status",
]

_DETAILS_KEY = "grpc-status-details-bin"  # = grpc_status._common.GRPC_DETAILS_METADATA_KEY
_CODE_BY_INT: dict[int, grpc.StatusCode] = {sc.value[0]: sc for sc in grpc.StatusCode}


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (google.rpc.BadRequest.FieldViolation), e.g.
    ``FieldViolation("top_words", "must be in 0..32, got 40")``."""

    field: str
    description: str
    reason: str = ""


class PairdotsError(Exception):
    """A failed call. `code` is the gRPC status code; `reason` the ErrorInfo reason ("" when
    the server sent none); `field_violations` the BadRequest violations; `retry_after_s` the
    RetryInfo delay in seconds (None when absent)."""

    default_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        domain: str = "",
        error_metadata: dict[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_after_s: float | None = None,
        details: tuple[Any, ...] = (),
    ) -> None:
        self.code: grpc.StatusCode = code if code is not None else self.default_code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.error_metadata: dict[str, str] = dict(error_metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_after_s = retry_after_s
        #: The raw google.protobuf.Any details of the status (for anything not decoded above).
        self.details = details
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.reason:
            text += f" [{self.reason}]"
        for v in self.field_violations:
            text += f"\n  {v.field}: {v.description}"
        if self.retry_after_s is not None:
            text += f"\n  retry after {self.retry_after_s:g} s"
        return text

    @property
    def retryable(self) -> bool:
        """True for the codes this client retries (UNAVAILABLE, RESOURCE_EXHAUSTED)."""
        return self.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class RpcCancelledError(PairdotsError):
    """CANCELLED: the call or the operation was cancelled."""

    default_code = grpc.StatusCode.CANCELLED


class UnknownError(PairdotsError):
    """UNKNOWN."""

    default_code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(PairdotsError):
    """INVALID_ARGUMENT: a request field is malformed; see `field_violations`."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(PairdotsError):
    """DEADLINE_EXCEEDED: the deadline passed (on the server, or while the client waited)."""

    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(PairdotsError):
    """NOT_FOUND: unknown model or operation."""

    default_code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(PairdotsError):
    """ALREADY_EXISTS (e.g. RetrainOptions.save_as names an existing bundle)."""

    default_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(PairdotsError):
    """PERMISSION_DENIED: the token is not allowed to do this."""

    default_code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(PairdotsError):
    """RESOURCE_EXHAUSTED: a queue or job limit is full; see `retry_after_s`."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(PairdotsError):
    """FAILED_PRECONDITION: the model cannot do this (no index, solver diverged, ...)."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(PairdotsError):
    """ABORTED."""

    default_code = grpc.StatusCode.ABORTED


class OutOfRangeError(PairdotsError):
    """OUT_OF_RANGE."""

    default_code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(PairdotsError):
    """UNIMPLEMENTED: the server does not offer this method."""

    default_code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(PairdotsError):
    """INTERNAL: a server bug."""

    default_code = grpc.StatusCode.INTERNAL


class UnavailableError(PairdotsError):
    """UNAVAILABLE: the server is starting, draining or unreachable; retried automatically."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DataLossError(PairdotsError):
    """DATA_LOSS."""

    default_code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(PairdotsError):
    """UNAUTHENTICATED: missing or wrong bearer token (set ClientConfig.token)."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class UnexpectedResponseError(PairdotsError):
    """The server answered with something this client cannot read (e.g. an operation whose
    response is not an AttackResult or RepairResult). Raised by the client, not the server."""

    default_code = grpc.StatusCode.INTERNAL


_CLASS_BY_CODE: dict[grpc.StatusCode, type[PairdotsError]] = {
    cls.default_code: cls
    for cls in (
        RpcCancelledError, UnknownError, InvalidArgumentError, DeadlineExceededError,
        NotFoundError, AlreadyExistsError, PermissionDeniedError, ResourceExhaustedError,
        FailedPreconditionError, AbortedError, OutOfRangeError, UnimplementedError,
        InternalError, UnavailableError, DataLossError, UnauthenticatedError,
    )
}


def _duration_s(duration: Any) -> float:
    return float(duration.seconds) + float(duration.nanos) / 1e9


def make_error(code: grpc.StatusCode, message: str, details: Iterable[Any] = ()) -> PairdotsError:
    """The PairdotsError subclass for `code`, with ErrorInfo / BadRequest / RetryInfo /
    PreconditionFailure decoded from `details` (google.protobuf.Any messages)."""
    from google.rpc import error_details_pb2

    reason = ""
    domain = ""
    meta: dict[str, str] = {}
    violations: list[FieldViolation] = []
    retry_after: float | None = None
    kept = tuple(details)
    for detail in kept:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = str(info.reason), str(info.domain)
            meta = {str(k): str(v) for k, v in info.metadata.items()}
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(
                FieldViolation(str(v.field), str(v.description), str(v.reason))
                for v in bad.field_violations)
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            pre = error_details_pb2.PreconditionFailure()
            detail.Unpack(pre)
            violations.extend(
                FieldViolation(str(v.subject), str(v.description), str(v.type))
                for v in pre.violations)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info_r = error_details_pb2.RetryInfo()
            detail.Unpack(info_r)
            retry_after = max(0.0, _duration_s(info_r.retry_delay))
    cls = _CLASS_BY_CODE.get(code, PairdotsError)
    return cls(message, code=code, reason=reason, domain=domain, error_metadata=meta,
               field_violations=violations, retry_after_s=retry_after, details=kept)


def error_from_status(status: Any) -> PairdotsError:
    """Error for a google.rpc.Status message (e.g. ``Operation.error``)."""
    code = _CODE_BY_INT.get(int(status.code), grpc.StatusCode.UNKNOWN)
    return make_error(code, str(status.message), status.details)


def _rich_status(trailing: Iterable[tuple[str, str | bytes]] | None) -> Any:
    """The google.rpc.Status in the ``grpc-status-details-bin`` trailer, or None.

    Equivalent to ``grpc_status.rpc_status.from_call`` but usable with both grpc.Call and
    grpc.aio.AioRpcError, and it does not raise when code/message differ from the status line.
    """
    from google.protobuf.message import DecodeError
    from google.rpc import status_pb2

    for key, value in trailing or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except DecodeError:  # malformed trailer: fall back to the status line
                return None
    return None


def error_from_rpc(err: grpc.RpcError) -> PairdotsError:
    """Typed error for a grpc.RpcError raised by a sync or asyncio call."""
    code_fn = getattr(err, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details_fn = getattr(err, "details", None)
    message = details_fn() if callable(details_fn) else str(err)
    trailing_fn = getattr(err, "trailing_metadata", None)
    trailing = trailing_fn() if callable(trailing_fn) else None
    status = _rich_status(trailing)
    if status is None:
        return make_error(code, str(message or code.name))
    return make_error(code, str(status.message or message or code.name), status.details)
