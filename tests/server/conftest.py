"""Fixtures: a real pairdots server on a loopback port, serving a tiny bundle built in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pdserver_util import RunningServer, build_tiny_root, start_server

from pairdots import PairdotsClient
from pairdots_server.config import ServerConfig


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_root(tmp_path_factory.mktemp("bundles"))


@pytest.fixture(scope="session")
def server(bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    jobs = tmp_path_factory.mktemp("jobs") / "jobs.sqlite3"
    running = start_server(ServerConfig(bundles=bundle_root, port=0, jobs_db=jobs, max_queue=64))
    yield running
    running.stop()


@pytest.fixture()
def client(server: RunningServer) -> Iterator[PairdotsClient]:
    with server.client() as c:
        yield c
