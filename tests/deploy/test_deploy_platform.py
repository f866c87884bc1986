"""Issue 16 item 5 in the chart (rendered offline by real Helm): values.schema.json rejects
typos and wrong types; the worker Deployment and the PostgreSQL URL Secret; --no-worker on the
serving pods; the default GPU toleration; readiness on the health name that reflects refused
bundles; the reload and tracing flags reach ServerConfig; the `helm test` hook; and the
Grafana dashboard queries exactly the metric families the server registers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "pairdots-dashboard.json"
PG = "postgresql://pairdots:secret@postgres.db:5432/pairdots"

Objects = list[dict[str, Any]]


def component(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind
             and o["metadata"]["labels"].get("app.kubernetes.io/component") == name]
    assert len(found) == 1, [(o["kind"], o["metadata"]["name"]) for o in objects]
    return found[0]


def container(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]
    return dict(spec["containers"][0])


@pytest.fixture(scope="module")
def with_worker(render: ModuleType) -> Objects:
    objects: Objects = render.render_manifests(
        {"jobs": {"db": PG}, "worker": {"enabled": True}}, release="pd", namespace="ml")
    return objects


@pytest.mark.parametrize(("override", "message"), [
    ({"sever": {"port": 1}}, "sever"),  # a typo of a top-level key
    ({"server": {"watchIntervalSecond": 5}}, "watchIntervalSecond"),  # a typo below
    ({"server": {"port": "50051x"}}, "port"),
    ({"server": {"port": 70000}}, "port"),
    ({"telemetry": {"sampleRatio": 2}}, "sampleRatio"),
    ({"jobs": {"db": "mysql://x"}}, "db"),
    ({"worker": {"device": "tpu"}}, "device"),
])
def test_schema_rejects_bad_values(render: ModuleType, override: dict[str, Any],
                                   message: str) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmValuesError, match=message):
        render.render_manifests(override)


def test_schema_accepts_the_defaults_and_all_on(rendered: dict[str, Objects]) -> None:
    assert rendered["default"] and rendered["all-on"]
    schema = json.loads((DEPLOY / "helm" / "pairdots" / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False
    import yaml

    defaults = yaml.safe_load((DEPLOY / "helm" / "pairdots" / "values.yaml").read_text())
    assert set(schema["properties"]) == set(defaults)  # every value is described


def test_worker_deployment_and_job_store_secret(with_worker: Objects) -> None:
    secret = component(with_worker, "Secret", "jobs-db")
    assert secret["stringData"] == {"url": PG}
    worker = component(with_worker, "Deployment", "worker")
    c = container(worker)
    assert c["args"][:2] == ["worker", "--bundles=/bundles"]
    assert "--jobs-db=$(PAIRDOTS_JOBS_DB_URL)" in c["args"]
    env = {e["name"]: e for e in c["env"]}
    ref = env["PAIRDOTS_JOBS_DB_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": secret["metadata"]["name"], "key": "url"}
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1  # its own GPU request
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        worker["spec"]["template"]["spec"]["tolerations"]
    server = container(component(with_worker, "Deployment", "server"))
    assert "--no-worker" in server["args"] and "--jobs-db=$(PAIRDOTS_JOBS_DB_URL)" in server["args"]
    assert {e["name"] for e in server["env"]} >= {"PAIRDOTS_JOBS_DB_URL"}


def test_existing_secret_and_sqlite_default(render: ModuleType,
                                            rendered: dict[str, Objects]) -> None:
    objects = rendered["all-on"]  # jobs.existingSecret: no Secret is created
    assert not [o for o in objects if o["kind"] == "Secret"]
    server = container(component(objects, "Deployment", "server"))
    ref = {e["name"]: e for e in server["env"]}["PAIRDOTS_JOBS_DB_URL"]["valueFrom"]
    assert ref["secretKeyRef"]["name"] == "pairdots-jobs-db"
    default = container(component(rendered["default"], "Deployment", "server"))
    assert "--jobs-db=/var/lib/pairdots/jobs.db" in default["args"]
    assert "--no-worker" not in default["args"]
    assert not [o for o in rendered["default"]
                if o["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def test_worker_without_a_shared_store_is_refused(render: ModuleType) -> None:
    import helm_python

    with pytest.raises(helm_python.HelmRenderError, match="worker.enabled needs a shared job store"):
        render.render_manifests({"worker": {"enabled": True}})


def test_default_gpu_toleration_and_readiness_name(rendered: dict[str, Objects]) -> None:
    from pairdots_server.rpc.health import SERVICE_NAME

    pod = component(rendered["default"], "Deployment", "server")["spec"]["template"]["spec"]
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    c = container(component(rendered["default"], "Deployment", "server"))
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME  # NOT_SERVING if refused
    assert c["livenessProbe"]["grpc"]["service"] == ""  # a restart fixes no refused bundle


def test_reload_and_tracing_flags_reach_the_server_config(rendered: dict[str, Objects]) -> None:
    from pairdots_server.cli.main import build_parser, server_config

    c = container(component(rendered["all-on"], "Deployment", "server"))
    args = [a for a in c["args"] if a != "--no-worker"]  # the worker flag arrives with jobs
    config = server_config(build_parser().parse_args(args))
    assert config.watch_interval_s == 15
    assert config.telemetry.otlp_endpoint == "http://otel-collector.observability:4317"
    assert config.telemetry.sample_ratio == 0.25 and config.telemetry.otlp_insecure
    default = container(component(rendered["default"], "Deployment", "server"))
    config = server_config(build_parser().parse_args(default["args"]))
    assert config.watch_interval_s == 30 and not config.telemetry.enabled


def test_helm_test_hook_checks_health_and_explains(rendered: dict[str, Objects]) -> None:
    pod = component(rendered["default"], "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    c = container(pod)
    script = c["args"][0]
    assert 'service="pairdots.v1.PairdotsService"' in script
    (explain,) = [line for line in script.splitlines() if line.startswith("pairdots explain")]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PAIRDOTS_ADDRESS"] == "pd-pairdots:50051"
    assert env["PAIRDOTS_TEST_HEALTH_ADDRESS"] == "pd-pairdots:50051"
    from pairdots_server.cli.main import build_parser

    argv = explain.split(">")[0].replace('"$PAIRDOTS_TEST_TEXT"', "text") \
        .replace('"$PAIRDOTS_ADDRESS"', "pd:1").split()[1:]
    parsed = build_parser().parse_args(argv)  # the CLI accepts the test's command line
    assert parsed.json and parsed.timeout == 300
    # with TLS or auth the hook would need client credentials: not rendered
    assert not [o for o in rendered["all-on"] if o["kind"] == "Pod"]


def _families() -> set[str]:
    from pairdots_server.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
    names.add("pairdots_gpu_memory_bytes")  # registered only where a GPU is visible
    return names


def test_dashboard_queries_every_metric_family() -> None:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set()
    for expr in exprs:
        for name in re.findall(r"\bpairdots_[a-z_]+", expr):
            used.add(re.sub(r"_(total|bucket|count|sum)$", "", name))
    families = _families()
    assert used <= families, f"queries name unknown families: {sorted(used - families)}"
    assert families <= used, f"families without a panel: {sorted(families - used)}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "pairdots-overview"
