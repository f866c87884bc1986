"""Faults on a real server: deadlines, client cancellation, a full queue, SIGTERM under load,
and the plaintext health-only port (--health-port).

Liveness bounds (the worker is free again, the process exits) are generous waits, not
performance assertions: the CPU may be shared. A "slow" request is LiSSA with 100,000
iterations × 16 repeats and a tolerance it never reaches — hours of work on the tiny model
(≈ 9 ms per iteration measured) — so only cooperative cancellation can end it quickly.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status
from pdserver_util import (
    RunningServer,
    free_port,
    health_status,
    self_signed,
    start_server,
    wait_until,
)

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pbg
from pairdots_server.config import ServerConfig
from pairdots_server.errors import InvalidArgument

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
TEXT = "i loved it , a great movie !"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS_S = 10.0  # generous bound for "the worker is free again"


def lissa(max_iterations: int, repeats: int = 1) -> pb.ExplainRequest:
    """Explain one word with LiSSA that never meets its tolerance: runs every iteration."""
    solver = pb.SolverOptions(solver=pb.SOLVER_LISSA, max_iterations=max_iterations,
                              repeats=repeats, tolerance=1e-12, batch_size=1)
    return pb.ExplainRequest(
        model="tiny", text=TEXT, top_words=1, examples_per_word=1,
        influence=pb.InfluenceOptions(solver=solver,
                                      token_influence=pb.TOKEN_INFLUENCE_METHOD_NONE),
    )


SLOW = lissa(100_000, repeats=16)
CHEAP = pb.ExplainRequest(model="tiny", text=TEXT, top_words=0)


@pytest.fixture(scope="module")
def limited(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[RunningServer]:
    """One worker, no queue, a plaintext health-only port on a free port."""
    jobs = tmp_path_factory.mktemp("faults") / "jobs.sqlite3"
    running = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=jobs,
                                        max_workers=1, max_queue=0, health_port=0))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def stub(limited: RunningServer) -> Iterator[pbg.PairdotsServiceStub]:
    with grpc.insecure_channel(limited.address) as ch:
        yield pbg.PairdotsServiceStub(ch)


def depth(server: RunningServer) -> int:
    return server.app.service.pool.depth


def start_slow(stub: pbg.PairdotsServiceStub, server: RunningServer) -> Future[Any]:
    """Send SLOW without waiting and return once a worker runs it."""
    assert depth(server) == 0, "a previous test left work running"
    fut: Future[Any] = stub.Explain.future(SLOW, timeout=600)
    assert wait_until(lambda: depth(server) == 1, LIVENESS_S), "the slow request never started"
    return fut


def test_deadline_shorter_than_solve_frees_the_worker(limited: RunningServer,
                                                      stub: pbg.PairdotsServiceStub) -> None:
    assert depth(limited) == 0
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(SLOW, timeout=1.0)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, info.value.details()
    assert wait_until(lambda: depth(limited) == 0, LIVENESS_S), "the worker was not freed"
    print(f"deadline 1.0 s: worker free {time.monotonic() - start - 1.0:.2f} s after it")
    ok = stub.Explain(lissa(5), timeout=120)  # the next request is served, influence and all
    assert ok.explanations[0].salient_words[0].solver.iteration_count >= 1


def test_client_cancellation_stops_the_solve(limited: RunningServer,
                                             stub: pbg.PairdotsServiceStub) -> None:
    fut = start_slow(stub, limited)
    time.sleep(0.3)  # let it get into the solver's iterations
    assert not fut.done()
    assert fut.cancel()
    # depth drops only when the worker thread's job has returned: the solve stopped.
    assert wait_until(lambda: depth(limited) == 0, LIVENESS_S), "cancelled work kept running"
    assert stub.Explain(CHEAP, timeout=60).prediction.label_name in ("negative", "positive")


def test_full_queue_gets_resource_exhausted_with_retry_info(
        limited: RunningServer, stub: pbg.PairdotsServiceStub) -> None:
    fut = start_slow(stub, limited)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(CHEAP, timeout=60)  # cheap, but no worker and max_queue 0
        err = info.value
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
        assert "busy" in (err.details() or "")
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        assert status is not None
        retry, reasons = None, []
        for detail in status.details:
            if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info_msg = error_details_pb2.ErrorInfo()
                detail.Unpack(info_msg)
                reasons.append(info_msg.reason)
        assert retry is not None, "RESOURCE_EXHAUSTED without RetryInfo"
        assert retry.retry_delay.ToTimedelta() > datetime.timedelta(0)
        assert reasons == ["SERVER_BUSY"]
    finally:
        fut.cancel()
    assert wait_until(lambda: depth(limited) == 0, LIVENESS_S)
    assert stub.Explain(CHEAP, timeout=60).prediction.label_name in ("negative", "positive")


# -- the plaintext health-only port ---------------------------------------------------------


def test_health_port_serves_only_health_with_the_same_status(limited: RunningServer) -> None:
    app = limited.app
    assert app.health_port is not None and app.health_port != limited.port
    health_addr = f"127.0.0.1:{app.health_port}"
    assert health_status(health_addr) == SERVING
    with grpc.insecure_channel(health_addr) as ch:  # nothing but health there
        with pytest.raises(grpc.RpcError) as info:
            pbg.PairdotsServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

    def set_serving(serving: bool) -> None:
        asyncio.run_coroutine_threadsafe(app.set_serving(serving), limited.loop).result(10)

    set_serving(False)
    try:
        assert health_status(health_addr) == NOT_SERVING
        assert health_status(limited.address) == NOT_SERVING
    finally:
        set_serving(True)
    assert health_status(health_addr) == SERVING == health_status(limited.address)


def test_tls_server_is_probed_on_the_plaintext_health_port(bundle_root: Path,
                                                           tmp_path: Path) -> None:
    """The Kubernetes case: gRPC over TLS, kubelet probes (plaintext) on --health-port."""
    cert, key = self_signed(tmp_path)
    running = start_server(ServerConfig(bundles=bundle_root, port=0, tls_cert=cert, tls_key=key,
                                        health_port=0, jobs_db=tmp_path / "jobs.sqlite3"))
    try:
        assert running.app.health_port is not None
        assert health_status(f"127.0.0.1:{running.app.health_port}") == SERVING
        with pytest.raises(grpc.RpcError) as info:  # the main port refuses plaintext
            health_status(running.address, timeout_s=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        options = [("grpc.ssl_target_name_override", "localhost")]
        with grpc.secure_channel(running.address, creds, options=options) as ch:
            models = pbg.PairdotsServiceStub(ch).ListModels(pb.ListModelsRequest(), timeout=10)
            assert "models/tiny" in [m.name for m in models.models]
    finally:
        running.stop()


def test_health_port_config_and_flag(bundle_root: Path) -> None:
    from pairdots_server.cli.main import build_parser, server_config

    args = build_parser().parse_args(["serve", "--bundles", str(bundle_root), "--port", "50051",
                                      "--health-port", "50052"])
    assert server_config(args).health_port == 50052
    args = build_parser().parse_args(["serve", "--bundles", str(bundle_root)])
    assert server_config(args).health_port is None
    with pytest.raises(InvalidArgument, match="health_port"):
        ServerConfig(bundles=bundle_root, port=50051, health_port=50051)
    with pytest.raises(InvalidArgument, match="health_port"):
        ServerConfig(bundles=bundle_root, health_port=70000)


@pytest.mark.parametrize("command,flag,env", [
    ("serve", "--port", "PAIRDOTS_PORT"),
    ("serve", "--scope-input-cache-mb", "PAIRDOTS_SCOPE_INPUT_CACHE_MB"),
    ("serve", "--grace-s", "PAIRDOTS_GRACE_S"),
    ("serve", "--health-port", "PAIRDOTS_HEALTH_PORT"),
    ("worker", "--poll-s", "PAIRDOTS_POLL_S"),
    ("worker", "--max-concurrent", "PAIRDOTS_MAX_CONCURRENT_JOBS"),
])
def test_non_numeric_flag_is_a_usage_error_naming_it(
    bundle_root: Path, command: str, flag: str, env: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pairdots_server.cli.main import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--bundles", str(bundle_root), flag, "ten"])
    assert exit_info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
    monkeypatch.setenv(env, "ten")  # the PAIRDOTS_* fallback is checked the same way
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--bundles", str(bundle_root)])
    assert exit_info.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_scope_input_cache_bound_reaches_the_served_runtime(bundle_root: Path) -> None:
    from pairdots_server.cli.main import build_parser, server_config
    from pairdots_server.service.registry import ModelRegistry

    def parsed(*flags: str) -> ServerConfig:
        return server_config(build_parser().parse_args(["serve", "--bundles", str(bundle_root),
                                                        *flags]))

    assert parsed().explain.scope_input_max_bytes == 1024 * 2**20
    assert parsed("--scope-input-cache-mb", "3").explain.scope_input_max_bytes == 3 * 2**20
    assert parsed("--scope-input-cache-mb", "0").explain.scope_input_max_bytes is None
    with pytest.raises(InvalidArgument, match="scope_input_cache_mb"):
        parsed("--scope-input-cache-mb", "-1")
    registry = ModelRegistry(bundle_root, scope_input_max_bytes=5 * 2**20)
    registry.load_all()
    runtimes = [registry.get(name) for name in registry.names()]
    assert runtimes
    for rt in runtimes:
        cache = rt.scope_inputs()
        assert cache is not None and cache.max_bytes == 5 * 2**20


def test_default_token_influence_reaches_unspecified_requests(
    bundle_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pairdots.v1 import pairdots_pb2 as pb
    from pairdots_server.cli.main import build_parser, server_config
    from pairdots_server.influence.pipeline import TokenInfluence
    from pairdots_server.rpc.convert import explain_query

    def parsed(*flags: str) -> ServerConfig:
        return server_config(build_parser().parse_args(["serve", "--bundles", str(bundle_root),
                                                        *flags]))

    def method(cfg: ServerConfig, requested: int = 0) -> TokenInfluence:
        req = pb.ExplainRequest(text="i loved it !")
        req.influence.token_influence = requested  # type: ignore[assignment]
        return explain_query(req, cfg.explain).token_influence

    assert method(parsed()) is TokenInfluence.AUTO  # resolved per model in explain()
    assert method(parsed("--default-token-influence", "exact")) is TokenInfluence.EXACT
    bf16 = parsed("--default-token-influence", "exact_bf16")
    assert method(bf16) is TokenInfluence.EXACT_BF16
    # a request that names a method gets it whatever the server's default
    assert method(bf16, pb.TOKEN_INFLUENCE_METHOD_EXACT) is TokenInfluence.EXACT
    assert method(parsed(), pb.TOKEN_INFLUENCE_METHOD_EXACT_BF16) is TokenInfluence.EXACT_BF16
    monkeypatch.setenv("PAIRDOTS_DEFAULT_TOKEN_INFLUENCE", "exact_bf16")
    assert method(parsed()) is TokenInfluence.EXACT_BF16
    monkeypatch.setenv("PAIRDOTS_DEFAULT_TOKEN_INFLUENCE", "fast")
    with pytest.raises(InvalidArgument, match="default_token_influence"):
        parsed()


# -- SIGTERM under load (the real `pairdots serve` process) ---------------------------------


def _queue_depth(metrics_port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return -1.0
    for line in text.splitlines():
        if line.startswith("pairdots_queue_depth "):
            return float(line.split()[1])
    return -1.0


def test_sigterm_under_load_finishes_in_flight_calls(bundle_root: Path, tmp_path: Path) -> None:
    port, health_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "server"), str(REPO / "client")]))
    log_path = tmp_path / "serve.log"
    grace_s = 60
    cmd = [sys.executable, "-m", "pairdots_server.cli", "serve", f"--bundles={bundle_root}",
           f"--port={port}", f"--health-port={health_port}", f"--metrics-port={metrics_port}",
           "--device=cpu", "--max-workers=1", "--max-queue=8", f"--grace-s={grace_s}",
           f"--jobs-db={tmp_path / 'jobs.sqlite3'}"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    address, health_addr = f"127.0.0.1:{port}", f"127.0.0.1:{health_port}"
    try:
        def serving() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                return health_status(health_addr, timeout_s=1) == SERVING
            except grpc.RpcError:
                return False

        assert wait_until(serving, 180, 0.2), log_path.read_text()
        n_calls = 4  # ≈ 1 s each on the tiny model, run one at a time
        with grpc.insecure_channel(address) as ch:
            stub = pbg.PairdotsServiceStub(ch)
            futures = [stub.Explain.future(lissa(100), timeout=300) for _ in range(n_calls)]
            assert wait_until(lambda: _queue_depth(metrics_port) == n_calls, 60), \
                "the calls never reached the server"
            proc.send_signal(signal.SIGTERM)

            seen: list[int] = []

            def drain_observed() -> bool:
                try:
                    seen.append(health_status(health_addr, timeout_s=1))
                except grpc.RpcError:
                    return proc.poll() is not None
                return seen[-1] == NOT_SERVING

            assert wait_until(drain_observed, 30), f"health during drain: {seen}"
            in_flight_at_drain = _queue_depth(metrics_port)
            # A call arriving after the drain started is refused with UNAVAILABLE.
            time.sleep(0.2)
            with grpc.insecure_channel(address) as late_ch, \
                    pytest.raises(grpc.RpcError) as late:
                pbg.PairdotsServiceStub(late_ch).Explain(CHEAP, timeout=30)
            assert late.value.code() == grpc.StatusCode.UNAVAILABLE, late.value.details()

            results = [f.result(timeout=grace_s) for f in futures]  # every in-flight call: OK
        assert all(r.explanations[0].salient_words for r in results)
        assert proc.wait(timeout=grace_s + 30) == 0, log_path.read_text()
        print(f"SIGTERM: {n_calls} in flight, {in_flight_at_drain:.0f} still queued/running "
              f"when health read NOT_SERVING; all completed; exit 0")
        assert NOT_SERVING in seen
        assert "draining" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
