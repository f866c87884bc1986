"""Helpers for the server tests: a real server on a loopback port, a tiny bundle root."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pairdots import ClientConfig, PairdotsClient
from pairdots_server.config import ServerConfig
from pairdots_server.rpc.app import App, create_server
from pairdots_server.testing import make_tiny_root


@dataclass
class RunningServer:
    app: App
    port: int
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    root: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, **overrides: Any) -> PairdotsClient:
        cfg = ClientConfig(address=self.address, max_retries=0, **overrides)
        return PairdotsClient(cfg)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.app.stop(0.5), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def start_server(config: ServerConfig) -> RunningServer:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    app, port = asyncio.run_coroutine_threadsafe(create_server(config), loop).result(300)
    return RunningServer(app, port, loop, thread, config.bundles)


def build_tiny_root(root: Path) -> Path:
    """<root>/tiny: a tiny bundle with a candidate index and low-rank curvature."""
    return make_tiny_root(root)


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """(tls.crt, tls.key) in `tmp`: a throwaway self-signed certificate for "localhost"."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "tls.crt", tmp / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
def wait_until(pred: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll `pred` until it is true or `timeout_s` passed; its last value."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval_s)
    return pred()


def health_status(address: str, timeout_s: float = 5.0, service: str = "") -> int:
    """grpc.health.v1 Check of `service` on a plaintext address (NOT_FOUND raises)."""
    with grpc.insecure_channel(address) as ch:
        req = health_pb2.HealthCheckRequest(service=service)
        return int(health_pb2_grpc.HealthStub(ch).Check(req, timeout=timeout_s).status)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
