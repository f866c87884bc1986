"""Security and operability policy for rendered Kubernetes manifests of pairdots.

Each rule looks at every pod template (Pod, Deployment, StatefulSet, DaemonSet,
ReplicaSet, Job, CronJob) and every container in it (init containers included) and
returns violations; an empty list means the manifests pass.

Rules (id: what must hold):
  non-root        effective runAsNonRoot is true and effective runAsUser is set and != 0
  probes          long-running workloads (not Jobs): each regular container has
                  liveness, readiness and startup probes
  limits          each container sets resources.limits.cpu and resources.limits.memory
  image-tag       each image has a non-empty tag other than "latest", or a digest
  read-only-root  effective readOnlyRootFilesystem is true
  no-escalation   allowPrivilegeEscalation is false and privileged is not true
  drop-all        capabilities.drop contains ALL and capabilities.add is empty
  seccomp         effective seccompProfile.type is RuntimeDefault or Localhost

"Effective" follows Kubernetes: the container securityContext wins over the pod's.

    python deploy/policy.py rendered.yaml [more.yaml ...]   # exit 1 on any violation
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Manifest = Mapping[str, Any]

# Kinds whose pods run until stopped and therefore need probes.
LONG_RUNNING_KINDS = frozenset({"Pod", "Deployment", "StatefulSet", "DaemonSet", "ReplicaSet"})


@dataclass(frozen=True)
class Violation:
    """One failed rule: which rule, which object and container, and what to change."""

    rule: str
    obj: str
    container: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.obj} container {self.container!r}: {self.message}"


@dataclass(frozen=True)
class Container:
    """A container together with the pod it runs in."""

    obj: str  # "Kind/name"
    kind: str
    spec: Mapping[str, Any]  # the container
    pod: Mapping[str, Any]  # the pod spec
    init: bool

    @property
    def name(self) -> str:
        return str(self.spec.get("name", "?"))


def pod_spec(manifest: Manifest) -> Mapping[str, Any] | None:
    """The pod spec inside a workload manifest, or None for other kinds."""
    kind = manifest.get("kind")
    spec = manifest.get("spec") or {}
    if kind == "Pod":
        return spec
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return (spec.get("template") or {}).get("spec") or {}
    if kind == "CronJob":
        job = (spec.get("jobTemplate") or {}).get("spec") or {}
        return (job.get("template") or {}).get("spec") or {}
    return None


def containers(manifests: Iterable[Manifest]) -> Iterator[Container]:
    """Every container (init containers first) of every workload manifest."""
    for manifest in manifests:
        pod = pod_spec(manifest)
        if pod is None:
            continue
        obj = f"{manifest.get('kind')}/{(manifest.get('metadata') or {}).get('name', '?')}"
        for init, key in ((True, "initContainers"), (False, "containers")):
            for spec in pod.get(key) or []:
                yield Container(obj, str(manifest.get("kind")), spec, pod, init)


def _effective(container: Container, key: str) -> Any:
    """A securityContext field as Kubernetes resolves it: container first, then pod."""
    own = container.spec.get("securityContext") or {}
    if key in own:
        return own[key]
    return (container.pod.get("securityContext") or {}).get(key)


def check_non_root(c: Container) -> list[str]:
    problems = []
    if _effective(c, "runAsNonRoot") is not True:
        problems.append("set securityContext.runAsNonRoot: true")
    user = _effective(c, "runAsUser")
    if user is None or int(user) == 0:
        problems.append(f"set securityContext.runAsUser to a non-zero uid (got {user!r})")
    return problems


def check_probes(c: Container) -> list[str]:
    if c.init or c.kind not in LONG_RUNNING_KINDS:
        return []
    if c.kind == "Pod" and c.pod.get("restartPolicy", "Always") != "Always":
        return []  # a run-to-completion Pod (e.g. a `helm test` hook) is not long-running
    missing = [p for p in ("livenessProbe", "readinessProbe", "startupProbe")
               if not c.spec.get(p)]
    return [f"add {', '.join(missing)}"] if missing else []


def check_limits(c: Container) -> list[str]:
    limits = (c.spec.get("resources") or {}).get("limits") or {}
    missing = [r for r in ("cpu", "memory") if not limits.get(r)]
    return [f"set resources.limits.{r}" for r in missing]


def image_tag(image: str) -> tuple[str, str]:
    """Split an image reference into (tag, digest); either may be ""."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]  # a registry host:port has its colon before a slash
    tag = last.rsplit(":", 1)[1] if ":" in last else ""
    return tag, digest


