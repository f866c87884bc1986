"""Bad requests get the documented status with field-level details; the server keeps serving."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from pdserver_util import RunningServer, start_server

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg
from pairdots_server.config import ServerConfig

Req = Callable[[], pb.ExplainRequest]


def _req(**kw: object) -> pb.ExplainRequest:
    base: dict[str, object] = {"model": "tiny", "text": "i loved it !", "top_words": 0}
    base.update(kw)
    return pb.ExplainRequest(**base)  # type: ignore[arg-type]


def _solver(**kw: object) -> pb.ExplainRequest:
    r = _req(top_words=1)
    for k, v in kw.items():
        setattr(r.influence.solver, k, v)
    return r


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES: list[tuple[str, Req, grpc.StatusCode, str]] = [
    ("empty text", lambda: _req(text=""), INVALID, "text"),
    ("whitespace text", lambda: _req(text=" \t\n "), INVALID, "text"),
    ("huge text", lambda: _req(text="good " * 3000), INVALID, "text"),
    ("NUL in text", lambda: _req(text="a\x00b"), INVALID, "text"),
    ("missing model", lambda: _req(model=""), INVALID, "model"),
    ("path-like model", lambda: _req(model="../etc/passwd"), INVALID, "model"),
    ("slash model", lambda: _req(model="a/b"), INVALID, "model"),
    ("absolute path model", lambda: _req(model="/tmp/x"), INVALID, "model"),
    ("upper-case model", lambda: _req(model="TINY"), INVALID, "model"),
    ("negative target", lambda: _req(target_label=-1), INVALID, "target_label"),
    ("target out of range", lambda: _req(target_label=2), INVALID, "target_label"),
    ("huge target", lambda: _req(target_label=2**31 - 1), INVALID, "target_label"),
    ("gold out of range", lambda: _req(gold_label=7), INVALID, "gold_label"),
    ("negative top_words", lambda: _req(top_words=-1), INVALID, "top_words"),
    ("huge top_words", lambda: _req(top_words=10_000), INVALID, "top_words"),
    ("negative examples", lambda: _req(examples_per_word=-3), INVALID, "examples_per_word"),
    ("huge examples", lambda: _req(examples_per_word=1_000_000), INVALID, "examples_per_word"),
    ("negative position", lambda: _req(word_positions=[-1]), INVALID, "word_positions"),
    ("position past end", lambda: _req(word_positions=[99]), INVALID, "word_positions"),
    ("duplicate positions", lambda: _req(word_positions=[0, 0]), INVALID, "word_positions"),
    ("too many positions", lambda: _req(word_positions=list(range(40))), INVALID,
     "word_positions"),
    ("NaN damping", lambda: _solver(damping=float("nan")), INVALID, "influence.solver.damping"),
    ("negative damping", lambda: _solver(damping=-1.0), INVALID, "influence.solver.damping"),
    ("zero damping", lambda: _solver(damping=0.0), INVALID, "influence.solver.damping"),
    ("inf scale", lambda: _solver(scale=float("inf")), INVALID, "influence.solver.scale"),
    ("zero iterations", lambda: _solver(max_iterations=0), INVALID,
     "influence.solver.max_iterations"),
    ("too many repeats", lambda: _solver(repeats=100), INVALID, "influence.solver.repeats"),
    ("tolerance >= 1", lambda: _solver(tolerance=1.5), INVALID, "influence.solver.tolerance"),
    ("batch size 0", lambda: _solver(batch_size=0), INVALID, "influence.solver.batch_size"),
    ("unknown solver enum", lambda: _solver(solver=99), INVALID, "influence.solver.solver"),
    ("unknown target enum", lambda: _req(saliency=pb.SaliencyOptions(target_function=42)),
     INVALID, "saliency.target_function"),
    ("unknown token score", lambda: _req(saliency=pb.SaliencyOptions(token_score=-5)), INVALID,
     "saliency.token_score"),
    ("negative candidates", lambda: _req(influence=pb.InfluenceOptions(candidate_count=-1)),
     INVALID, "influence.candidate_count"),
    ("unknown model", lambda: _req(model="nope"), grpc.StatusCode.NOT_FOUND, ""),
]


def _violations(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    out = []
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out += [v.field for v in bad.field_violations]
    return out


@pytest.fixture(scope="module")
def stub(server: RunningServer) -> pbg.PairdotsServiceStub:
    channel = grpc.insecure_channel(server.address)
    return pbg.PairdotsServiceStub(channel)


@pytest.mark.parametrize("name,make,code,field", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_documented_code(
    stub: pbg.PairdotsServiceStub, name: str, make: Req, code: grpc.StatusCode, field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(make(), timeout=60)
    err = info.value
    assert err.code() == code, f"{name}: {err.code()} {err.details()}"
    assert err.details()
    if field:
        assert field in _violations(err), f"{name}: violations {_violations(err)}"


def test_oversized_message_is_refused(stub: pbg.PairdotsServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(_req(text="x" * (5 * 1024 * 1024)), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_server_still_healthy_after_battery(server: RunningServer,
                                            stub: pbg.PairdotsServiceStub) -> None:
    for _name, make, _code, _field in CASES:
        with pytest.raises(grpc.RpcError):
            stub.Explain(make(), timeout=60)
    channel = grpc.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert stub.Explain(_req(), timeout=60).prediction.label_name in ("negative", "positive")


def test_auth_tokens(bundle_root: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\ns3cret\n")
    running = start_server(ServerConfig(bundles=bundle_root, port=0, auth_tokens_file=tokens,
                                        jobs_db=tmp_path / "jobs.sqlite3"))
    try:
        channel = grpc.insecure_channel(running.address)
        stub = pbg.PairdotsServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.ListModels(pb.ListModelsRequest(), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            stub.ListModels(pb.ListModelsRequest(), timeout=10,
                            metadata=(("authorization", "Bearer nope"),))
        assert wrong.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as malformed:
            stub.ListModels(pb.ListModelsRequest(), timeout=10,
                            metadata=(("authorization", "s3cret"),))
        assert malformed.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.ListModels(pb.ListModelsRequest(), timeout=10,
                             metadata=(("authorization", "Bearer s3cret"),))
        assert [m.name for m in ok.models] == ["models/tiny"]
        health = health_pb2_grpc.HealthStub(channel)  # probes need no token
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_corrupted_bundle_refused_healthy_served(bundle_root: Path, tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "root"
    shutil.copytree(bundle_root / "tiny", root / "tiny")
    shutil.copytree(bundle_root / "tiny", root / "broken")
    manifest = (root / "broken" / "manifest.json")
    manifest.write_text(manifest.read_text().replace('"name": "tiny"', '"name": "broken"'))
    with open(root / "broken" / "train.jsonl", "a") as f:
        f.write('{"text": "tampered", "label": 0}\n')
    running = start_server(ServerConfig(bundles=root, port=0, jobs_db=tmp_path / "j.sqlite3"))
    try:
        stub = pbg.PairdotsServiceStub(grpc.insecure_channel(running.address))
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
        assert names == ["models/tiny"]
        errors = running.app.service.registry.errors
        assert len(errors) == 1 and "broken" in next(iter(errors))
    finally:
        running.stop()
