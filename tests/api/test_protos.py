"""The committed generated code matches the .proto files, and `buf lint` passes."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Load protos/generate.py by path: putting protos/ on sys.path would make its pairdots/ folder
# (the .proto sources) shadow the real `pairdots` package as a namespace package.
_spec = importlib.util.spec_from_file_location("pairdots_generate", ROOT / "protos" / "generate.py")
assert _spec is not None and _spec.loader is not None
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)

BUF_WORKSPACE = """\
version: v2
modules:
  - path: api
  - path: third_party
lint:
  use: [STANDARD]
  except: [RPC_RESPONSE_STANDARD_NAME, RPC_REQUEST_RESPONSE_UNIQUE]
  ignore: [third_party]
"""


def test_generated_code_is_fresh() -> None:
    stale = generate.stale_files()
    assert stale == [], f"run `python protos/generate.py`; stale: {stale}"


def _lint(workspace: Path) -> subprocess.CompletedProcess[str]:
    buf = shutil.which("buf")
    if buf is None:
        pytest.fail("buf is not installed: pip install buf-bin (part of the dev extra)")
    return subprocess.run(
        [buf, "lint"], check=False, cwd=workspace, capture_output=True, text=True
    )


def _workspace(tmp_path: Path) -> Path:
    (tmp_path / "api").mkdir()
    shutil.copytree(ROOT / "protos" / "pairdots", tmp_path / "api" / "pairdots")
    include = generate._google_include_dir(tmp_path / "gen")
    shutil.move(str(include), tmp_path / "third_party")
    (tmp_path / "buf.yaml").write_text(BUF_WORKSPACE)
    return tmp_path


def test_buf_lint_passes(tmp_path: Path) -> None:
    result = _lint(_workspace(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_can_fail(tmp_path: Path) -> None:
    ws = _workspace(tmp_path)
    proto = ws / "api" / "pairdots" / "v1" / "pairdots.proto"
    proto.write_text(proto.read_text().replace("TARGET_FUNCTION_UNSPECIFIED = 0", "TARGET_NONE = 0"))
    result = _lint(ws)
    assert result.returncode != 0
    assert "UNSPECIFIED" in result.stdout + result.stderr
