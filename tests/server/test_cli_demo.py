"""The README's main job (`pairdots demo`) and `pairdots explain`, as a user runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "pairdots_server.cli", *args], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=600, check=False,
    )


def test_demo_serves_explains_and_writes_report(bundle_root: Path, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    out = _run(["demo", "--bundles", str(bundle_root), "--name", "tiny", "--top-words", "1",
                "--examples", "2", "--html", str(html)], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "models: tiny" in out.stdout
    assert "salient word" in out.stdout and "supporting" in out.stdout
    # the settings that ran, and the word-level influence named by the default MARGIN
    assert "settings:" in out.stdout and "word measurement: MARGIN" in out.stdout
    assert "I(z, m_y) =" in out.stdout and "I(z, c_w)" not in out.stdout
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") or page.lstrip().lower().startswith("<!doctype")
    assert "loved" in page and "<script" not in page.lower()
    assert 'class="colour-bar"' in page and 'class="bar-chart"' in page


def test_explain_command_reports_server_errors(tmp_path: Path) -> None:
    # nothing listens on this port: a clear message and exit code 2, no traceback
    out = _run(["explain", "i loved it !", "--address", "127.0.0.1:9", "--model", "tiny",
                "--timeout", "3"], tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "pairdots:" in out.stderr
