"""JobRunner: outcomes, error mapping, cancellation, admission control, concurrency, shutdown.

Real worker threads over a real SQLite store. Jobs synchronise on threading.Event/Barrier
(with generous timeouts that only bound a hang), never on sleeps.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from google.protobuf import wrappers_pb2
from google.rpc import code_pb2

from pairdots_server import errors
from pairdots_server.service.jobs.runner import Code, JobContext, JobRunner, status_code_for
from pairdots_server.service.jobs.store import INTERRUPTED_REASON, JobState, JobStore

URL = "type.googleapis.com/google.protobuf.StringValue"
TYPE = "google.protobuf.StringValue"
HANG = 10.0  # seconds; only reached if the code under test is broken

MakeRunner = Callable[..., JobRunner]


def sv(text: str) -> bytes:
    return wrappers_pb2.StringValue(value=text).SerializeToString()


def unsv(data: bytes | None) -> str:
    assert data is not None
    return wrappers_pb2.StringValue.FromString(data).value


def looping_job(started: threading.Event, stopped: threading.Event) -> Callable[[JobContext],
                                                                                tuple[str, bytes]]:
    """A job that runs until cancelled, calling ctx.check() between short steps."""

    def fn(ctx: JobContext) -> tuple[str, bytes]:
        started.set()
        try:
            step = 0
            while True:
                ctx.check()
                step += 1
                ctx.set_metadata(URL, sv(f"step {step}"))
                threading.Event().wait(0.005)
        finally:
            stopped.set()

    return fn


def test_code_constants_match_google_rpc() -> None:
    for name in ("CANCELLED", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                 "ALREADY_EXISTS", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
                 "INTERNAL", "UNAVAILABLE"):
        assert getattr(Code, name) == getattr(code_pb2, name), name


def test_success_with_metadata(make_runner: MakeRunner) -> None:
    runner = make_runner()

    def fn(ctx: JobContext) -> tuple[str, bytes]:
        assert ctx.name.startswith("operations/attack-")
        assert not ctx.cancelled
        ctx.set_metadata(URL, sv("half way"))
        ctx.check()
        return URL, sv("done:" + ctx.name)

    rec = runner.submit("attack", TYPE, sv("request"), fn)
    assert rec.state is JobState.PENDING and unsv(rec.request) == "request"
    final = runner.wait(rec.name, HANG)
    assert final.state is JobState.SUCCEEDED
    assert final.result_type_url == URL and unsv(final.result) == "done:" + rec.name
    assert unsv(final.metadata) == "half way"


@pytest.mark.parametrize(
    ("exc", "code", "reason"),
    [
        (errors.SolverDiverged("LiSSA diverged; raise damping"), code_pb2.FAILED_PRECONDITION,
         "SOLVER_DIVERGED"),
        (errors.DataError("train.tsv line 3: no label"), code_pb2.INVALID_ARGUMENT, "DATA_INVALID"),
        (errors.NotFound("no such bundle"), code_pb2.NOT_FOUND, "NOT_FOUND"),
        (errors.ResourceExhausted("too big"), code_pb2.RESOURCE_EXHAUSTED, "RESOURCE_EXHAUSTED"),
        (errors.DeadlineExceeded("too slow"), code_pb2.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED"),
        (errors.PairdotsError("odd", reason="ODD"), code_pb2.INTERNAL, "ODD"),
    ],
)
def test_domain_errors_map_to_codes(make_runner: MakeRunner, exc: errors.PairdotsError,
                                    code: int, reason: str) -> None:
    runner = make_runner()

    def fn(ctx: JobContext) -> tuple[str, bytes]:
        raise exc

    final = runner.wait(runner.submit("repair", TYPE, b"", fn).name, HANG)
    assert final.state is JobState.FAILED
    assert (final.error_code, final.error_reason, final.error_message) == (
        code, reason, exc.message)
    assert status_code_for(exc) == code


def test_unexpected_exception_is_internal_and_logged(make_runner: MakeRunner,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    runner = make_runner()

    def fn(ctx: JobContext) -> tuple[str, bytes]:
        raise ValueError("shape mismatch 3 vs 4")

    final = runner.wait(runner.submit("attack", TYPE, b"", fn).name, HANG)
    assert final.state is JobState.FAILED and final.error_code == code_pb2.INTERNAL
    assert final.error_reason == "INTERNAL"
    assert "ValueError: shape mismatch 3 vs 4" in (final.error_message or "")
    assert any(r.exc_info and "raised an unexpected error" in r.getMessage()
               for r in caplog.records)
    # the worker survives: the next job still runs
    nxt = runner.submit("attack", TYPE, b"", lambda ctx: (URL, sv("ok")))
    assert runner.wait(nxt.name, HANG).state is JobState.SUCCEEDED


def test_cancel_stops_a_looping_job_within_one_second(make_runner: MakeRunner) -> None:
    runner = make_runner()
    started, stopped = threading.Event(), threading.Event()
    name = runner.submit("attack", TYPE, b"", looping_job(started, stopped)).name
    assert started.wait(HANG)
    assert runner.wait(name, 0.05).state is JobState.RUNNING  # wait times out, not done
    rec = runner.cancel(name)
    assert rec.state is JobState.CANCELLED and rec.error_code == code_pb2.CANCELLED
    assert stopped.wait(1.0), "the job thread did not stop within 1 s of cancel()"
    assert runner.wait(name, HANG).state is JobState.CANCELLED
    assert runner.cancel(name) == runner.store.get(name)  # cancelling again is a no-op
    with pytest.raises(errors.NotFound):
        runner.cancel("operations/attack-unknown")


def test_cancel_a_queued_job_never_runs_it(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=1)
    release = threading.Event()
    ran = threading.Event()
    first = runner.submit("attack", TYPE, b"", lambda ctx: (release.wait(HANG), (URL, b""))[1])
    second = runner.submit("attack", TYPE, b"", lambda ctx: (ran.set(), (URL, b""))[1])
    assert runner.cancel(second.name).state is JobState.CANCELLED
    release.set()
    assert runner.wait(first.name, HANG).state is JobState.SUCCEEDED
    third = runner.submit("attack", TYPE, b"", lambda ctx: (URL, b""))  # FIFO: after second
    assert runner.wait(third.name, HANG).state is JobState.SUCCEEDED
    assert not ran.is_set()
    assert runner.store.get(second.name).state is JobState.CANCELLED


def test_queue_limit_raises_resource_exhausted(make_runner: MakeRunner,
                                               store: JobStore) -> None:
    runner = make_runner(max_concurrent=1, max_queued=2)
    release = threading.Event()

    def blocker(ctx: JobContext) -> tuple[str, bytes]:
        release.wait(HANG)
        return URL, b""

    a = runner.submit("attack", TYPE, b"", blocker)
    b = runner.submit("attack", TYPE, b"", blocker)
    before = len(store.list()[0])
    with pytest.raises(errors.ResourceExhausted, match="max_queued=2") as info:
        runner.submit("attack", TYPE, b"", blocker)
    assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    assert len(store.list()[0]) == before  # nothing recorded for the refused job
    release.set()
    assert runner.wait(a.name, HANG).done and runner.wait(b.name, HANG).done
    # slots are free again once the threads have finished
    for _ in range(100):
        if runner.active_count() == 0:
            break
        runner.wait(b.name, 0.05)
    c = runner.submit("attack", TYPE, b"", lambda ctx: (URL, b""))
    assert runner.wait(c.name, HANG).state is JobState.SUCCEEDED


def test_max_concurrent_jobs_really_run_together(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=2)
    barrier = threading.Barrier(2, timeout=HANG)

    def meet(ctx: JobContext) -> tuple[str, bytes]:
        barrier.wait()  # raises BrokenBarrierError (→ FAILED) unless both run at once
        return URL, b""

    names = [runner.submit("attack", TYPE, b"", meet).name for _ in range(2)]
    assert [runner.wait(n, HANG + 5).state for n in names] == [JobState.SUCCEEDED] * 2


def test_concurrent_submissions(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=2, max_queued=64)
    lock = threading.Lock()
    running = [0]
    peak = [0]
    submitted: dict[str, str] = {}

    def job(tag: str) -> Callable[[JobContext], tuple[str, bytes]]:
        def fn(ctx: JobContext) -> tuple[str, bytes]:
            with lock:
                running[0] += 1
                peak[0] = max(peak[0], running[0])
            try:
                ctx.check()
                return URL, sv(tag)
            finally:
                with lock:
                    running[0] -= 1
        return fn

    def client(i: int) -> None:
        for j in range(5):
            tag = f"{i}-{j}"
            rec = runner.submit("repair", TYPE, sv(tag), job(tag))
            with lock:
                submitted[rec.name] = tag

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(submitted) == 40
    for name, tag in submitted.items():
        rec = runner.wait(name, HANG)
        assert rec.state is JobState.SUCCEEDED and unsv(rec.result) == tag == unsv(rec.request)
    assert 1 <= peak[0] <= 2


def test_shutdown_interrupts_running_and_queued_jobs(make_runner: MakeRunner) -> None:
    runner = make_runner(max_concurrent=1)
    started, stopped = threading.Event(), threading.Event()
    running = runner.submit("attack", TYPE, b"", looping_job(started, stopped)).name
    queued = runner.submit("repair", TYPE, b"", lambda ctx: (URL, b"")).name
    finished_before = runner.store.create("attack", TYPE, b"").name
    runner.store.succeed(finished_before, URL, b"")
    assert started.wait(HANG)
    assert runner.shutdown(grace_s=HANG) == 2
    assert stopped.is_set()
    for name in (running, queued):
        rec = runner.store.get(name)
        assert rec.state is JobState.FAILED and rec.error_reason == INTERRUPTED_REASON
        assert rec.error_code == code_pb2.ABORTED
    assert runner.store.get(finished_before).state is JobState.SUCCEEDED
    with pytest.raises(errors.Unavailable, match="shutting down"):
        runner.submit("attack", TYPE, b"", lambda ctx: (URL, b""))
    assert runner.shutdown() == 0  # idempotent


def test_listener_sees_changes_and_bad_listener_is_harmless(make_runner: MakeRunner) -> None:
    runner = make_runner()
    seen: list[str] = []

    def bad(name: str) -> None:
        raise RuntimeError("listener bug")

    runner.add_listener(bad)
    runner.add_listener(seen.append)
    name = runner.submit("attack", TYPE, b"", lambda ctx: (URL, sv("x"))).name
    assert runner.wait(name, HANG).state is JobState.SUCCEEDED
    runner.remove_listener(bad)
    runner.remove_listener(bad)  # absent: no error
    assert name in seen


@pytest.mark.parametrize(("conc", "queued", "field"),
                         [(0, 4, "max_concurrent"), (3, 2, "max_queued")])
def test_constructor_validation(store: JobStore, conc: int, queued: int, field: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=field):
        JobRunner(store, max_concurrent=conc, max_queued=queued)


def test_delete_while_a_cancelled_job_is_still_stopping(make_runner: MakeRunner) -> None:
    runner = make_runner()
    started, go_on, stopped = threading.Event(), threading.Event(), threading.Event()

    def fn(ctx: JobContext) -> tuple[str, bytes]:
        started.set()
        try:
            go_on.wait(HANG)
            ctx.set_metadata(URL, sv("after delete"))  # row is gone: ignored
            ctx.check()  # raises Cancelled
            return URL, b""
        finally:
            stopped.set()

    name = runner.submit("attack", TYPE, b"", fn).name
    assert started.wait(HANG)
    runner.cancel(name)
    runner.store.delete(name)  # allowed: the operation is CANCELLED (done)
    go_on.set()
    assert stopped.wait(HANG)
    nxt = runner.submit("attack", TYPE, b"", lambda ctx: (URL, sv("next")))
    assert runner.wait(nxt.name, HANG).state is JobState.SUCCEEDED
    with pytest.raises(errors.NotFound):
        runner.store.get(name)
    assert runner.shutdown(grace_s=HANG) == 0
