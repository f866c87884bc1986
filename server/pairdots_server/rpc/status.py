"""Domain error → gRPC status with google.rpc details, from the one table (errors.CODES).

ErrorInfo (domain "pairdots.dev", the exception's stable reason) is always attached;
BadRequest field violations for InvalidArgument; RetryInfo for ResourceExhausted.
"""

from __future__ import annotations

import datetime

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pairdots_server import errors

DOMAIN = "pairdots.dev"

#: google.rpc.Code int → grpc.StatusCode.
_STATUS_BY_INT: dict[int, grpc.StatusCode] = {sc.value[0]: sc for sc in grpc.StatusCode}


def grpc_code(code: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a google.rpc.Code int (INTERNAL for an unknown int)."""
    return _STATUS_BY_INT.get(code, grpc.StatusCode.INTERNAL)


def is_mapped(exc: BaseException) -> bool:
    """Whether the error table (errors.CODES) names a class of `exc`; the interceptor treats
    an unmapped one as unexpected (INTERNAL with an incident id)."""
    return errors.mapped_code(exc) is not None


def code_for(exc: errors.PairdotsError) -> grpc.StatusCode:
    """The grpc status code of a domain error, from the one table (errors.code_for)."""
    return grpc_code(errors.code_for(exc))


def _pack(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)  # type: ignore[arg-type]
    return out


def to_status(exc: errors.PairdotsError) -> status_pb2.Status:
    """The google.rpc.Status for a domain error (code, message, details)."""
    code = code_for(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))]
    if isinstance(exc, errors.InvalidArgument) and exc.violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in exc.violations
            ]
        )
        details.append(_pack(bad))
    if isinstance(exc, errors.ResourceExhausted) and exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=exc.retry_after_s))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return status_pb2.Status(code=code.value[0], message=exc.message, details=details)


def code_int(exc: errors.PairdotsError) -> int:
    """google.rpc.Code value of a domain error (for the job store, which has no grpc import)."""
    return errors.code_for(exc)


INTERNAL_CODE = code_pb2.INTERNAL
