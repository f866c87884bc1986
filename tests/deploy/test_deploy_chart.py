"""The Helm chart renders (real Helm, offline), validates against strict Kubernetes
schemas, and wires the pieces the deployment contract needs."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate
import pytest

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "pairdots"
# Kubernetes versions every rendered object is validated against (strict schemas):
# 1.33 and the newest the installed kubernetes-validate ships (1.37 with 1.37.0).
KUBE_VERSIONS = tuple(dict.fromkeys(("1.33", kubernetes_validate.utils.latest_version())))

Objects = list[dict[str, Any]]


def by_kind(objects: Objects, kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: Objects, kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


def server_deployment(objects: Objects) -> dict[str, Any]:
    """The serving Deployment (the worker Deployment is component "worker")."""
    found = [o for o in by_kind(objects, "Deployment")
             if o["metadata"]["labels"].get("app.kubernetes.io/component") == "server"]
    assert len(found) == 1, [o["metadata"]["name"] for o in by_kind(objects, "Deployment")]
    return found[0]


def server_container(objects: Objects) -> dict[str, Any]:
    pod = server_deployment(objects)["spec"]["template"]["spec"]
    (server,) = [c for c in pod["containers"] if c["name"] == "server"]
    return server


def validate_object(obj: dict[str, Any], version: str) -> None:
    """Strict schema validation; CRDs (no bundled schema) get their metadata validated."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        assert obj["apiVersion"] == "monitoring.coreos.com/v1", (
            f"no schema for {obj['apiVersion']}/{obj['kind']}: only the ServiceMonitor CRD "
            "is expected to lack one")
        # The CRD's spec has no bundled schema; its ObjectMeta is a core type, so validate
        # it by wrapping it in a ConfigMap (strict: unknown fields rejected).
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap",
                                      "metadata": obj["metadata"]}, version, strict=True)


def test_helm_lint_strict_passes() -> None:
    import helm_python

    report = helm_python.lint(CHART, strict=True, kube_version="v1.33.0")
    errors = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert report["total_charts_linted"] == 1
    assert errors == [], errors


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_rendered_object_validates_strictly(rendered: dict[str, Objects],
                                                  version: str) -> None:
    for case, objects in rendered.items():
        assert objects, f"case {case} rendered nothing"
        for obj in objects:
            try:
                validate_object(obj, version)
            except kubernetes_validate.ValidationError as e:  # pragma: no cover - message
                pytest.fail(f"{case}: {obj['kind']}/{obj['metadata']['name']} invalid for "
                            f"Kubernetes {version} at {list(e.path)}: {e.message}")


def test_strict_validation_can_fail(rendered: dict[str, Objects]) -> None:
    """The validator rejects an unknown field and a wrong type (so the test above can fail)."""
    deployment = server_deployment(rendered["default"])
    bad_field = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_field, KUBE_VERSIONS[0], strict=True)
    bad_type = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_type, KUBE_VERSIONS[0], strict=True)


def test_default_release_objects(rendered: dict[str, Objects]) -> None:
    kinds = sorted(o["kind"] for o in rendered["default"])
    # the Pod is the `helm test` hook (health + one Explain)
    assert kinds == ["Deployment", "Pod", "PodDisruptionBudget", "Service", "ServiceAccount"]


def test_all_on_renders_every_kind(rendered: dict[str, Objects]) -> None:
    kinds = {o["kind"] for o in rendered["all-on"]}
    assert kinds == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "ServiceMonitor", "NetworkPolicy",
                     "PersistentVolumeClaim", "Job"}
    assert len(by_kind(rendered["all-on"], "Service")) == 2  # + headless
    assert len(by_kind(rendered["all-on"], "Job")) == 2  # build + merge
    assert len(by_kind(rendered["all-on"], "Deployment")) == 2  # server + worker


