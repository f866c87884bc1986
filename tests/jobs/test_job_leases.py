"""Schema migrations, claims, leases and cross-process idempotency of the JobStore, on SQLite
and on a real PostgreSQL server (the `store` / `store_spec` fixtures run both)."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from pairdots_server import errors
from pairdots_server.service.jobs.migrations import MIGRATIONS, SCHEMA_VERSION
from pairdots_server.service.jobs.store import INTERRUPTED_REASON, JobState, JobStore

TYPE = "google.protobuf.StringValue"
URL = "type.googleapis.com/google.protobuf.StringValue"


def test_fresh_store_records_every_migration(store: JobStore) -> None:
    assert store.schema_versions() == [m.version for m in MIGRATIONS] == [1, 2]
    assert SCHEMA_VERSION == 2


def test_reopening_applies_nothing_twice(store_spec: str | Path) -> None:
    a = JobStore(store_spec)
    name = a.create("attack", TYPE, b"q").name
    a.close()
    b = JobStore(store_spec)
    assert b.schema_versions() == [1, 2] and b.get(name).request == b"q"
    b.close()


def test_schema_1_sqlite_file_is_migrated_in_place(tmp_path: Path) -> None:
    """A file written by the schema-1 server (user_version 1, no lease columns, no migrations
    table) keeps its rows and gains the lease columns."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as raw:
        for stmt in MIGRATIONS[0].sqlite:
            raw.execute(stmt)
        raw.execute(
            "INSERT INTO operations (name, kind, state, created_at, updated_at, "
            "request_type, request) VALUES ('operations/attack-old', 'attack', "
            "'SUCCEEDED', 1.0, 2.0, 't', x'01')"
        )
        raw.execute("PRAGMA user_version = 1")
    s = JobStore(path)
    rec = s.get("operations/attack-old")
    assert rec.state is JobState.SUCCEEDED and rec.request == b"\x01"
    assert rec.owner is None and rec.lease_until is None
    assert s.schema_versions() == [1, 2]
    s.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 2


def test_postgres_refuses_a_newer_schema(pg_url: str) -> None:
    JobStore(pg_url).close()
    import psycopg

    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    with pytest.raises(errors.FailedPrecondition, match="newer than this server"):
        JobStore(pg_url)


def test_unreachable_postgres_is_a_clear_error() -> None:
    with pytest.raises(errors.FailedPrecondition, match="cannot connect.*--jobs-db") as info:
        JobStore("postgresql://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
    assert "secret" not in info.value.message


def test_claim_takes_the_oldest_unowned_pending_job(store: JobStore) -> None:
    held = store.create("attack", TYPE, b"", owner="serve-a", lease_s=30).name
    first = store.create("attack", TYPE, b"").name
    second = store.create("repair", TYPE, b"").name
    assert store.claim("w1", 10.0, kinds={"repair"}).name == second  # type: ignore[union-attr]
    rec = store.claim("w1", 10.0)
    assert rec is not None and rec.name == first and rec.state is JobState.RUNNING
    assert rec.owner == "w1" and rec.lease_until is not None
    assert rec.lease_until == pytest.approx(time.time() + 10.0, abs=2.0)
    assert store.claim("w2", 10.0) is None  # the held one is its runner's, not the queue's
    assert store.get(held).state is JobState.PENDING
    assert store.claim("w2", 10.0, kinds=()) is None


def test_concurrent_claimers_never_share_a_job(store_spec: str | Path) -> None:
    seed = JobStore(store_spec)
    names = {seed.create("attack", TYPE, b"").name for _ in range(30)}
    claimed: dict[str, list[str]] = {}

    def worker(wid: str) -> None:
        s = JobStore(store_spec)  # its own connection, as another process would have
        mine: list[str] = []
        while (rec := s.claim(wid, 30.0)) is not None:
            mine.append(rec.name)
        claimed[wid] = mine
        s.close()

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    every = [n for names_ in claimed.values() for n in names_]
    assert sorted(every) == sorted(names)  # each exactly once
    assert all(seed.get(n).state is JobState.RUNNING for n in names)
    seed.close()


def test_renew_extends_only_the_owners_active_leases(store: JobStore) -> None:
    a = store.create("attack", TYPE, b"").name
    store.claim("w1", 1.0)
    before = store.get(a).lease_until
    assert before is not None
    after = store.renew([a], "w1", 60.0)[a]
    assert after is not None and after.lease_until is not None and after.lease_until > before + 30
    assert store.renew([a], "someone-else", 600.0)[a].lease_until == after.lease_until  # type: ignore[union-attr]
    store.cancel(a)  # by another replica: the holder sees it at its next renewal
    seen = store.renew([a], "w1", 60.0)[a]
    assert seen is not None and seen.state is JobState.CANCELLED and seen.lease_until is None
    done = store.create("repair", TYPE, b"").name
    store.claim("w1", 60.0)
    store.delete(a)
    assert store.renew([a], "w1", 60.0) == {a: None}
    store.succeed(done, URL, b"")
    assert store.get(done).lease_until is None


def test_expired_leases_are_marked_interrupted_with_the_owner(store: JobStore) -> None:
    running = store.create("attack", TYPE, b"").name
    store.claim("worker-7", 5.0)
    held = store.create("repair", TYPE, b"", owner="serve-b", lease_s=5.0).name
    fresh = store.create("attack", TYPE, b"").name
    store.claim("worker-8", 600.0)
    queued = store.create("attack", TYPE, b"").name  # no lease: waits for a worker
    assert store.expire_leases() == []
    expired = store.expire_leases(now=time.time() + 10.0)
    assert sorted(expired) == sorted([running, held])
    for name, owner in ((running, "worker-7"), (held, "serve-b")):
        rec = store.get(name)
        assert rec.state is JobState.FAILED and rec.error_code == 10  # ABORTED
        assert rec.error_reason == INTERRUPTED_REASON
        assert owner in (rec.error_message or "") and "lease" in (rec.error_message or "")
        assert "submit it again" in (rec.error_message or "")
    assert store.get(fresh).state is JobState.RUNNING
    assert store.get(queued).state is JobState.PENDING
    assert store.expire_leases(now=time.time() + 10.0) == []  # terminal states stick


def test_set_running_respects_the_owner(store: JobStore) -> None:
    mine = store.create("attack", TYPE, b"", owner="r1", lease_s=30.0).name
    assert store.set_running(mine, owner="r2", lease_s=30.0).state is JobState.PENDING
    rec = store.set_running(mine, owner="r1", lease_s=30.0)
    assert rec.state is JobState.RUNNING and rec.owner == "r1"


def test_request_id_is_idempotent_across_processes(store_spec: str | Path) -> None:
    """Replicas racing on one request_id create one operation; a different request with the
    same key is ALREADY_EXISTS."""
    stores = [JobStore(store_spec) for _ in range(4)]
    results: list[tuple[str, bool]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(stores))

    def submit(s: JobStore) -> None:
        barrier.wait()
        rec, created = s.create_once("attack", TYPE, b"r", request_id="key-1", fingerprint="f")
        with lock:
            results.append((rec.name, created))

    threads = [threading.Thread(target=submit, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len({n for n, _ in results}) == 1 and sum(c for _, c in results) == 1
    assert len(stores[0].list()[0]) == 1
    with pytest.raises(errors.AlreadyExists, match="different request"):
        stores[1].create_once("attack", TYPE, b"x", request_id="key-1", fingerprint="g")
    for s in stores:
        s.close()
