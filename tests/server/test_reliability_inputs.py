"""Issue 14 items 2–11 and 13, and AIP-155 request_id: each hostile or odd request the outside
battery sent gets its documented status code (never INTERNAL/UNKNOWN), with the details the
docs promise, against a real server on a loopback port serving a tiny bundle."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from pdserver_util import RunningServer, start_server

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg
from pairdots_server.config import ServerConfig
from pairdots_server.jobs.store import JobStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INVALID = grpc.StatusCode.INVALID_ARGUMENT
TESTS = [pb.LabeledText(text="the movie was bad .", label=0),
         pb.LabeledText(text="a great film .", label=1)]


@pytest.fixture()
def stub(server: RunningServer) -> Iterator[pbg.PairdotsServiceStub]:
    with grpc.insecure_channel(server.address) as ch:
        yield pbg.PairdotsServiceStub(ch)


@pytest.fixture()
def ops(server: RunningServer) -> Iterator[Any]:
    with grpc.insecure_channel(server.address) as ch:
        yield operations_pb2_grpc.OperationsStub(ch)


def _fail(call: Any, request: Any, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=120, **kw)
    return info.value  # type: ignore[return-value]


def _details(err: grpc.RpcError) -> list[Any]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, f"{err.code()} without a google.rpc.Status: {err.details()}"
    out = []
    for d in status.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest,
                    error_details_pb2.RetryInfo):
            if d.Is(cls.DESCRIPTOR):
                msg = cls()
                d.Unpack(msg)
                out.append(msg)
    return out


def _fields(err: grpc.RpcError) -> list[str]:
    return [v.field for d in _details(err) if isinstance(d, error_details_pb2.BadRequest)
            for v in d.field_violations]


def _reason(err: grpc.RpcError) -> str:
    infos = [d for d in _details(err) if isinstance(d, error_details_pb2.ErrorInfo)]
    assert infos, f"{err.code()} carries no ErrorInfo"
    return infos[0].reason


# -- item 2: LiSSA seeds up to 2^64-1 --------------------------------------------------------

@pytest.mark.parametrize("seed", [2**45, 2**64 - 1])
def test_item2_huge_lissa_seed(stub: Any, seed: int) -> None:
    req = pb.ExplainRequest(model="tiny", text="i loved it !", top_words=1, examples_per_word=1)
    req.influence.solver.solver = pb.SOLVER_LISSA
    req.influence.solver.seed = seed
    req.influence.solver.max_iterations = 5
    resp = stub.Explain(req, timeout=120)
    assert resp.explanations[0].salient_words


