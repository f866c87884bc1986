"""JobStore: CRUD, state machine, pagination, persistence, startup recovery (real SQLite files)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from pairdots_server import errors
from pairdots_server.service.jobs.store import (
    INTERRUPTED_MESSAGE,
    INTERRUPTED_REASON,
    SCHEMA_VERSION,
    JobState,
    JobStore,
)

URL = "type.googleapis.com/google.protobuf.StringValue"
TYPE = "google.protobuf.StringValue"


def sv(text: str) -> bytes:
    return wrappers_pb2.StringValue(value=text).SerializeToString()


def unsv(data: bytes | None) -> str:
    assert data is not None
    return wrappers_pb2.StringValue.FromString(data).value


def test_create_and_get_round_trip(store: JobStore) -> None:
    rec = store.create("attack", TYPE, sv("req"))
    assert rec.name.startswith("operations/attack-")
    assert len(rec.name) == len("operations/attack-") + 32
    assert rec.state is JobState.PENDING and not rec.done
    assert rec.kind == "attack" and rec.request_type == TYPE and unsv(rec.request) == "req"
    assert rec.metadata is None and rec.result is None and rec.error_code is None
    assert store.get(rec.name) == rec
    assert store.create("attack", TYPE, b"").name != rec.name


def test_get_unknown_is_not_found(store: JobStore) -> None:
    with pytest.raises(errors.NotFound, match="ListOperations"):
        store.get("operations/attack-nope")


@pytest.mark.parametrize("kind", ["Attack", "", "a-b", "1x", "x" * 33])
def test_bad_kind_rejected(store: JobStore, kind: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="kind"):
        store.create(kind, TYPE, b"")


def test_success_path_and_terminal_states_stick(store: JobStore) -> None:
    name = store.create("repair", TYPE, b"").name
    assert store.set_running(name).state is JobState.RUNNING
    rec = store.update_metadata(name, URL, sv("stage 1/3"))
    assert rec.metadata_type_url == URL and unsv(rec.metadata) == "stage 1/3"
    rec = store.succeed(name, URL, sv("result"))
    assert rec.state is JobState.SUCCEEDED and rec.done
    assert rec.result_type_url == URL and unsv(rec.result) == "result"
    assert rec.updated_at >= rec.created_at
    # later transitions are no-ops: the first terminal state wins
    assert store.fail(name, 13, "late", "X") == rec
    assert store.cancel(name) == rec
    assert store.set_running(name) == rec
    assert store.update_metadata(name, URL, sv("late")) == rec


def test_fail_and_cancel_record_error(store: JobStore) -> None:
    a = store.create("attack", TYPE, b"").name
    store.set_running(a)
    rec = store.fail(a, 9, "solver diverged; raise damping", "SOLVER_DIVERGED")
    assert (rec.state, rec.error_code, rec.error_message, rec.error_reason) == (
        JobState.FAILED, 9, "solver diverged; raise damping", "SOLVER_DIVERGED")
    b = store.create("attack", TYPE, b"").name
    rec = store.cancel(b)  # cancelling a PENDING job is allowed
    assert rec.state is JobState.CANCELLED and rec.error_code == 1
    assert rec.error_reason == "CANCELLED"
    assert store.set_running(b).state is JobState.CANCELLED  # must not start afterwards


def test_delete(store: JobStore) -> None:
    done = store.create("attack", TYPE, b"").name
    store.succeed(done, URL, b"")
    running = store.create("attack", TYPE, b"").name
    store.set_running(running)
    store.delete(done)
    with pytest.raises(errors.NotFound):
        store.get(done)
    with pytest.raises(errors.NotFound):
        store.delete(done)
    with pytest.raises(errors.FailedPrecondition, match="cancel it first"):
        store.delete(running)
    assert store.get(running).state is JobState.RUNNING


def test_list_pages_newest_first_and_stable_under_inserts(store: JobStore) -> None:
    names = [store.create("attack" if i % 2 else "repair", TYPE, b"").name for i in range(7)]
    page1, tok = store.list(page_size=3)
    assert [r.name for r in page1] == names[::-1][:3] and tok
    # a job created mid-pagination must not shift later pages
    newest = store.create("attack", TYPE, b"").name
    page2, tok2 = store.list(page_size=3, page_token=tok)
    again, _ = store.list(page_size=3, page_token=tok)
    assert page2 == again and [r.name for r in page2] == names[::-1][3:6]
    page3, end = store.list(page_size=3, page_token=tok2)
    assert [r.name for r in page3] == names[:1] and end == ""
    everything, end = store.list()
    assert [r.name for r in everything] == [newest, *names[::-1]] and end == ""


def test_list_exact_multiple_of_page_size_ends_cleanly(store: JobStore) -> None:
    for _ in range(4):
        store.create("attack", TYPE, b"")
    page, tok = store.list(page_size=2)
    page, tok = store.list(page_size=2, page_token=tok)
    assert len(page) == 2 and tok == ""


def test_list_filters(store: JobStore) -> None:
    a1 = store.create("attack", TYPE, b"").name
    r1 = store.create("repair", TYPE, b"").name
    a2 = store.create("attack", TYPE, b"").name
    store.set_running(a2)
    store.succeed(r1, URL, b"")
    assert [r.name for r in store.list(kind_filter="attack")[0]] == [a2, a1]
    assert [r.name for r in store.list(state_filter=JobState.RUNNING)[0]] == [a2]
    both = store.list(state_filter={JobState.PENDING, JobState.SUCCEEDED})[0]
    assert [r.name for r in both] == [r1, a1]
    assert store.list(kind_filter="repair", state_filter=JobState.PENDING)[0] == []
    assert store.list(kind_filter="nothing")[0] == []
    # paging with a filter
    p1, tok = store.list(kind_filter="attack", page_size=1)
    p2, end = store.list(kind_filter="attack", page_size=1, page_token=tok)
    assert [r.name for r in p1 + p2] == [a2, a1] and end == ""


def test_list_rejects_bad_tokens_and_sizes(store: JobStore) -> None:
    for _ in range(3):
        store.create("attack", TYPE, b"")
    _, tok = store.list(kind_filter="attack", page_size=1)
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        store.list(page_token="garbage!!")
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        store.list(page_token="djJ8M3x8")  # "v2|3||": unknown version
    with pytest.raises(errors.InvalidArgument, match="page_token"):
        store.list(page_token="djF8LTF8fA")  # "v1|-1||": negative bound
    with pytest.raises(errors.InvalidArgument, match="same filter"):
        store.list(kind_filter="repair", page_size=1, page_token=tok)
    with pytest.raises(errors.InvalidArgument, match="page_size"):
        store.list(page_size=-1)
    assert len(store.list(page_size=10_000)[0]) == 3  # clamped, not an error


def test_persists_across_reopen(db_path: Path) -> None:
    s1 = JobStore(db_path)
    done = s1.create("attack", TYPE, sv("q")).name
    s1.update_metadata(done, URL, sv("m"))
    s1.succeed(done, URL, sv("answer"))
    failed = s1.create("repair", TYPE, b"").name
    s1.fail(failed, 3, "bad", "INVALID_ARGUMENT")
    s1.close()
    with pytest.raises(errors.FailedPrecondition, match="closed"):
        s1.get(done)

    s2 = JobStore(db_path)
    rec = s2.get(done)
    assert rec.state is JobState.SUCCEEDED
    assert (unsv(rec.request), unsv(rec.metadata), unsv(rec.result)) == ("q", "m", "answer")
    assert s2.get(failed).error_code == 3
    assert s2.mark_interrupted_on_startup() == 0
    s2.close()
    with sqlite3.connect(db_path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_mark_interrupted_on_startup(db_path: Path) -> None:
    s1 = JobStore(db_path)
    pending = s1.create("attack", TYPE, b"").name
    running = s1.create("repair", TYPE, b"").name
    s1.set_running(running)
    finished = s1.create("attack", TYPE, b"").name
    s1.succeed(finished, URL, sv("ok"))
    s1.close()  # the "process" dies with two jobs unfinished

    s2 = JobStore(db_path)
    assert s2.mark_interrupted_on_startup() == 2
    for name in (pending, running):
        rec = s2.get(name)
        assert rec.state is JobState.FAILED and rec.done
        assert rec.error_reason == INTERRUPTED_REASON == "INTERRUPTED"
        assert rec.error_message == INTERRUPTED_MESSAGE and rec.error_code == 10  # ABORTED
    assert s2.get(finished).state is JobState.SUCCEEDED
    assert s2.mark_interrupted_on_startup() == 0
    assert s2.count_active() == 0
    s2.close()


def test_rejects_newer_schema_and_non_sqlite(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite"
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(errors.FailedPrecondition, match="newer"):
        JobStore(newer)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(errors.FailedPrecondition, match="cannot be opened"):
        JobStore(junk)


def test_concurrent_writers(store: JobStore) -> None:
    created: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(25):
            name = store.create("attack", TYPE, b"").name
            store.set_running(name)
            store.update_metadata(name, URL, sv("x"))
            store.succeed(name, URL, sv(name))
            with lock:
                created.append(name)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(created)) == 200
    records, tok = store.list(page_size=500)
    assert tok == "" and {r.name for r in records} == set(created)
    assert all(r.state is JobState.SUCCEEDED and unsv(r.result) == r.name for r in records)
