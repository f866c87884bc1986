"""Issue 14 item 14: every third-party module the code, tests and benchmarks import is declared
in pyproject.toml (a dependency or an extra), so the suite passes in a clean virtual
environment made from `.ci/install` and not only where the system Python happens to ship it."""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("server", "client", "tests", "bench", "deploy")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {_norm(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in reqs}


def imported_top_level() -> dict[str, str]:
    """{top-level module: first file importing it} over the scanned trees."""
    out: dict[str, str] = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    out.setdefault(n.split(".")[0], str(path.relative_to(REPO)))
    return out


def local_modules() -> set[str]:
    names = {"pairdots", "pairdots_server"}
    for top in SCANNED:
        names |= {p.stem for p in (REPO / top).rglob("*.py")}
        names |= {p.name for p in (REPO / top).rglob("*") if p.is_dir()}
    return names


# Peer libraries the tests compare against that cannot be declared: their declared
# requirements replace the CPU torch (kronfluence requires torchvision, which pulls a CUDA
# torch), so .ci/install installs them with --no-deps from PEERS_NO_DEPS.
PEERS_NO_DEPS = {"kronfluence"}


def test_peers_installed_without_deps_are_the_ones_ci_installs() -> None:
    script = (REPO / ".ci" / "install").read_text()
    for name in PEERS_NO_DEPS:
        assert re.search(rf"--no-deps[^\n]*\b{name}\b", script), name


def test_every_third_party_import_is_declared() -> None:
    have = declared()
    dists = metadata.packages_distributions()
    local = local_modules()
    missing = []
    for module, where in sorted(imported_top_level().items()):
        if module in sys.stdlib_module_names or module in local or module in PEERS_NO_DEPS:
            continue
        candidates = {_norm(d) for d in dists.get(module, [module])}
        if not candidates & have:
            missing.append(f"{module} (imported by {where}; distribution {sorted(candidates)})")
    assert not missing, "undeclared in pyproject.toml: " + "; ".join(missing)
