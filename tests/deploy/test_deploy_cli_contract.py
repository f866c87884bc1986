"""The command lines the chart and gpu-smoke.sh run are accepted by the real `pairdots`
argument parser (pairdots_server.cli.main.build_parser), so deploy/ cannot drift from the CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "deploy" / "gpu-smoke.sh"

# Flags the chart emits for options the CLI does not offer yet (see deploy/README.md): none
# since `serve --no-worker` and `pairdots worker` landed with the shared job store.
KNOWN_GAPS: set[str] = set()


@pytest.fixture(scope="module")
def parser() -> Any:
    from pairdots_server.cli.main import (
        build_parser,  # needs PYTHONPATH=server:client or an install
    )

    return build_parser()


def unknown_flags(parser: Any, argv: list[str]) -> set[str]:
    """Flags the parser does not know; argparse errors (bad values) raise SystemExit."""
    _, unknown = parser.parse_known_args(argv)
    return {arg.split("=", 1)[0] for arg in unknown}


def containers(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for o in objects if o["kind"] in {"Deployment", "Job"}
            for c in o["spec"]["template"]["spec"]["containers"]]


def script_commands(script: str) -> list[list[str]]:
    """`pairdots ...` command lines inside a shell script, variables replaced by samples."""
    script = re.sub(r"\\\n\s*", " ", script)
    script = re.sub(r"\$\{\w+:-\}", "", script)
    script = re.sub(r"\$JOB_COMPLETION_INDEX|\$\{?\w+\}?", "0", script)
    commands = []
    for line in script.splitlines():
        line = line.strip()
        if line.startswith("pairdots "):
            words = shlex.split(line)
            cut = [i for i, w in enumerate(words) if w in {"|", "2>&1", "&"} or w.startswith(">")]
            commands.append(words[1:cut[0]] if cut else words[1:])
    return commands


@pytest.mark.parametrize("case", ["default", "all-on", "persistent-state", "cpu-pvc-digest"])
def test_server_args_parse(parser: Any, rendered: dict[str, list[dict[str, Any]]],
                           case: str) -> None:
    (server,) = [c for c in containers(rendered[case]) if c["name"] == "server"]
    assert unknown_flags(parser, server["args"]) <= KNOWN_GAPS


def test_health_port_reaches_the_server_config(parser: Any,
                                              rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Under TLS the kubelet probes the plaintext port the chart passes as --health-port; the
    parsed flags must turn into ServerConfig.health_port (the port create_server listens on)."""
    from pairdots_server.cli.main import server_config

    (server,) = [c for c in containers(rendered["all-on"]) if c["name"] == "server"]
    probe_port = server["readinessProbe"]["grpc"]["port"]
    args = [a for a in server["args"] if a.split("=", 1)[0] not in KNOWN_GAPS]
    config = server_config(parser.parse_args(args))
    assert config.tls_cert is not None and config.health_port == probe_port != config.port


def test_http_port_reaches_the_server_config(parser: Any,
                                            rendered: dict[str, list[dict[str, Any]]]) -> None:
    """The chart's --http-port (server.httpPort, named container port `http`) becomes
    ServerConfig.http_port, where create_server starts the HTTP/JSON gateway; off by default."""
    from pairdots_server.cli.main import server_config

    (server,) = [c for c in containers(rendered["all-on"]) if c["name"] == "server"]
    (http,) = [p["containerPort"] for p in server["ports"] if p["name"] == "http"]
    assert server_config(parser.parse_args(server["args"])).http_port == http
    (default,) = [c for c in containers(rendered["default"]) if c["name"] == "server"]
    assert server_config(parser.parse_args(default["args"])).http_port is None


def test_index_job_commands_parse(parser: Any, rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen = []
    for case in ("all-on", "index-only-plain"):
        for container in containers(rendered[case]):
            if container["name"] == "index-build":
                (argv,) = script_commands(container["args"][0])
            elif container["name"] == "index-merge":
                argv = container["args"]
            else:
                continue
            assert unknown_flags(parser, argv) == set(), argv
            seen.append(argv[:2])
    assert seen.count(["index", "build"]) == 2 and seen.count(["index", "merge"]) == 2


def test_gpu_smoke_commands_parse(parser: Any) -> None:
    commands = script_commands(SMOKE.read_text())
    assert [c[0] for c in commands] == ["prepare", "serve", "explain"]
    for argv in commands:
        assert unknown_flags(parser, argv) == set(), argv


def test_unknown_flag_is_detected(parser: Any) -> None:
    assert unknown_flags(parser, ["serve", "--no-such-flag=1"]) == {"--no-such-flag"}


def test_worker_and_no_worker_args_parse(parser: Any, render: Any) -> None:
    """With a shared job store and the worker on, the serving pods' `--no-worker` and the
    worker Deployment's `pairdots worker ...` arguments parse with the real CLI and turn into
    a queue-only server config and a worker command."""
    from pairdots_server.cli.main import server_config

    objects = render.render_manifests(
        {"jobs": {"db": "postgresql://pd:secret@postgres:5432/pairdots"},
         "worker": {"enabled": True}}, release="pd", namespace="ml")
    by_name = {c["name"]: c for c in containers(objects)}
    server = by_name["server"]
    assert unknown_flags(parser, server["args"]) == set()
    config = server_config(parser.parse_args(server["args"]))
    assert config.run_jobs is False
    (worker,) = [c for name, c in by_name.items() if name != "server"]
    args = parser.parse_args(worker["args"])
    assert worker["args"][0] == "worker" and args.fn.__name__ != "cmd_serve"
    assert unknown_flags(parser, worker["args"]) == set()
