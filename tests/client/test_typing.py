"""The typed client passes `mypy --strict` (issue 6: "mypy --strict over client/ and an example
consumer script passes in CI"), with the repository's mypy configuration (pyproject.toml).

The second case shows the check has teeth: a consumer that misuses the client's result types
(or leaves a function unannotated) fails under the same command and configuration.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["client/pairdots", "client/examples/consumer.py"]

pytest.importorskip("mypy")


def run_mypy(*extra_files: str, cache_dir: Path | None = None
             ) -> subprocess.CompletedProcess[str]:
    cache = ["--cache-dir", str(cache_dir)] if cache_dir is not None else []
    cmd = [sys.executable, "-m", "mypy", "--strict", "--config-file", str(REPO / "pyproject.toml"),
           "--no-error-summary", "--hide-error-context", *cache, *TARGETS, *extra_files]
    return subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_client_and_example_consumer_are_strictly_typed() -> None:
    result = run_mypy()
    assert result.returncode == 0, result.stdout + result.stderr


BAD_CONSUMER = '''\
from pairdots import ClientConfig, PairdotsClient


def count_models(address: str) -> int:
    with PairdotsClient(ClientConfig(address=address)) as client:
        return client.list_models()  # a list of ModelInfo, not an int


def untyped(x):
    return x
'''


def test_a_type_error_in_a_consumer_fails_the_same_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad_consumer.py"
    bad.write_text(BAD_CONSUMER)
    # Its own cache: a shared one remembers this module under an earlier run's tmp path.
    result = run_mypy(str(bad), cache_dir=tmp_path / "mypy-cache")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    errors = [line for line in out.splitlines() if ": error:" in line]
    # Both errors in the bad file (the list/int mix-up proves the client's types are precise,
    # not Any), and none in the client itself.
    assert len(errors) == 2, out
    assert all(line.startswith(str(bad)) for line in errors), out
    assert any(":6:" in line and "Incompatible return value" in line for line in errors), out
    assert any(":9:" in line and "missing a type annotation" in line for line in errors), out
