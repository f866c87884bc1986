"""Domain exceptions with actionable messages.

No gRPC import here: the RPC layer maps each class to a status code in one place
(rpc/interceptors.py). Every message must say what the caller or operator should change.
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