def check_image_tag(c: Container) -> list[str]:
    image = str(c.spec.get("image") or "")
    if not image:
        return ["set an image"]
    tag, digest = image_tag(image)
    if digest:
        return []
    if not tag:
        return [f"pin the image {image!r} with a tag or digest (no tag means latest)"]
    if tag == "latest":
        return [f"pin the image {image!r} to a version instead of 'latest'"]
    return []


def check_read_only_root(c: Container) -> list[str]:
    if _effective(c, "readOnlyRootFilesystem") is not True:
        return ["set securityContext.readOnlyRootFilesystem: true (mount emptyDirs for writes)"]
    return []


def check_no_escalation(c: Container) -> list[str]:
    own = c.spec.get("securityContext") or {}
    problems = []
    if own.get("allowPrivilegeEscalation") is not False:
        problems.append("set securityContext.allowPrivilegeEscalation: false")
    if own.get("privileged") is True:
        problems.append("remove securityContext.privileged: true")
    return problems


def check_drop_all(c: Container) -> list[str]:
    caps = (c.spec.get("securityContext") or {}).get("capabilities") or {}
    problems = []
    if "ALL" not in (caps.get("drop") or []):
        problems.append("set securityContext.capabilities.drop: [ALL]")
    if caps.get("add"):
        problems.append(f"remove securityContext.capabilities.add {caps['add']!r}")
    return problems


def check_seccomp(c: Container) -> list[str]:
    profile = _effective(c, "seccompProfile") or {}
    if profile.get("type") not in {"RuntimeDefault", "Localhost"}:
        return ["set securityContext.seccompProfile.type: RuntimeDefault"]
    return []


RULES: dict[str, Callable[[Container], list[str]]] = {
    "non-root": check_non_root,
    "probes": check_probes,
    "limits": check_limits,
    "image-tag": check_image_tag,
    "read-only-root": check_read_only_root,
    "no-escalation": check_no_escalation,
    "drop-all": check_drop_all,
    "seccomp": check_seccomp,
}


def check(manifests: Iterable[Manifest], rules: Sequence[str] | None = None) -> list[Violation]:
    """Run the named rules (all by default) over every container of the manifests."""
    selected = list(RULES) if rules is None else list(rules)
    unknown = [r for r in selected if r not in RULES]
    if unknown:
        raise ValueError(f"unknown policy rules {unknown}; choose from {sorted(RULES)}")
    return [Violation(rule, c.obj, c.name, message)
            for c in containers(manifests)
            for rule in selected
            for message in RULES[rule](c)]


def workload_count(manifests: Iterable[Manifest]) -> int:
    """How many manifests carry a pod template (a policy run over none proves nothing)."""
    return sum(1 for m in manifests if pod_spec(m) is not None)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: check multi-document YAML files; print violations; exit 1 if any."""
    import yaml

    paths = list(sys.argv[1:] if argv is None else argv)
    if not paths:
        print("usage: python deploy/policy.py MANIFEST.yaml [...]", file=sys.stderr)
        return 2
    manifests = [doc for p in paths
                 for doc in yaml.safe_load_all(Path(p).read_text(encoding="utf-8")) if doc]
    if workload_count(manifests) == 0:
        print("no workload (pod template) found in the input", file=sys.stderr)
        return 2
    violations = check(manifests)
    for v in violations:
        print(v)
    print(f"policy: {workload_count(manifests)} workloads, {len(violations)} violations")
    return 1 if violations else 0


if __name__ == "__main__":
    raise SystemExit(main())
