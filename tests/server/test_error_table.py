"""The one error table (errors.CODES): every place that maps a domain error to a status code
reads it, so they agree for every class, and anything it does not name falls back to INTERNAL."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2

from pairdots_server import errors
from pairdots_server.rpc import status
from pairdots_server.service.jobs.runner import status_code_for

CASES = [
    (errors.InvalidArgument("x"), code_pb2.INVALID_ARGUMENT),
    (errors.DataError("x"), code_pb2.INVALID_ARGUMENT),
    (errors.NotFound("x"), code_pb2.NOT_FOUND),
    (errors.AlreadyExists("x"), code_pb2.ALREADY_EXISTS),
    (errors.FailedPrecondition("x"), code_pb2.FAILED_PRECONDITION),
    (errors.BundleError("x"), code_pb2.FAILED_PRECONDITION),
    (errors.SolverDiverged("x"), code_pb2.FAILED_PRECONDITION),
    (errors.ResourceExhausted("x", retry_after_s=1.5), code_pb2.RESOURCE_EXHAUSTED),
    (errors.Cancelled("x"), code_pb2.CANCELLED),
    (errors.DeadlineExceeded("x"), code_pb2.DEADLINE_EXCEEDED),
    (errors.Unavailable("x"), code_pb2.UNAVAILABLE),
    (errors.PairdotsError("x", reason="ODD"), code_pb2.INTERNAL),
]


@pytest.mark.parametrize(("exc", "code"), CASES, ids=[type(e).__name__ for e, _ in CASES])
def test_every_place_reads_the_same_code(exc: errors.PairdotsError, code: int) -> None:
    assert errors.code_for(exc) == code
    assert status_code_for(exc) == code
    assert status.code_for(exc) is status.grpc_code(code)
    assert status.to_status(exc).code == code
    assert status.is_mapped(exc) is (type(exc) is not errors.PairdotsError)


def test_the_neutral_codes_are_google_rpc_codes() -> None:
    for name, value in vars(errors.Code).items():
        if name.isupper():
            assert getattr(code_pb2, name) == value, name
            assert grpc.StatusCode[name].value[0] == value, name
