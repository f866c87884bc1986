"""JobQueue (serve --no-worker) and JobRunner in claim mode (pairdots worker) over one store, in
threads, on SQLite and PostgreSQL: queued jobs are claimed and run, a cancel through the queue
stops the worker's job at its next renewal, a lost lease stops the job without overwriting the
interruption, build errors fail the operation, and the queue's admission rules. Plus the
--output-bundles writability check."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from google.protobuf import wrappers_pb2

from pairdots_server import errors
from pairdots_server.model.retrain import check_save_as
from pairdots_server.service.jobs.queue import JobQueue
from pairdots_server.service.jobs.runner import JobContext, JobFn, JobRunner
from pairdots_server.service.jobs.store import INTERRUPTED_REASON, JobRecord, JobState, JobStore

URL = "type.googleapis.com/google.protobuf.StringValue"
TYPE = "google.protobuf.StringValue"
HANG = 20.0  # seconds; only reached if the code under test is broken
LEASE_S = 1.5
POLL_S = 0.1


def sv(text: str) -> bytes:
    return wrappers_pb2.StringValue(value=text).SerializeToString()


class Jobs:
    """A builder for the worker: 'echo' returns its request, 'loop' runs until stopped,
    'broken' cannot be built."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.stopped = threading.Event()

    def build(self, record: JobRecord) -> JobFn:
        if record.kind == "broken":
            raise errors.NotFound("model 'gone' is not served by this worker")

        def echo(ctx: JobContext) -> tuple[str, bytes]:
            return URL, record.request

        def loop(ctx: JobContext) -> tuple[str, bytes]:
            self.started.set()
            try:
                while True:
                    ctx.check()
                    threading.Event().wait(0.01)
            finally:
                self.stopped.set()

        return echo if record.kind == "echo" else loop


@pytest.fixture
def jobs() -> Jobs:
    return Jobs()


@pytest.fixture
def queue(store: JobStore) -> Iterator[JobQueue]:
    q = JobQueue(store, kinds={"echo", "loop", "broken"}, max_queued=4, poll_s=POLL_S)
    yield q
    q.shutdown(1.0)


@pytest.fixture
def worker(store_spec: str | Path, jobs: Jobs) -> Iterator[Callable[[], JobRunner]]:
    """Start a claim-mode runner on its own connection to the store (like another process)."""
    made: list[tuple[JobRunner, JobStore]] = []

    def start() -> JobRunner:
        s = JobStore(store_spec)
        r = JobRunner(
            s, 1, 1, owner=f"worker-{len(made)}", lease_s=LEASE_S, poll_s=POLL_S, builder=jobs.build
        )
        made.append((r, s))
        return r

    yield start
    for r, s in made:
        r.shutdown(5.0)
        s.close()


def test_queued_job_is_claimed_and_run_by_a_worker(
    queue: JobQueue, store: JobStore, worker: Callable[[], JobRunner]
) -> None:
    rec = queue.submit("echo", TYPE, sv("hello"), None, metadata=(URL, sv("queued")))
    assert rec.state is JobState.PENDING and rec.owner is None
    worker()
    done = queue.wait(rec.name, HANG)
    assert done.state is JobState.SUCCEEDED and done.result == sv("hello")
    assert done.owner == "worker-0" and done.lease_until is None


def test_cancel_through_the_queue_stops_the_workers_job(
    queue: JobQueue, store: JobStore, worker: Callable[[], JobRunner], jobs: Jobs
) -> None:
    runner = worker()
    name = queue.submit("loop", TYPE, b"", None).name
    assert jobs.started.wait(HANG)
    assert queue.cancel(name).state is JobState.CANCELLED
    assert jobs.stopped.wait(HANG)  # seen at the worker's next renewal (every LEASE_S / 3)
    rec = store.get(name)
    assert rec.state is JobState.CANCELLED and rec.error_reason == "CANCELLED"
    ok = queue.submit("echo", TYPE, sv("next"), None).name  # the worker is free again
    assert queue.wait(ok, HANG).state is JobState.SUCCEEDED
    assert runner.active_count() == 0


def test_a_lost_lease_stops_the_job_and_the_interruption_stays(
    queue: JobQueue, store: JobStore, worker: Callable[[], JobRunner], jobs: Jobs
) -> None:
    worker()
    name = queue.submit("loop", TYPE, b"", None).name
    assert jobs.started.wait(HANG)
    # as if this worker had stalled past its lease: another process expires it
    assert store.expire_leases(now=store.get(name).lease_until + 1.0) == [name]  # type: ignore[operator]
    assert jobs.stopped.wait(HANG)
    rec = store.get(name)
    assert rec.state is JobState.FAILED and rec.error_reason == INTERRUPTED_REASON
    assert "worker-0" in (rec.error_message or "")


def test_a_job_that_cannot_be_built_fails_with_its_error(
    queue: JobQueue, worker: Callable[[], JobRunner]
) -> None:
    worker()
    name = queue.submit("broken", TYPE, b"", None).name
    rec = queue.wait(name, HANG)
    assert rec.state is JobState.FAILED and rec.error_code == 5  # NOT_FOUND
    assert "not served by this worker" in (rec.error_message or "")


def test_queue_admission(queue: JobQueue, store: JobStore) -> None:
    with pytest.raises(errors.FailedPrecondition, match="without --no-worker"):
        queue.submit("explain_batch", TYPE, b"", None)
    first = queue.submit("echo", TYPE, b"", None, request_id="r1", fingerprint="f")
    for _ in range(3):
        queue.submit("echo", TYPE, b"", None)
    with pytest.raises(errors.ResourceExhausted, match="queue is full") as info:
        queue.submit("echo", TYPE, b"", None)
    assert info.value.retry_after_s
    # a retry of an accepted request is answered even when the queue is full
    assert queue.submit("echo", TYPE, b"", None, request_id="r1", fingerprint="f") == first
    assert queue.active_count() == 4
    queue.shutdown(1.0)
    with pytest.raises(errors.Unavailable, match="shutting down"):
        queue.submit("echo", TYPE, b"", None)


def test_the_queues_reaper_marks_dead_leases(queue: JobQueue, store: JobStore) -> None:
    name = queue.submit("echo", TYPE, b"", None).name
    store.claim("a-worker-that-dies", 0.2)  # never renewed
    rec = queue.wait(name, HANG)
    assert rec.state is JobState.FAILED and rec.error_reason == INTERRUPTED_REASON
    assert "a-worker-that-dies" in (rec.error_message or "")


def test_output_root_is_checked_writable(tmp_path: Path) -> None:
    check_save_as(tmp_path, "new-bundle")  # writable: fine
    check_save_as(tmp_path / "missing", None)  # no save_as: nothing to check
    for bad, why in (
        (tmp_path / "missing", "does not exist"),
        (tmp_path / "file.txt", "is not a directory"),
    ):
        if why == "is not a directory":
            bad.write_text("x")
        with pytest.raises(errors.FailedPrecondition, match=why) as info:
            check_save_as(bad, "new-bundle")
        assert info.value.reason == "OUTPUT_NOT_WRITABLE"
        assert "--output-bundles" in info.value.message
    assert list(tmp_path.iterdir()) == [tmp_path / "file.txt"]  # the probe left nothing
