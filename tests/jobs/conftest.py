"""Fixtures for the job store / runner / Operations tests (real SQLite files, real threads)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pairdots_server.service.jobs.runner import JobRunner
from pairdots_server.service.jobs.store import JobStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite"


@pytest.fixture
def store(db_path: Path) -> Iterator[JobStore]:
    s = JobStore(db_path)
    yield s
    s.close()


@pytest.fixture
def make_runner(store: JobStore) -> Iterator[Callable[..., JobRunner]]:
    """Factory `make_runner(max_concurrent=1, max_queued=16)`; all are shut down afterwards."""
    made: list[JobRunner] = []

    def factory(max_concurrent: int = 1, max_queued: int = 16) -> JobRunner:
        r = JobRunner(store, max_concurrent=max_concurrent, max_queued=max_queued)
        made.append(r)
        return r

    yield factory
    for r in made:
        r.shutdown(grace_s=5.0)
