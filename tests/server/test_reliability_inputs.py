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
from pairdots_server.service.jobs.store import JobStore

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


# -- item 3: unbounded names are never echoed whole ------------------------------------------

def test_item3_long_operation_names_are_not_found(ops: Any) -> None:
    long = "operations/" + "a" * 8000
    huge = "operations/" + "b" * 1_000_000
    for call, req in ((ops.GetOperation, operations_pb2.GetOperationRequest(name=long)),
                      (ops.CancelOperation, operations_pb2.CancelOperationRequest(name=huge)),
                      (ops.DeleteOperation, operations_pb2.DeleteOperationRequest(name=huge)),
                      (ops.WaitOperation, operations_pb2.WaitOperationRequest(name=huge))):
        err = _fail(call, req)
        assert err.code() is grpc.StatusCode.NOT_FOUND, (err.code(), err.details()[:200])
        assert len(err.details()) < 500
    err = _fail(ops.ListOperations, operations_pb2.ListOperationsRequest(filter="x" * 1_000_000))
    assert err.code() is INVALID and len(err.details()) < 500
    assert _fields(err) == ["filter"]


# -- item 4: options a solver cannot honour are not dropped silently -------------------------

def test_item4_hessian_with_the_default_solver_is_honoured(stub: Any) -> None:
    req = pb.ExplainRequest(model="tiny", text="i loved it !", top_words=1, examples_per_word=1)
    req.influence.solver.curvature = pb.CURVATURE_HESSIAN
    req.influence.solver.damping = 50.0  # the Hessian is indefinite: damp it well
    req.influence.solver.max_iterations = 20
    resp = stub.Explain(req, timeout=120)
    diag = resp.explanations[0].salient_words[0].solver
    assert diag.curvature == pb.CURVATURE_HESSIAN and diag.solver != pb.SOLVER_LOW_RANK


def test_item4_low_rank_rejects_what_it_ignores(stub: Any) -> None:
    req = pb.ExplainRequest(model="tiny", text="i loved it !", top_words=1)
    req.influence.solver.solver = pb.SOLVER_LOW_RANK
    req.influence.solver.curvature = pb.CURVATURE_HESSIAN
    err = _fail(stub.Explain, req)
    assert err.code() is INVALID and "influence.solver.curvature" in _fields(err)
    req = pb.ExplainRequest(model="tiny", text="i loved it !", top_words=1)
    req.influence.solver.solver = pb.SOLVER_LOW_RANK
    req.influence.solver.repeats = 2
    req.influence.solver.scale = 10.0
    err = _fail(stub.Explain, req)
    assert err.code() is INVALID
    assert {"influence.solver.repeats", "influence.solver.scale"} <= set(_fields(err))


# -- item 5: malformed bytes -----------------------------------------------------------------

def test_item5_malformed_protobuf_is_invalid_argument(server: RunningServer) -> None:
    with grpc.insecure_channel(server.address) as ch:
        for method in ("/pairdots.v1.PairdotsService/Explain",
                       "/pairdots.v1.PairdotsService/Attack",
                       "/google.longrunning.Operations/GetOperation"):
            raw = ch.unary_unary(method, request_serializer=None, response_deserializer=None)
            err = _fail(raw, b"\x0a\xff\xff\xff\xff\x0f")
            assert err.code() is INVALID, (method, err.code(), err.details())
            assert _reason(err) == "MALFORMED_REQUEST"


# -- items 6 and 8: auth errors carry ErrorInfo; two authorization headers are refused -------

