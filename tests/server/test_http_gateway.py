"""HTTP/JSON (issue 15 item 4): a real server with `http_port` set, called with real HTTP
clients (curl and urllib) on loopback, against the same server's gRPC answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import json_format
from pdserver_util import RunningServer, self_signed, start_server

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server import errors
from pairdots_server.config import ServerConfig
from pairdots_server.rpc.http_rules import api_routes, compile_template, unannotated_methods

TOKEN = "http-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def http_server(
    bundle_root: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    jobs = tmp_path_factory.mktemp("http-jobs") / "jobs.sqlite3"
    running = start_server(
        ServerConfig(
            bundles=bundle_root,
            port=0,
            http_port=0,
            jobs_db=jobs,
            auth_tokens=(TOKEN,),
            max_queue=64,
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def base(http_server: RunningServer) -> str:
    assert http_server.app.http is not None
    return f"http://127.0.0.1:{http_server.app.http.port}"


@pytest.fixture(scope="module")
def channel(http_server: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(http_server.address) as ch:
        yield ch


GRPC_AUTH = (("authorization", f"Bearer {TOKEN}"),)


def call(
    base: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, JSON body, headers) of one request through urllib."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(
        base + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(AUTH if headers is None else headers)},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def stable(resp: pb.ExplainResponse) -> pb.ExplainResponse:
    """The answer without what differs between two identical calls: wall times and the
    s_test cache flag (the second call is served from the cache)."""
    out = pb.ExplainResponse()
    out.CopyFrom(resp)
    out.diagnostics.ClearField("timings")
    out.diagnostics.ClearField("total_duration")
    for expl in out.explanations:
        for solver in [expl.prediction.solver, *(w.solver for w in expl.salient_words)]:
            solver.ClearField("duration")
            solver.ClearField("cached")
    return out


def test_every_rpc_is_annotated() -> None:
    assert unannotated_methods() == []
    paths = {(r.http_method, r.template) for r in api_routes()}
    assert ("POST", "/v1/{model=models/*}:explain") in paths
    assert ("GET", "/v1/{name=operations/**}") in paths


def test_templates_bind_fields() -> None:
    regex, names = compile_template("/v1/{name=operations/**}:cancel")
    m = regex.fullmatch("/v1/operations/attack-00ff:cancel")
    assert m is not None and names == ("name",) and m.group("v0") == "operations/attack-00ff"
    assert regex.fullmatch("/v1/operations/attack-00ff") is None
    regex, _ = compile_template("/v1/{name=models/*}")
    assert regex.fullmatch("/v1/models/a/b") is None


def test_curl_explain_is_the_grpc_answer(base: str, channel: grpc.Channel) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    body = {"text": "i loved it !", "topWords": 2, "examplesPerWord": 3}
    out = subprocess.run(
        [
            curl,
            "-sS",
            "-X",
            "POST",
            f"{base}/v1/models/tiny:explain",
            "-H",
            "Content-Type: application/json",
            "-H",
            f"Authorization: Bearer {TOKEN}",
            "-d",
            json.dumps(body),
            "-w",
            "\n%{http_code}",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    text, code = out.stdout.rsplit("\n", 1)
    assert code == "200", text
    via_http = json_format.Parse(text, pb.ExplainResponse())
    stub = pb_grpc.PairdotsServiceStub(channel)
    via_grpc = stub.Explain(
        pb.ExplainRequest(model="tiny", text="i loved it !", top_words=2, examples_per_word=3),
        metadata=GRPC_AUTH,
        timeout=300,
    )
    assert via_http.explanations[0].salient_words, "influence was computed"
    assert stable(via_http) == stable(via_grpc)
    # JSON conventions: camelCase names, enums by name, defaults printed, int64 as strings
    raw = json.loads(text)
    ex = raw["explanations"][0]["prediction"]["supporting"][0]
    assert raw["explanations"][0]["role"] == "EXPLANATION_ROLE_TARGET"
    assert isinstance(ex["trainIndex"], str) and "responsibleWord" in ex


def test_models_and_resource_names(base: str) -> None:
    status, body, _ = call(base, "GET", "/v1/models")
    assert status == 200 and [m["name"] for m in body["models"]] == ["models/tiny"]
    status, body, _ = call(base, "GET", "/v1/models/tiny")  # the Model itself (AIP-131)
    assert status == 200 and body["name"] == "models/tiny"
    assert body["labels"] == ["negative", "positive"]
    status, body, _ = call(base, "GET", "/v1/models?pageSize=1")
    assert status == 200 and len(body["models"]) == 1 and body["nextPageToken"] == ""
    status, body, _ = call(base, "GET", "/v1/models?pageToken=bogus")
    assert status == 400 and "page_token" in body["message"]


def test_grpc_accepts_resource_names(channel: grpc.Channel) -> None:
    stub = pb_grpc.PairdotsServiceStub(channel)
    model = stub.GetModel(pb.GetModelRequest(name="models/tiny"), metadata=GRPC_AUTH, timeout=30)
    assert isinstance(model, pb.Model) and model.name == "models/tiny"  # AIP-122
    expl = stub.Explain(
        pb.ExplainRequest(model="models/tiny", text="good", top_words=0),
        metadata=GRPC_AUTH,
        timeout=120,
    )
    assert expl.model == "models/tiny"
    with pytest.raises(grpc.RpcError) as err:
        stub.GetModel(pb.GetModelRequest(name="models/"), metadata=GRPC_AUTH, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _violations(body: dict[str, Any]) -> list[dict[str, str]]:
    for d in body.get("details", []):
        if d["@type"].endswith("google.rpc.BadRequest"):
            return list(d["fieldViolations"])
    return []


def _reason(body: dict[str, Any]) -> str:
    return next(d["reason"] for d in body["details"] if d["@type"].endswith("ErrorInfo"))


def test_bad_input_is_400_with_the_message(base: str) -> None:
    status, body, _ = call(
        base, "POST", "/v1/models/tiny:explain", {"text": "i loved it !", "topWords": 99}
    )
    assert status == 400 and body["code"] == errors.Code.INVALID_ARGUMENT
    assert any(v["field"] == "top_words" for v in _violations(body)), body
    assert "top_words" in body["message"]
    # empty text: the server's own validation
    status, body, _ = call(base, "POST", "/v1/models/tiny:explain", {"text": "   "})
    assert status == 400 and "text" in body["message"]
    # not the request's JSON: refused by the gateway with the parser's reason
    status, body, _ = call(base, "POST", "/v1/models/tiny:explain", raw=b"{not json")
    assert status == 400 and "pairdots.v1.ExplainRequest" in body["message"]
    status, body, _ = call(base, "POST", "/v1/models/tiny:explain", {"txet": "typo"})
    assert status == 400 and "txet" in body["message"]
    status, body, _ = call(base, "GET", "/v1/operations?pageSize=many")
    assert status == 400 and "pageSize" in body["message"]


def test_unknown_model_is_404(base: str) -> None:
    status, body, _ = call(base, "POST", "/v1/models/nope:explain", {"text": "good"})
    assert status == 404 and body["code"] == errors.Code.NOT_FOUND
    assert "nope" in body["message"] and "tiny" in body["message"]
    status, body, _ = call(base, "GET", "/v1/models/nope")
    assert status == 404 and _reason(body) == "NOT_FOUND"


def test_unknown_path_and_method(base: str) -> None:
    status, body, _ = call(base, "GET", "/v2/nothing")
    assert status == 404 and "/v1/{model=models/*}:explain" in body["message"]
    status, body, _ = call(base, "GET", "/v1/models/tiny:explain")
    assert status == 400 and "POST" in body["message"]


def test_authentication_is_the_grpc_one(base: str) -> None:
    status, body, _ = call(base, "GET", "/v1/models", headers={})
    assert status == 401 and body["code"] == errors.Code.UNAUTHENTICATED
    status, body, _ = call(base, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})
    assert status == 403 and body["code"] == errors.Code.PERMISSION_DENIED


def test_timeout_header(base: str) -> None:
    status, body, _ = call(base, "GET", "/v1/models", headers={**AUTH, "X-Server-Timeout": "x"})
    assert status == 400 and "X-Server-Timeout" in body["message"]
    status, body, _ = call(base, "GET", "/v1/models", headers={**AUTH, "X-Server-Timeout": "30"})
    assert status == 200


def test_operations_over_http(base: str, channel: grpc.Channel) -> None:
    """Attack returns an Operation over HTTP; Get/List/Wait/Cancel/Delete work on it and an
    unknown operation is 404, all as over gRPC."""
    status, op, _ = call(
        base,
        "POST",
        "/v1/models/tiny:attack",
        {
            "examples": [{"text": "a gorgeous , witty , seductive movie .", "label": 1}],
            "mode": "ATTACK_MODE_RANDOM",
            "examplesPerTest": 1,
            "requestId": "http-attack-1",
        },
    )
    assert status == 200 and op["name"].startswith("operations/attack-"), op
    assert op["metadata"]["@type"].endswith("pairdots.v1.JobMetadata")
    name = op["name"]
    status, again, _ = call(
        base,
        "POST",
        "/v1/models/tiny:attack",
        {
            "examples": [{"text": "a gorgeous , witty , seductive movie .", "label": 1}],
            "mode": "ATTACK_MODE_RANDOM",
            "examplesPerTest": 1,
            "requestId": "http-attack-1",
        },
    )
    assert status == 200 and again["name"] == name  # AIP-155 idempotency through HTTP
    status, waited, _ = call(base, "POST", f"/v1/{name}:wait", {"timeout": "30s"})
    assert status == 200 and waited["name"] == name
    grpc_op = operations_pb2_grpc.OperationsStub(channel).GetOperation(
        operations_pb2.GetOperationRequest(name=name), metadata=GRPC_AUTH, timeout=30
    )
    status, got, _ = call(base, "GET", f"/v1/{name}")
    assert status == 200
    assert grpc_op.name == name and (got["done"] or not grpc_op.done)  # never done → undone
    if got["done"]:
        assert got["response"]["@type"].endswith("pairdots.v1.AttackResult")
    status, listed, _ = call(base, "GET", "/v1/operations?filter=kind%3Dattack&pageSize=10")
    assert status == 200 and name in [o["name"] for o in listed["operations"]]
    status, _, _ = call(base, "POST", f"/v1/{name}:cancel", {})
    assert status == 200
    call(base, "POST", f"/v1/{name}:wait", {"timeout": "30s"})
    status, _, _ = call(base, "DELETE", f"/v1/{name}")
    assert status == 200
    status, body, _ = call(base, "GET", f"/v1/{name}")
    assert status == 404 and body["code"] == errors.Code.NOT_FOUND


def test_http_status_table_covers_every_code() -> None:
    from google.rpc import code_pb2

    assert {v for _, v in code_pb2.Code.items()} == set(errors.HTTP_STATUS)
    assert errors.http_status(errors.Code.RESOURCE_EXHAUSTED) == 429
    assert errors.http_status(errors.Code.FAILED_PRECONDITION) == 400
    assert errors.http_status(999) == 500


def test_https_under_tls(bundle_root: Path, tmp_path: Path) -> None:
    """With --tls-cert the HTTP port speaks HTTPS with the same certificate (plaintext HTTP
    is refused) and answers as before."""
    import ssl

    cert, key = self_signed(tmp_path)
    running = start_server(
        ServerConfig(
            bundles=bundle_root,
            port=0,
            http_port=0,
            tls_cert=cert,
            tls_key=key,
            jobs_db=tmp_path / "jobs.sqlite3",
        )
    )
    try:
        assert running.app.http is not None
        port = running.app.http.port
        ctx = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(
            f"https://localhost:{port}/v1/models/tiny", context=ctx, timeout=60
        ) as resp:
            assert resp.status == 200 and json.loads(resp.read())["name"] == "models/tiny"
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10)
    finally:
        running.stop()
