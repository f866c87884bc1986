"""Domain exceptions with actionable messages.

No gRPC import here. The one error table, `CODES` (class → google.rpc.Code int, as the
neutral `Code` names), and `code_for` live at the end of this module; rpc/status.py turns
them into grpc status codes and rich statuses, the job runner stores them on failed
operations. Every message must say what the caller or operator should change.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldViolation:
    """One bad request field (maps to google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class PairdotsError(Exception):
    """Base class. `reason` is a stable UPPER_SNAKE identifier (google.rpc.ErrorInfo.reason)."""

    reason: str = "PAIRDOTS_ERROR"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(PairdotsError):
    """The request (or a config value) is malformed. Maps to INVALID_ARGUMENT."""

    reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        message: str,
        *,
        violations: list[FieldViolation] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message, reason=reason)
        self.violations: list[FieldViolation] = list(violations or [])

    @classmethod
    def for_field(cls, field_name: str, description: str) -> InvalidArgument:
        """One-field violation whose message is `field: description`."""
        return cls(f"{field_name}: {description}", violations=[FieldViolation(field_name, description)])


class NotFound(PairdotsError):
    """A named model, operation or file does not exist. Maps to NOT_FOUND."""

    reason = "NOT_FOUND"


class AlreadyExists(PairdotsError):
    """A bundle or resource with that name exists already. Maps to ALREADY_EXISTS."""

    reason = "ALREADY_EXISTS"


class FailedPrecondition(PairdotsError):
    """The system is not in a state where the request can run (e.g. bundle has no index,
    a corrupted bundle, WordNet missing). Maps to FAILED_PRECONDITION."""

    reason = "FAILED_PRECONDITION"


class BundleError(FailedPrecondition):
    """A bundle on disk is missing files, has a wrong format version or a hash mismatch."""

    reason = "BUNDLE_INVALID"


class DataError(InvalidArgument):
    """A dataset file is malformed; the message names file and line."""

    reason = "DATA_INVALID"


class SolverDiverged(FailedPrecondition):
    """An iterative inverse-HVP solver diverged or produced NaN/Inf. The message says which
    setting to change (more damping, larger scale, curvature=GGN)."""

    reason = "SOLVER_DIVERGED"


class ResourceExhausted(PairdotsError):
    """A queue, job or size limit is full. Maps to RESOURCE_EXHAUSTED with RetryInfo."""

    reason = "RESOURCE_EXHAUSTED"

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after_s = retry_after_s


class Cancelled(PairdotsError):
    """Work was cancelled by the caller (or a deadline passed). Maps to CANCELLED."""

    reason = "CANCELLED"


class DeadlineExceeded(PairdotsError):
    """The request's deadline passed while work was running. Maps to DEADLINE_EXCEEDED."""

    reason = "DEADLINE_EXCEEDED"


class Unavailable(PairdotsError):
    """The server is draining or not ready. Maps to UNAVAILABLE."""

    reason = "UNAVAILABLE"


class Code:
    """google.rpc.Code values (the same ints as google.rpc.code_pb2; no gRPC import)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


#: The error table: domain class → google.rpc.Code. Looked up along the exception's MRO, so
#: a subclass (BundleError, DataError, SolverDiverged) takes its base's code.
CODES: dict[type[PairdotsError], int] = {
    InvalidArgument: Code.INVALID_ARGUMENT,
    NotFound: Code.NOT_FOUND,
    AlreadyExists: Code.ALREADY_EXISTS,
    FailedPrecondition: Code.FAILED_PRECONDITION,
    ResourceExhausted: Code.RESOURCE_EXHAUSTED,
    Cancelled: Code.CANCELLED,
    DeadlineExceeded: Code.DEADLINE_EXCEEDED,
    Unavailable: Code.UNAVAILABLE,
}

#: The one fallback, for any exception the table does not name (a bare PairdotsError, or
#: anything else): INTERNAL. The RPC layer answers it with an incident id and logs the
#: traceback; a job records it as a failed operation.
FALLBACK_CODE = Code.INTERNAL


#: google.rpc.Code → HTTP status of the HTTP/JSON endpoint (google/rpc/code.proto's mapping,
#: as grpc-gateway and Google's APIs use it). Documented in README "HTTP/JSON".
HTTP_STATUS: dict[int, int] = {
    Code.OK: 200,
    Code.CANCELLED: 499,
    Code.UNKNOWN: 500,
    Code.INVALID_ARGUMENT: 400,
    Code.DEADLINE_EXCEEDED: 504,
    Code.NOT_FOUND: 404,
    Code.ALREADY_EXISTS: 409,
    Code.PERMISSION_DENIED: 403,
    Code.RESOURCE_EXHAUSTED: 429,
    Code.FAILED_PRECONDITION: 400,
    Code.ABORTED: 409,
    Code.OUT_OF_RANGE: 400,
    Code.UNIMPLEMENTED: 501,
    Code.INTERNAL: 500,
    Code.UNAVAILABLE: 503,
    Code.DATA_LOSS: 500,
    Code.UNAUTHENTICATED: 401,
}


def http_status(code: int) -> int:
    """The HTTP status of a google.rpc.Code int (500 for a code the table does not name)."""
    return HTTP_STATUS.get(code, 500)


def mapped_code(exc: BaseException) -> int | None:
    """The table's google.rpc.Code for `exc`, or None when no class on its MRO is listed."""
    for klass in type(exc).__mro__:
        code = CODES.get(klass)
        if code is not None:
            return int(code)
    return None


def code_for(exc: BaseException) -> int:
    """The google.rpc.Code int for `exc`: its table entry, else FALLBACK_CODE (INTERNAL)."""
    code = mapped_code(exc)
    return int(FALLBACK_CODE) if code is None else code


@dataclass
class CancelToken:
    """Cooperative cancellation flag checked between solver iterations and batches.

    `check()` raises Cancelled (or DeadlineExceeded once `deadline` — a time.monotonic()
    value — has passed). Core code receives an optional `should_stop: Callable[[], None]`
    and calls it; pass `token.check`.
    """

    cancelled: bool = False
    deadline: float | None = None
    why: str = "cancelled by the caller"

    def cancel(self, why: str | None = None) -> None:
        if why:
            self.why = why
        self.cancelled = True

    def check(self) -> None:
        import time

        if self.cancelled:
            raise Cancelled(self.why)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise DeadlineExceeded(
                "the request's deadline passed before the work finished; raise the client "
                "deadline or ask for less work (fewer salient words, a faster solver)"
            )