def test_items6_8_auth(bundle_root: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("good-token\n")
    running = start_server(ServerConfig(bundles=bundle_root, port=0, auth_tokens_file=tokens,
                                        jobs_db=tmp_path / "jobs.sqlite3"))
    try:
        with grpc.insecure_channel(running.address) as ch:
            s = pbg.PairdotsServiceStub(ch)
            req = pb.ListModelsRequest()
            assert s.ListModels(req, metadata=[("authorization", "Bearer good-token")])
            err = _fail(s.ListModels, req)
            assert err.code() is grpc.StatusCode.UNAUTHENTICATED and _reason(err)
            err = _fail(s.ListModels, req, metadata=[("authorization", "Bearer bad")])
            assert err.code() is grpc.StatusCode.PERMISSION_DENIED and _reason(err)
            for pair in (("Bearer bad", "Bearer good-token"), ("Bearer good-token", "Bearer bad")):
                err = _fail(s.ListModels, req, metadata=[("authorization", v) for v in pair])
                assert err.code() is grpc.StatusCode.UNAUTHENTICATED, pair
                assert _reason(err) == "AMBIGUOUS_CREDENTIALS"
    finally:
        running.stop()


def test_item6_internal_carries_error_info(server: RunningServer, stub: Any,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_a: Any, **_k: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr("pairdots_server.rpc.convert.model_proto", broken)
    err = _fail(stub.ListModels, pb.ListModelsRequest())
    assert err.code() is grpc.StatusCode.INTERNAL and _reason(err) == "INTERNAL"
    assert "incident" in err.details()


def test_a_domain_error_outside_the_table_is_internal_with_an_incident(
        server: RunningServer, stub: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from pairdots_server.errors import PairdotsError

    def broken(*_a: Any, **_k: Any) -> Any:
        raise PairdotsError("odd", reason="ODD")

    monkeypatch.setattr("pairdots_server.rpc.convert.model_proto", broken)
    err = _fail(stub.ListModels, pb.ListModelsRequest())
    assert err.code() is grpc.StatusCode.INTERNAL and _reason(err) == "INTERNAL"
    assert "incident" in err.details()


# -- item 7 ----------------------------------------------------------------------------------

def test_item7_get_model_empty_name_names_the_field(stub: Any) -> None:
    err = _fail(stub.GetModel, pb.GetModelRequest(name=""))
    assert err.code() is INVALID and _fields(err) == ["name"]


# -- item 9 ----------------------------------------------------------------------------------

def test_item9_text_without_word_pieces(stub: Any) -> None:
    err = _fail(stub.Explain, pb.ExplainRequest(model="tiny", text="\x01\x02\x03\x1b"))
    assert err.code() is INVALID and _fields(err) == ["text"]


# -- item 10 ---------------------------------------------------------------------------------

def test_item10_epochs_zero_and_empty_operation_name(stub: Any, ops: Any) -> None:
    req = pb.AttackRequest(model="tiny", examples=TESTS, mode=pb.ATTACK_MODE_RANDOM,
                           examples_per_test=1)
    req.retrain.enabled = True
    req.retrain.epochs = 0
    err = _fail(stub.Attack, req)
    assert err.code() is INVALID and "retrain.epochs" in _fields(err)
    for call, r in ((ops.GetOperation, operations_pb2.GetOperationRequest()),
                    (ops.CancelOperation, operations_pb2.CancelOperationRequest()),
                    (ops.DeleteOperation, operations_pb2.DeleteOperationRequest()),
                    (ops.WaitOperation, operations_pb2.WaitOperationRequest())):
        err = _fail(call, r)
        assert err.code() is INVALID and _fields(err) == ["name"]


# -- item 11 ---------------------------------------------------------------------------------

def test_item11_operation_metadata_from_the_start(stub: Any) -> None:
    req = pb.AttackRequest(model="tiny", examples=TESTS, mode=pb.ATTACK_MODE_RANDOM,
                           examples_per_test=1)
    op = stub.Attack(req, timeout=60)
    meta = pb.JobMetadata()
    assert op.metadata.Unpack(meta)
    assert meta.kind == pb.JOB_KIND_ATTACK and meta.model == "models/tiny"
    assert meta.stage == "queued" and (meta.done_count, meta.total_count) == (0, 0)
    assert meta.create_time.seconds > 0


def test_item11_interrupted_operation_metadata(bundle_root: Path, tmp_path: Path) -> None:
    db = tmp_path / "jobs.sqlite3"
    store = JobStore(db)
    rec = store.create("attack", "pairdots.v1.AttackRequest", b"")
    stale = pb.JobMetadata(kind=pb.JOB_KIND_ATTACK, model="models/tiny", stage="perturbing",
                           done_count=1, total_count=4)
    stale.update_time.FromSeconds(1_000)
    store.set_running(rec.name)
    store.update_metadata(rec.name, "type.googleapis.com/pairdots.v1.JobMetadata",
                          stale.SerializeToString())
    store.close()  # the process "crashed" here
    running = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=db))
    try:
        with grpc.insecure_channel(running.address) as ch:
            op = operations_pb2_grpc.OperationsStub(ch).GetOperation(
                operations_pb2.GetOperationRequest(name=rec.name), timeout=30)
    finally:
        running.stop()
    assert op.done and op.error.code == grpc.StatusCode.ABORTED.value[0]
    meta = pb.JobMetadata()
    assert op.metadata.Unpack(meta)
    assert meta.stage == "interrupted" and meta.update_time.seconds > 1_000


# -- item 13 ---------------------------------------------------------------------------------

def test_item13_non_finite_gradient_is_named(server: RunningServer, stub: Any,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import pairdots_server.influence.pipeline as pipeline_mod

    real = pipeline_mod.measurement_gradient

    def nan_grad(*a: Any, **k: Any) -> torch.Tensor:
        return torch.full_like(real(*a, **k), float("nan"))

    monkeypatch.setattr(pipeline_mod, "measurement_gradient", nan_grad)
    req = pb.ExplainRequest(model="tiny", text="a great film .", top_words=1)
    req.influence.solver.solver = pb.SOLVER_CONJUGATE_GRADIENT
    req.influence.solver.seed = 99  # not cached
    err = _fail(stub.Explain, req)
    assert err.code() is grpc.StatusCode.FAILED_PRECONDITION, err.details()
    assert _reason(err) == "NON_FINITE_GRADIENT" and "ggn" not in err.details().lower()


def test_item13_scope_all_has_no_zero_word_embedding_block() -> None:
    from pairdots_server.model.scope import ScopeSpec
    from pairdots_server.testing import make_tiny_task

    task = make_tiny_task()
    names = ScopeSpec("all").select(task.model)
    assert not any("word_embeddings" in n for n in names)
    assert any("position_embeddings" in n for n in names)


# -- AIP-155 request_id ----------------------------------------------------------------------

def test_request_id_makes_attack_and_repair_idempotent(server: RunningServer, stub: Any) -> None:
    started = server.app.store.list(page_size=500)[0]
    req = pb.AttackRequest(model="tiny", examples=TESTS, mode=pb.ATTACK_MODE_RANDOM,
                           examples_per_test=1, request_id="3f1c2a4e-attack-retry")
    first = stub.Attack(req, timeout=60)
    again = stub.Attack(req, timeout=60)
    assert again.name == first.name
    rep = pb.RepairRequest(model="tiny", examples=TESTS, examples_per_error=1,
                           request_id="3f1c2a4e-repair-retry")
    assert stub.Repair(rep, timeout=60).name == stub.Repair(rep, timeout=60).name
    after = server.app.store.list(page_size=500)[0]
    assert len(after) == len(started) + 2  # one operation each, not two
    other = pb.AttackRequest()
    other.CopyFrom(req)
    other.seed = 7
    err = _fail(stub.Attack, other)
    assert err.code() is grpc.StatusCode.ALREADY_EXISTS and "request_id" in err.details()
    bad = pb.AttackRequest()
    bad.CopyFrom(req)
    bad.request_id = "x" * 500
    assert _fail(stub.Attack, bad).code() is INVALID


def test_typed_client_sets_request_id_and_reuses_it_on_retry(server: RunningServer) -> None:
    from pairdots import AttackMode, ClientConfig, PairdotsClient

    seen: list[str] = []

    class Flaky(grpc.UnaryUnaryClientInterceptor):  # type: ignore[misc]
        """Lets the first Attack reach the server, then reports UNAVAILABLE (a lost reply)."""

        def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
            out = continuation(details, request)
            if details.method.endswith("/Attack"):
                seen.append(request.request_id)
                if len(seen) == 1:
                    out.result()  # the server did create the operation
                    raise _Unavailable()
            return out

    class _Unavailable(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "connection reset"

        def trailing_metadata(self) -> Any:
            return ()

    before = len(server.app.store.list(page_size=500)[0])
    channel = grpc.intercept_channel(grpc.insecure_channel(server.address), Flaky())
    with PairdotsClient(ClientConfig(address=server.address, max_retries=2,
                                     retry_initial_backoff_s=0.05), channel=channel) as c:
        handle = c.attack([("the movie was bad .", 0)], model="tiny", mode=AttackMode.RANDOM,
                          examples_per_test=1)
    assert len(seen) == 2 and seen[0] == seen[1] and len(seen[0]) == 36  # one UUID4, twice
    after = server.app.store.list(page_size=500)[0]
    assert len(after) == before + 1 and after[0].name == handle.name
    time.sleep(0)  # the job runs on; nothing else to check
