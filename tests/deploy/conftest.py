"""Fixtures for the deployment tests: the deploy/ helper modules and rendered charts.

deploy/ is not a Python package (it holds Dockerfiles, the chart and two scripts), so its
modules are loaded by path under unique names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "pairdots"
ALL_ON = DEPLOY / "values-all-on.yaml"


def _load(name: str, path: Path) -> ModuleType:
    module_name = f"pairdots_deploy_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def render() -> ModuleType:
    """deploy/render.py (Helm rendering through helm-python-sdk)."""
    return _load("render", DEPLOY / "render.py")


@pytest.fixture(scope="session")
def policy() -> ModuleType:
    """deploy/policy.py (the manifest policy)."""
    return _load("policy", DEPLOY / "policy.py")


@pytest.fixture(scope="session")
def all_on_values(render: ModuleType) -> dict[str, Any]:
    """deploy/values-all-on.yaml as a mapping."""
    values: dict[str, Any] = render.load_values([ALL_ON])
    return values


@pytest.fixture(scope="session")
def cases(render: ModuleType, all_on_values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Named value sets the chart must render, validate and pass the policy with."""
    return {
        "default": {},
        "all-on": all_on_values,
        # state on a PVC needs one replica and no HPA (SQLite jobs DB).
        "persistent-state": render.deep_merge(all_on_values, {
            "replicaCount": 1,
            "autoscaling": {"enabled": False},
            "state": {"persistence": {"enabled": True, "storageClassName": "standard"}},
        }),
        # a release that only builds an index, as plain (non-hook) Jobs, on CPU
        "index-only-plain": {
            "server": {"enabled": False},
            "indexBuild": {"enabled": True, "hooks": False, "device": "cpu", "shards": 4,
                           "parts": {"existingClaim": "shared-rwx"},
                           "resources": {"requests": {"cpu": "2", "memory": "4Gi"},
                                         "limits": {"cpu": "2", "memory": "8Gi"}}},
        },
        "cpu-pvc-digest": {
            "image": {"digest": "sha256:" + "a" * 64},
            "bundles": {"pvc": {"claimName": "bundles", "subPath": "prod"}},
            "server": {"device": "cpu"},
            "podDisruptionBudget": {"minAvailable": 1},
        },
    }


@pytest.fixture(scope="session")
def rendered(render: ModuleType, cases: dict[str, dict[str, Any]]
             ) -> dict[str, list[dict[str, Any]]]:
    """Every case rendered once by Helm into parsed Kubernetes objects."""
    return {name: render.render_manifests(values, release="pd", namespace="ml")
            for name, values in cases.items()}
