"""The committed generated code matches the .proto files, and `buf lint` passes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Load protos/generate.py by path: putting protos/ on sys.path would make its pairdots/ folder
# (the .proto sources) shadow the real `pairdots` package as a namespace package.
_spec = importlib.util.spec_from_file_location("pairdots_generate", ROOT / "protos" / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_generated_code_is_fresh() -> None:
    stale = generate.stale_files()
    assert stale == [], f"run `python protos/generate.py`; stale: {stale}"


def _lint(workspace: Path) -> subprocess.CompletedProcess[str]:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: pip install buf-bin (part of the dev extra)")
    return subprocess.run(
        [buf, "lint"], check=False, cwd=workspace, capture_output=True, text=True, timeout=300
    )


def _workspace(tmp_path: Path) -> Path:
    """A copy of the committed protos/ alone (buf.yaml, the API, third_party/): what a user
    of the repository has, with no network and no installed package consulted."""
    ws = tmp_path / "protos"
    shutil.copytree(ROOT / "protos", ws, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return ws


def test_buf_lint_passes_offline_from_the_committed_files(tmp_path: Path) -> None:
    result = _lint(_workspace(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_can_fail(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    proto = ws / "pairdots" / "v1" / "pairdots.proto"
    proto.write_text(
        proto.read_text().replace("TARGET_FUNCTION_UNSPECIFIED = 0", "TARGET_NONE = 0")
    )
    result = _lint(ws)
    assert result.returncode != 0
    assert "UNSPECIFIED" in result.stdout + result.stderr


def test_third_party_include_tree_is_fresh() -> None:
    assert generate.third_party_problems() == [], "run `python protos/generate.py`"


def test_protoc_compiles_from_the_committed_tree_alone(tmp_path: Path) -> None:
    """protoc with only `-I protos -I protos/third_party` (no installed include directory)
    compiles the API with every import: the descriptor set any language's generator (or
    @grpc/proto-loader, tests/client/test_node_client.py) starts from. grpc_tools' protoc
    has only the Python generators built in, so that is the generator run here."""
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    out = tmp_path / "set.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos'}",
            f"-I{ROOT / 'protos' / 'third_party'}",
            "--include_imports",
            f"--descriptor_set_out={out}",
            f"--python_out={tmp_path}",
            "pairdots/v1/pairdots.proto",
        ]
    )
    assert rc == 0
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file}
    assert "google/api/annotations.proto" in files and "google/protobuf/descriptor.proto" in files
    assert files["pairdots/v1/pairdots.proto"].options.java_package == "dev.pairdots.v1"
    assert (tmp_path / "pairdots" / "v1" / "pairdots_pb2.py").is_file()


def test_health_proto_in_the_tree_is_the_installed_health_service(tmp_path: Path) -> None:
    """protos/third_party/grpc/health/v1/health.proto (written from the installed
    grpcio-health-checking descriptor, which ships no .proto file) compiles from the tree
    alone to exactly that descriptor: the same messages, fields, enums, service and options,
    so a client generated from it talks to the server's grpc.health.v1.Health."""
    from google.protobuf import descriptor_pb2
    from grpc_health.v1 import health_pb2
    from grpc_tools import protoc

    out = tmp_path / "health.pb"
    rc = protoc.main(
        [
            "protoc",
            f"-I{ROOT / 'protos' / 'third_party'}",
            f"--descriptor_set_out={out}",
            generate.HEALTH_PROTO,
        ]
    )
    assert rc == 0
    (compiled,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    installed = descriptor_pb2.FileDescriptorProto()
    health_pb2.DESCRIPTOR.CopyToProto(installed)
    assert compiled.name == generate.HEALTH_PROTO and installed.name != compiled.name
    compiled.name = installed.name  # the Python package registers it as grpc_health/v1/...

    def drop_json_names(messages: Any) -> None:  # protoc adds them; compiled-in ones lack them
        for m in messages:
            for f in m.field:
                f.ClearField("json_name")
            drop_json_names(m.nested_type)

    drop_json_names(compiled.message_type)
    assert compiled == installed
    assert [m.name for m in compiled.service[0].method] == ["Check", "List", "Watch"]


def test_without_third_party_protoc_fails(tmp_path: Path) -> None:
    """Without third_party/ the same protoc call fails (so the test above can fail)."""
    from grpc_tools import protoc

    rc = protoc.main(
        ["protoc", f"-I{ROOT / 'protos'}", f"--python_out={tmp_path}", "pairdots/v1/pairdots.proto"]
    )
    assert rc != 0


def test_go_package_and_java_package_are_declared() -> None:
    from pairdots.v1 import pairdots_pb2

    opts = pairdots_pb2.DESCRIPTOR.GetOptions()
    assert opts.go_package.endswith(";pairdotsv1") and opts.java_package == "dev.pairdots.v1"
    assert opts.java_multiple_files
