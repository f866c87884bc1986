"""A tiny bundle served by a real `pairdots serve` process on a loopback port, for bench/fuzz.py
and bench/soak.py (issue 14). The bundle (64 training examples, candidate index, low-rank
curvature) is built once into the given directory and reused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for sub in ("server", "client"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))


def tiny_root(root: Path) -> Path:
    """<root>/tiny with an index and low-rank factors (built when missing)."""
    if (root / "tiny" / "manifest.json").is_file():
        return root
    from pairdots_server.testing import make_tiny_root

    return make_tiny_root(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Served:
    """`pairdots serve` in a subprocess; `address`, `pid`, `rss_mb()`, `stop()`."""

    def __init__(self, root: Path, jobs_db: Path, *extra: str, threads: int = 1) -> None:
        self.port = free_port()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO / "server"), str(REPO / "client")])
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.args = [sys.executable, "-m", "pairdots_server.cli", "serve", "--bundles", str(root),
                     "--port", str(self.port), "--device", "cpu", "--jobs-db", str(jobs_db),
                     *extra]
        self.log = open(jobs_db.with_suffix(".log"), "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        self._wait_serving()

    def _wait_serving(self, timeout_s: float = 300) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with grpc.insecure_channel(self.address) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                              timeout=2)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become SERVING")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
        finally:
            self.log.close()
