"""deploy/policy.py: the chart passes every rule, and each rule catches its bad manifest."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

POLICY = Path(__file__).resolve().parents[2] / "deploy" / "policy.py"

Manifest = dict[str, Any]


def good_deployment() -> Manifest:
    """A minimal Deployment that satisfies every rule."""
    probe = {"grpc": {"port": 50051}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "good"},
        "spec": {"template": {"spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "initContainers": [{
                "name": "init", "image": "busybox:1.36",
                "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
                "securityContext": {"readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "containers": [{
                "name": "server", "image": "registry:5000/team/pairdots:0.1.0",
                "livenessProbe": probe, "readinessProbe": probe, "startupProbe": probe,
                "resources": {"limits": {"cpu": "2", "memory": "8Gi"}},
                "securityContext": {"readOnlyRootFilesystem": True,
                                    "allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
        }}},
    }


def server(m: Manifest) -> dict[str, Any]:
    return m["spec"]["template"]["spec"]["containers"][0]


def pod(m: Manifest) -> dict[str, Any]:
    return m["spec"]["template"]["spec"]


def init(m: Manifest) -> dict[str, Any]:
    return m["spec"]["template"]["spec"]["initContainers"][0]


# One bad manifest per rule: (rule expected to fire, mutation of the good Deployment).
BAD: list[tuple[str, str, Callable[[Manifest], None]]] = [
    ("non-root", "runAsNonRoot false",
     lambda m: pod(m)["securityContext"].update(runAsNonRoot=False)),
    ("non-root", "container overrides runAsUser 0",
     lambda m: server(m)["securityContext"].update(runAsUser=0)),
    ("non-root", "no runAsUser anywhere",
     lambda m: pod(m)["securityContext"].pop("runAsUser")),
    ("probes", "no startup probe", lambda m: server(m).pop("startupProbe")),
    ("probes", "no liveness probe", lambda m: server(m).pop("livenessProbe")),
    ("probes", "no readiness probe", lambda m: server(m).pop("readinessProbe")),
    ("limits", "no memory limit", lambda m: server(m)["resources"]["limits"].pop("memory")),
    ("limits", "init container without limits", lambda m: init(m).pop("resources")),
    ("image-tag", "latest tag", lambda m: server(m).update(image="pairdots:latest")),
    ("image-tag", "no tag (registry port is not a tag)",
     lambda m: server(m).update(image="registry:5000/team/pairdots")),
    ("image-tag", "empty tag", lambda m: server(m).update(image="pairdots:")),
    ("read-only-root", "writable root",
     lambda m: server(m)["securityContext"].update(readOnlyRootFilesystem=False)),
    ("no-escalation", "escalation not disabled",
     lambda m: server(m)["securityContext"].pop("allowPrivilegeEscalation")),
    ("no-escalation", "privileged", lambda m: server(m)["securityContext"].update(privileged=True)),
    ("drop-all", "drops only NET_RAW",
     lambda m: server(m)["securityContext"].update(capabilities={"drop": ["NET_RAW"]})),
    ("drop-all", "adds SYS_ADMIN",
     lambda m: server(m)["securityContext"]["capabilities"].update(add=["SYS_ADMIN"])),
    ("seccomp", "unconfined seccomp",
     lambda m: server(m)["securityContext"].update(seccompProfile={"type": "Unconfined"})),
]


def test_good_manifest_passes(policy: ModuleType) -> None:
    assert policy.check([good_deployment()]) == []


@pytest.mark.parametrize(("rule", "what", "mutate"), BAD, ids=[f"{r}:{w}" for r, w, _ in BAD])
def test_each_rule_catches_its_bad_manifest(policy: ModuleType, rule: str, what: str,
                                            mutate: Callable[[Manifest], None]) -> None:
    manifest = copy.deepcopy(good_deployment())
    mutate(manifest)
    violations = policy.check([manifest])
    assert {v.rule for v in violations} == {rule}, (what, [str(v) for v in violations])


def test_rules_cover_every_required_check(policy: ModuleType) -> None:
    assert set(policy.RULES) == {r for r, _, _ in BAD}


def test_jobs_need_no_probes_but_everything_else(policy: ModuleType) -> None:
    job = good_deployment()
    job.update(kind="Job", apiVersion="batch/v1")
    for p in ("livenessProbe", "readinessProbe", "startupProbe"):
        server(job).pop(p)
    assert policy.check([job]) == []
    server(job)["securityContext"]["readOnlyRootFilesystem"] = False
    assert [v.rule for v in policy.check([job])] == ["read-only-root"]


def test_cronjob_pod_template_is_checked(policy: ModuleType) -> None:
    cron = {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"},
            "spec": {"jobTemplate": {"spec": {"template": {"spec": {"containers": [
                {"name": "c", "image": "x:latest"}]}}}}}}
    rules = {v.rule for v in policy.check([cron])}
    assert rules == {"non-root", "limits", "image-tag", "read-only-root", "no-escalation",
                     "drop-all", "seccomp"}


def test_every_rendered_case_passes_the_policy(policy: ModuleType,
                                               rendered: dict[str, list[Manifest]]) -> None:
    for case, objects in rendered.items():
        assert policy.workload_count(objects) >= 1, case
        violations = policy.check(objects)
        assert violations == [], (case, [str(v) for v in violations])


def test_cli_exit_codes(policy: ModuleType, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(good_deployment()))
    assert policy.main([str(good)]) == 0
    bad_manifest = good_deployment()
    server(bad_manifest)["image"] = "pairdots:latest"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_manifest))
    assert policy.main([str(bad)]) == 1
    assert "[image-tag]" in capsys.readouterr().out
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Service"}))
    assert policy.main([str(empty)]) == 2


def test_policy_file_is_where_the_docs_say(policy: ModuleType) -> None:
    assert Path(policy.__file__).resolve() == POLICY.resolve()