def test_server_probes_are_native_grpc_with_a_startup_budget(rendered: dict[str, Objects]
                                                             ) -> None:
    server = server_container(rendered["default"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["grpc"]["port"] == 50051
    startup = server["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] == 600  # 10 min to load
    # With TLS the kubelet (which cannot speak TLS) probes the plaintext health port.
    tls_server = server_container(rendered["all-on"])
    assert all(tls_server[p]["grpc"]["port"] == 50052
               for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    assert "--health-port=50052" in tls_server["args"]


def test_server_args_follow_the_cli_contract(rendered: dict[str, Objects]) -> None:
    args = server_container(rendered["default"])["args"]
    assert args[0] == "serve"
    for expected in ("--bundles=/bundles", "--host=0.0.0.0", "--port=50051",
                     "--metrics-port=9090", "--jobs-db=/var/lib/pairdots/jobs.db"):
        assert expected in args
    assert not any(a.startswith(("--tls", "--auth", "--reflection")) for a in args)
    all_on = server_container(rendered["all-on"])["args"]
    for expected in ("--tls-cert=/etc/pairdots/tls/tls.crt", "--tls-key=/etc/pairdots/tls/tls.key",
                     "--tls-client-ca=/etc/pairdots/tls/ca.crt",
                     "--auth-tokens-file=/etc/pairdots/auth/tokens", "--reflection",
                     "--device=cuda"):
        assert expected in all_on


def test_volumes_bundles_read_only_and_writable_scratch(rendered: dict[str, Objects]) -> None:
    pod = server_deployment(rendered["default"])["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in server_container(rendered["default"])["volumeMounts"]}
    assert mounts["/bundles"].get("readOnly") is True
    for writable in ("/tmp", "/var/cache/pairdots", "/var/lib/pairdots"):
        assert not mounts[writable].get("readOnly")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["bundles"]["persistentVolumeClaim"] == {"claimName": "pairdots-bundles",
                                                           "readOnly": True}
    env = {e["name"]: e.get("value") for e in server_container(rendered["default"])["env"]}
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"].startswith("/var/cache/pairdots")
    assert env["TMPDIR"] == "/tmp"


def test_fetch_init_container_fills_an_empty_dir(rendered: dict[str, Objects]) -> None:
    pod = server_deployment(rendered["all-on"])["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    assert fetch["image"] == "amazon/aws-cli:2.27.49"
    assert "aws s3 sync" in fetch["args"][0]
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["BUNDLES_URI"] == "s3://example-ml-bundles/pairdots/bundles"
    assert fetch["envFrom"] == [{"secretRef": {"name": "pairdots-fetch-credentials"}}]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["bundles"]
    assert {"name": "bundles", "mountPath": "/bundles"} in fetch["volumeMounts"]


def test_gpu_request_and_scheduling(rendered: dict[str, Objects]) -> None:
    assert "nvidia.com/gpu" not in server_container(rendered["default"])["resources"]["limits"]
    server = server_container(rendered["all-on"])
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = server_deployment(rendered["all-on"])["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_service_ports_and_app_protocol(rendered: dict[str, Objects]) -> None:
    service = one(rendered["default"], "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    assert ports["metrics"]["port"] == 9090
    deployment = server_deployment(rendered["default"])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    headless = [s for s in by_kind(rendered["all-on"], "Service")
                if s["spec"].get("clusterIP") == "None"]
    assert len(headless) == 1


def test_service_monitor_scrapes_the_metrics_port(rendered: dict[str, Objects]) -> None:
    objects = rendered["all-on"]
    monitor = one(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selected = [s for s in by_kind(objects, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items()
                <= s["metadata"]["labels"].items()
                and "metrics" in {p["name"] for p in s["spec"]["ports"]}]
    assert selected, "the ServiceMonitor selects no Service with a metrics port"
    assert monitor["spec"]["namespaceSelector"]["matchNames"] == ["ml"]


def test_hpa_pdb_and_network_policy(rendered: dict[str, Objects]) -> None:
    objects = rendered["all-on"]
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == server_deployment(objects)["metadata"]["name"]
    assert "replicas" not in server_deployment(objects)["spec"]  # the HPA owns it
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Resource", "Pods"]
    assert one(objects, "PodDisruptionBudget")["spec"] == {
        "maxUnavailable": 1, "selector": one(objects, "PodDisruptionBudget")["spec"]["selector"]}
    assert one(rendered["cpu-pvc-digest"], "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    netpol = one(objects, "NetworkPolicy")
    assert netpol["spec"]["policyTypes"] == ["Ingress", "Egress"]
    ingress_ports = [p["port"] for rule in netpol["spec"]["ingress"] for p in rule["ports"]]
    assert ingress_ports == ["grpc", "http", "metrics", "health"]


def test_http_port_is_off_by_default_and_wired_when_set(rendered: dict[str, Objects]) -> None:
    """server.httpPort: no HTTP/JSON listener by default; when set, the flag reaches
    `pairdots serve`, the container names the port and the Service exposes it."""
    default = server_container(rendered["default"])
    assert not any(a.startswith("--http-port") for a in default["args"])
    assert "http" not in [p["name"] for p in default["ports"]]
    assert "http" not in [p["name"] for p in one(rendered["default"], "Service")["spec"]["ports"]]
    objects = rendered["all-on"]
    server = server_container(objects)
    assert "--http-port=8080" in server["args"]
    assert {"name": "http", "containerPort": 8080, "protocol": "TCP"} in server["ports"]
    services = [s for s in by_kind(objects, "Service") if not s["metadata"]["name"].endswith(
        "-headless")]
    (http,) = [p for s in services for p in s["spec"]["ports"] if p["name"] == "http"]
    assert http["port"] == 8080 and http["targetPort"] == "http"
    assert http["appProtocol"] == ("https" if objects_tls(objects) else "http")


def objects_tls(objects: Objects) -> bool:
    return any(a.startswith("--tls-cert") for a in server_container(objects)["args"])


def test_service_account_token_not_mounted(rendered: dict[str, Objects]) -> None:
    for case in ("default", "all-on"):
        assert one(rendered[case], "ServiceAccount")["automountServiceAccountToken"] is False
        for obj in rendered[case]:
            if obj["kind"] in {"Deployment", "Job"}:
                assert obj["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_tls_and_token_secrets_are_mounted(rendered: dict[str, Objects]) -> None:
    pod = server_deployment(rendered["all-on"])["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "pairdots-tls"
    assert volumes["auth"]["secret"]["secretName"] == "pairdots-tokens"
    assert volumes["auth"]["secret"]["items"] == [{"key": "tokens", "path": "tokens"}]
    mounts = {m["name"]: m for m in server_container(rendered["all-on"])["volumeMounts"]}
    assert mounts["tls"]["readOnly"] and mounts["auth"]["readOnly"]


def test_index_build_is_an_indexed_job_then_a_merge(rendered: dict[str, Objects]) -> None:
    jobs = {j["metadata"]["labels"]["app.kubernetes.io/component"]: j
            for j in by_kind(rendered["all-on"], "Job")}
    build, merge = jobs["index-build"], jobs["index-merge"]
    assert build["spec"]["completionMode"] == "Indexed"
    assert build["spec"]["completions"] == 8 and build["spec"]["parallelism"] == 4
    script = build["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert '--shard="$JOB_COMPLETION_INDEX"' in script and "--num-shards=8" in script
    assert "pairdots index build" in script and '--out="/parts/2025-01-a-n8"' in script
    assert "--grad-batch-size=128" in script and '"--index-seed=0"' in script
    merge_args = merge["spec"]["template"]["spec"]["containers"][0]["args"]
    assert merge_args == ["index", "merge", "--bundle=/bundles/sst2",
                          "--parts=/parts/2025-01-a-n8"]
    wait = merge["spec"]["template"]["spec"]["initContainers"][0]["args"][0]
    assert "-ge 8" in wait
    # hooks: Helm runs the build (weight 0) to completion before the merge (weight 10)
    assert build["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    assert int(build["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        merge["metadata"]["annotations"]["helm.sh/hook-weight"])
    # the merge writes the bundle's index/: bundles read-write there, read-only in shards
    build_mounts = {m["name"]: m for m in
                    build["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    merge_mounts = {m["name"]: m for m in
                    merge["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    assert build_mounts["bundles"]["readOnly"] is True
    assert not merge_mounts["bundles"].get("readOnly")
    parts_pvc = [p for p in by_kind(rendered["all-on"], "PersistentVolumeClaim")
                 if p["metadata"]["labels"]["app.kubernetes.io/component"] == "index-build"]
    assert parts_pvc[0]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_index_only_release_with_plain_jobs(rendered: dict[str, Objects]) -> None:
    objects = rendered["index-only-plain"]
    assert sorted(o["kind"] for o in objects) == ["Job", "Job", "ServiceAccount"]
    for job in by_kind(objects, "Job"):
        assert "annotations" not in job["metadata"]  # plain resources, not hooks
        claims = [v["persistentVolumeClaim"]["claimName"]
                  for v in job["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]
        assert "shared-rwx" in claims
    build = next(j for j in by_kind(objects, "Job") if j["spec"].get("completionMode"))
    assert build["spec"]["completions"] == build["spec"]["parallelism"] == 4


def test_persistent_state_uses_a_kept_claim(rendered: dict[str, Objects]) -> None:
    objects = rendered["persistent-state"]
    state = [p for p in by_kind(objects, "PersistentVolumeClaim")
             if p["metadata"]["labels"]["app.kubernetes.io/component"] == "state"]
    assert len(state) == 1
    assert state[0]["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    volumes = {v["name"]: v for v in
               server_deployment(objects)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == state[0]["metadata"]["name"]


def test_image_by_digest_and_default_tag(rendered: dict[str, Objects]) -> None:
    assert server_container(rendered["default"])["image"] == "ghcr.io/pairdots/pairdots:0.1.0"
    assert server_container(rendered["cpu-pvc-digest"])["image"] == (
        "ghcr.io/pairdots/pairdots@sha256:" + "a" * 64)


@pytest.mark.parametrize(("override", "message"), [
    ({"image": {"tag": "latest"}}, "image.tag must be a pinned version"),
    ({"tls": {"enabled": True, "existingSecret": "s"}}, "tls.enabled needs server.healthPort"),
    ({"tls": {"enabled": True}, "server": {"healthPort": 50052}}, "tls.existingSecret"),
    ({"auth": {"enabled": True}}, "auth.existingSecret"),
    ({"state": {"persistence": {"enabled": True}}}, "needs replicaCount=1"),
    ({"bundles": {"source": "s3"}}, "bundles.source must be"),
    ({"bundles": {"pvc": {"claimName": ""}}}, "bundles.pvc.claimName"),
    ({"server": {"device": "tpu"}}, "server.device must be"),
    ({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}},
     "needs a metric"),
])
def test_inconsistent_values_fail_with_an_actionable_message(
        render: ModuleType, override: dict[str, Any], message: str) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match=message):
        render.render_manifests(override)


def test_notes_mention_endpoints(render: ModuleType, all_on_values: dict[str, Any]) -> None:
    notes = render.render_templates(all_on_values, release="pd", namespace="ml")
    text = notes["pairdots/templates/NOTES.txt"]
    assert "pairdots-all-on.ml.svc:50051" in text and "/metrics" in text
    assert "--timeout" in text  # hook-mode index build needs a long helm timeout


def test_render_cli_prints_the_manifests(render: ModuleType,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert render.main(["--set", "replicaCount=3", "--set", "image.tag=1.2.3"]) == 0
    docs = [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":1.2.3")
