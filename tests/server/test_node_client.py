"""Any language (issue 15 item 5): the Node.js example in client/examples/node/ runs from the
committed files alone (package.json + package-lock.json via `npm ci`, the .proto files and
protos/third_party/ loaded at run time) against a real server, and gets the same answer as the
Python gRPC stub."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest
from pdserver_util import RunningServer

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "client" / "examples" / "node"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed (.ci/install adds it)")


def _npm_ci() -> None:
    """Install the locked dependencies when they are not there yet (.ci/install does it too)."""
    if (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    npm = shutil.which("npm")
    assert npm is not None, "npm is missing next to node; install Debian's npm (.ci/install)"
    out = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def run_example(server: RunningServer, *extra: str) -> dict[str, Any]:
    _npm_ci()
    assert NODE is not None
    out = subprocess.run(
        [NODE, "client.js", "--address", server.address, "--model", "tiny", *extra],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_node_example_gets_the_grpc_answer(server: RunningServer) -> None:
    got = run_example(server, "--text", "i loved it !", "--top-words", "2")
    assert got["health"] == "SERVING"  # grpc.health.v1 from protos/third_party
    # Model.name is the resource name (AIP-122); other tests may have saved more bundles
    assert "models/tiny" in got["models"] and all(n.startswith("models/") for n in got["models"])
    assert got["model"]["name"] == "models/tiny"
    assert got["model"]["labels"] == ["negative", "positive"]
    assert got["model"]["trainingExampleCount"] == str(64)  # int64 as a string
    with grpc.insecure_channel(server.address) as channel:
        ref = pb_grpc.PairdotsServiceStub(channel).Explain(
            pb.ExplainRequest(model="tiny", text="i loved it !", top_words=2), timeout=300
        )
    node = got["explain"]
    assert node["prediction"]["label"] == ref.prediction.label
    assert node["prediction"]["probabilities"] == pytest.approx(
        list(ref.prediction.probabilities), abs=1e-12
    )
    assert [w["text"] for w in node["words"]] == [w.text for w in ref.words]
    (n_target,), (r_target,) = node["explanations"][:1], ref.explanations[:1]
    assert n_target["role"] == "EXPLANATION_ROLE_TARGET"
    assert [w["wordIndex"] for w in n_target["salientWords"]] == [
        w.word_index for w in r_target.salient_words
    ]
    for n_word, r_word in zip(n_target["salientWords"], r_target.salient_words, strict=True):
        assert [e["trainIndex"] for e in n_word["supporting"]] == [
            str(e.train_index) for e in r_word.supporting
        ]
        assert [e["influence"] for e in n_word["supporting"]] == pytest.approx(
            [e.influence for e in r_word.supporting], rel=1e-9
        )
    assert [e["trainIndex"] for e in n_target["prediction"]["supporting"]] == [
        str(e.train_index) for e in r_target.prediction.supporting
    ]


def test_node_example_decodes_the_error_details(server: RunningServer) -> None:
    error = run_example(server)["error"]
    assert error["codeName"] == "INVALID_ARGUMENT" and "text" in error["message"]
    types = [d["@type"] for d in error["details"]]
    assert "google.rpc.ErrorInfo" in types and "google.rpc.BadRequest" in types
    bad = next(d for d in error["details"] if d["@type"] == "google.rpc.BadRequest")
    assert bad["fieldViolations"][0]["field"] == "text"


def test_lockfile_pins_what_package_json_asks_for() -> None:
    package = json.loads((EXAMPLE / "package.json").read_text())
    lock = json.loads((EXAMPLE / "package-lock.json").read_text())
    assert lock["lockfileVersion"] >= 2
    for name in package["dependencies"]:
        assert f"node_modules/{name}" in lock["packages"], name
    assert {"@grpc/grpc-js", "@grpc/proto-loader"} <= set(package["dependencies"])
