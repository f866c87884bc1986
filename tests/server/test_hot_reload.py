"""Models without restarts (issue 16 item 3): the server watches its bundle root and loads new
or changed bundles, verified, without dropping calls in flight; removed bundles are unlisted;
a corrupted bundle is refused and grpc.health.v1 says so (per-model names
`pairdots.v1.PairdotsService/<model>`, readiness on `pairdots.v1.PairdotsService`).

The drop-in test runs a real `pairdots serve` process; the others a real server in-process
with the watcher off, scanning with `App.reload()` so each step is deterministic (the watcher
is the same call on a timer). Waits are liveness bounds, not timing assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from pdserver_util import RunningServer, free_port, health_status, start_server, wait_until

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg
from pairdots_server.config import ServerConfig
from pairdots_server.rpc.health import NOT_SERVING, SERVICE_NAME, SERVING, model_service_name

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
TEXT = "i loved it , a great movie !"


def copy_bundle(src: Path, root: Path, name: str) -> Path:
    """Copy bundle `src` into `root` as model `name` (the manifest's name; the manifest is
    not in its own file list, so the copy still verifies)."""
    dest = root / name
    shutil.copytree(src, dest)
    manifest = dest / "manifest.json"
    data = json.loads(manifest.read_text())
    data["name"] = name
    manifest.write_text(json.dumps(data, indent=2))
    return dest


def tamper(bundle: Path) -> None:
    """Change train.jsonl after the manifest recorded its SHA-256."""
    with open(bundle / "train.jsonl", "a") as f:
        f.write('{"text": "tampered", "label": 0}\n')


def listed(address: str) -> list[str]:
    with grpc.insecure_channel(address) as ch:
        resp = pbg.PairdotsServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
    return [m.name.removeprefix("models/") for m in resp.models]  # the bare ids


def explain(address: str, model: str) -> pb.ExplainResponse:
    with grpc.insecure_channel(address) as ch:
        req = pb.ExplainRequest(model=model, text=TEXT, top_words=1, examples_per_word=1)
        return pbg.PairdotsServiceStub(ch).Explain(req, timeout=120)


def health_of(address: str, service: str) -> int:
    return health_status(address, service=service)


# -- a real `pairdots serve` process ---------------------------------------------------------


def test_bundle_dropped_into_a_running_server_is_listed_and_served(
    bundle_root: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    copy_bundle(bundle_root / "tiny", root, "tiny")
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "server"), str(REPO / "client")]))
    log_path = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "pairdots_server.cli", "serve", f"--bundles={root}",
           f"--port={port}", "--device=cpu", "--watch-interval-s=0.5",
           f"--jobs-db={tmp_path / 'jobs.sqlite3'}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    address = f"127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return health_status(address, timeout_s=1) == SERVING
            except grpc.RpcError:
                return False

        assert wait_until(up, 180, 0.2), log_path.read_text()
        assert listed(address) == ["tiny"]
        with pytest.raises(grpc.RpcError) as info:
            explain(address, "fresh")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # copied in the usual way (not atomically): the watcher waits until two scans agree
        start = time.monotonic()
        copy_bundle(bundle_root / "tiny", root, "fresh")
        assert wait_until(lambda: "fresh" in listed(address), 60, 0.1), log_path.read_text()
        seconds = time.monotonic() - start
        print(f"new bundle listed {seconds:.2f} s after the copy finished (interval 0.5 s)")
        answer = explain(address, "fresh")
        assert answer.model == "models/fresh" and answer.explanations[0].salient_words
        assert health_of(address, model_service_name("fresh")) == SERVING
        assert health_of(address, SERVICE_NAME) == SERVING

        shutil.rmtree(root / "fresh")
        assert wait_until(lambda: listed(address) == ["tiny"], 60, 0.1), log_path.read_text()
        assert health_of(address, model_service_name("fresh")) == NOT_SERVING
        assert proc.poll() is None  # no restart happened
    finally:
        proc.terminate()
        proc.wait(60)
    text = log_path.read_text()
    assert "loaded model 'fresh'" in text, text


# -- in-process, scanning on demand -----------------------------------------------------------


@pytest.fixture()
def reloading(bundle_root: Path, tmp_path: Path) -> Iterator[RunningServer]:
    root = tmp_path / "root"
    copy_bundle(bundle_root / "tiny", root, "tiny")
    running = start_server(ServerConfig(bundles=root, port=0, jobs_db=tmp_path / "j.sqlite3",
                                        watch_interval_s=0, max_workers=2))
    yield running
    running.stop()


def scan(running: RunningServer, times: int = 2) -> None:
    """What the watcher does, `times` scans (a new fingerprint loads on the second)."""
    for _ in range(times):
        asyncio.run_coroutine_threadsafe(running.app.reload(), running.loop).result(120)


def test_corrupted_bundle_is_refused_and_health_says_so(reloading: RunningServer) -> None:
    address, root = reloading.address, reloading.root
    assert health_of(address, SERVICE_NAME) == SERVING
    assert health_of(address, model_service_name("tiny")) == SERVING
    bad = copy_bundle(root / "tiny", root, "broken")
    tamper(bad)
    scan(reloading)
    assert listed(address) == ["tiny"]
    errors = reloading.app.registry.errors
    assert list(errors) == [str(bad)] and "train.jsonl" in errors[str(bad)], errors
    assert health_of(address, model_service_name("broken")) == NOT_SERVING
    assert health_of(address, SERVICE_NAME) == NOT_SERVING  # readiness: a bundle is refused
    assert health_of(address, "") == SERVING  # liveness: a restart would not fix it
    assert health_of(address, model_service_name("tiny")) == SERVING
    assert explain(address, "tiny").model == "models/tiny"  # the healthy model still serves
    metrics = reloading.app.metrics
    assert metrics.bad_bundles._value.get() == 1
    assert metrics.reloads.labels("refused")._value.get() == 1

    shutil.rmtree(bad)  # the operator removes it: ready again
    scan(reloading, 1)
    assert reloading.app.registry.errors == {}
    assert health_of(address, SERVICE_NAME) == SERVING


def test_changed_bundle_is_reloaded_without_dropping_the_call_in_flight(
    reloading: RunningServer,
) -> None:
    address, root, registry = reloading.address, reloading.root, reloading.app.registry
    old = registry.get("tiny")
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["answer"] = explain(address, "tiny")
        except grpc.RpcError as exc:
            result["error"] = exc

    # Hold the old model's compute gate: the call is accepted and waits for it (in flight).
    with old.compute.hold():
        t = threading.Thread(target=call)
        t.start()
        assert wait_until(lambda: reloading.app.service.pool.depth == 1, 30)
        # a new version replaces the directory (built aside, renamed into place)
        staged = copy_bundle(root / "tiny", root, ".staged")
        (staged / "manifest.json").write_text(
            (staged / "manifest.json").read_text().replace('"name": ".staged"', '"name": "tiny"'))
        os.rename(root / "tiny", root / ".old")
        os.rename(staged, root / "tiny")
        scan(reloading)
        new = registry.get("tiny")
        assert new is not old  # the registry serves the new version ...
        assert t.is_alive()  # ... while the call still waits for the old one
    t.join(120)
    assert "error" not in result, result
    answer = result["answer"]
    assert isinstance(answer, pb.ExplainResponse) and answer.model == "models/tiny"
    assert reloading.app.metrics.reloads.labels("replaced")._value.get() == 1
    assert explain(address, "tiny").model == "models/tiny"  # and the new version answers


def test_removed_bundle_is_unlisted(reloading: RunningServer) -> None:
    address, root = reloading.address, reloading.root
    copy_bundle(root / "tiny", root, "second")
    scan(reloading, 1)
    assert listed(address) == ["tiny"]  # one scan: not settled yet
    scan(reloading, 1)
    assert listed(address) == ["second", "tiny"]
    shutil.rmtree(root / "second")
    scan(reloading, 1)
    assert listed(address) == ["tiny"]
    with pytest.raises(grpc.RpcError) as info:
        explain(address, "second")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert health_of(address, model_service_name("second")) == NOT_SERVING
    assert health_of(address, SERVICE_NAME) == SERVING
