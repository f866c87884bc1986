"""Fixtures for the job store / runner / Operations tests: real SQLite files, a real
PostgreSQL server started by the tests (pg_cluster.py), real threads. `store` runs every test
that uses it against both backends."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pg_cluster import PgCluster, start_cluster

from pairdots_server.service.jobs.runner import JobRunner
from pairdots_server.service.jobs.store import JobStore


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty PostgreSQL database for one test."""
    return pg_cluster.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_spec(request: pytest.FixtureRequest, db_path: Path) -> str | Path:
    """Where `store` lives: an SQLite file, or a fresh database on the test PostgreSQL."""
    if request.param == "sqlite":
        return db_path
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(store_spec: str | Path) -> Iterator[JobStore]:
    s = JobStore(store_spec)
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
