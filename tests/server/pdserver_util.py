"""Helpers for the server tests: a real server on a loopback port, a tiny bundle root."""

from __future__ import annotations

import asyncio
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots import ClientConfig, PairdotsClient
from pairdots_server.config import ServerConfig
from pairdots_server.influence.artifacts import (
    ArtifactConfig,
    build_index_dir,
    index_files,
    lowrank_bytes,
)
from pairdots_server.influence.runtime import LOWRANK_FILE, ModelRuntime
from pairdots_server.rpc.app import App, create_server
from pairdots_server.storage.bundle import load_bundle
from pairdots_server.storage.update import update_bundle
from pairdots_server.testing import make_tiny_bundle


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
    path = make_tiny_bundle(root, "tiny", n_train=64)
    rt = ModelRuntime(load_bundle(path))
    cfg = ArtifactConfig(index_dim=64, low_rank=8)
    with tempfile.TemporaryDirectory() as tmp:
        index_dir = build_index_dir(rt, cfg, Path(tmp) / "index", progress=False)
        files: dict[str, Any] = dict(index_files(index_dir))
        files[LOWRANK_FILE] = lowrank_bytes(rt, cfg.low_rank)
        update_bundle(path, files, {})
    return root


