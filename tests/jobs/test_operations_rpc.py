"""google.longrunning.Operations over a real grpc.aio server on 127.0.0.1:0 with the generated
OperationsStub: get/list/filter/cancel/wait/delete, errors, and a restart of the server."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2, wrappers_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from pairdots_server import errors
from pairdots_server.rpc.operations import add_operations_servicer, parse_filter
from pairdots_server.service.jobs.runner import JobContext, JobRunner
from pairdots_server.service.jobs.store import JobStore

URL = "type.googleapis.com/google.protobuf.StringValue"
TYPE = "google.protobuf.StringValue"
HANG = 10.0


def sv(text: str) -> bytes:
    return wrappers_pb2.StringValue(value=text).SerializeToString()


def ok_job(text: str) -> Callable[[JobContext], tuple[str, bytes]]:
    def fn(ctx: JobContext) -> tuple[str, bytes]:
        ctx.set_metadata(URL, sv("progress of " + text))
        return URL, sv(text)
    return fn


def blocking_job(release: threading.Event,
                 started: threading.Event | None = None) -> Callable[[JobContext], tuple[str, bytes]]:
    def fn(ctx: JobContext) -> tuple[str, bytes]:
        if started is not None:
            started.set()
        while not release.wait(0.01):
            ctx.check()
        return URL, sv("released")
    return fn


@asynccontextmanager
async def serve(store: JobStore, runner: JobRunner) -> AsyncIterator[Any]:
    server = grpc.aio.server()
    add_operations_servicer(server, store, runner)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield operations_pb2_grpc.OperationsStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(body(), 60))


def status_details(err: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in err.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    raise AssertionError("no grpc-status-details-bin trailer")


def error_info(details: Any) -> error_details_pb2.ErrorInfo:
    for d in details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo detail")


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode, text: str) -> status_pb2.Status:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or "")
    return status_details(info.value)


def test_get_succeeded_and_failed_operations(store: JobStore,
                                             make_runner: Callable[..., JobRunner]) -> None:
    runner = make_runner()
    good = runner.submit("attack", TYPE, b"", ok_job("flipped 3 words")).name
    bad = runner.submit(
        "repair", TYPE, b"",
        lambda ctx: (_ for _ in ()).throw(errors.SolverDiverged("LiSSA diverged; raise damping")),
    ).name
    runner.wait(good, HANG)
    runner.wait(bad, HANG)

    async def body() -> None:
        async with serve(store, runner) as stub:
            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=good))
            assert op.name == good and op.done and op.WhichOneof("result") == "response"
            result = wrappers_pb2.StringValue()
            assert op.response.Unpack(result) and result.value == "flipped 3 words"
            meta = wrappers_pb2.StringValue()
            assert op.metadata.Unpack(meta) and meta.value == "progress of flipped 3 words"

            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=bad))
            assert op.done and op.WhichOneof("result") == "error"
            assert op.error.code == code_pb2.FAILED_PRECONDITION
            assert op.error.message == "LiSSA diverged; raise damping"
            info = error_info(op.error.details)
            assert (info.reason, info.domain) == ("SOLVER_DIVERGED", "pairdots.dev")
            assert info.metadata["operation"] == bad

            st = await expect_error(
                stub.GetOperation(operations_pb2.GetOperationRequest(name="operations/x-1")),
                grpc.StatusCode.NOT_FOUND, "operations/x-1")
            assert st.code == code_pb2.NOT_FOUND and error_info(st.details).reason == "NOT_FOUND"

    run(body)


def test_list_filter_and_pagination(store: JobStore,
                                    make_runner: Callable[..., JobRunner]) -> None:
    runner = make_runner(max_concurrent=1)
    done_names = []
    for i in range(5):
        rec = runner.submit("attack" if i % 2 == 0 else "repair", TYPE, b"", ok_job(str(i)))
        runner.wait(rec.name, HANG)
        done_names.append(rec.name)
    release, started = threading.Event(), threading.Event()
    running = runner.submit("attack", TYPE, b"", blocking_job(release, started)).name
    assert started.wait(HANG)

    async def names(stub: Any, flt: str = "", page_size: int = 0) -> list[str]:
        out: list[str] = []
        token = ""
        while True:
            resp = await stub.ListOperations(operations_pb2.ListOperationsRequest(
                name="operations", filter=flt, page_size=page_size, page_token=token))
            out += [op.name for op in resp.operations]
            token = resp.next_page_token
            if not token:
                return out

    async def body() -> None:
        async with serve(store, runner) as stub:
            everything = [running, *done_names[::-1]]
            assert await names(stub) == everything
            assert await names(stub, page_size=2) == everything
            attacks = [running, done_names[4], done_names[2], done_names[0]]
            assert await names(stub, "kind=attack") == attacks
            assert await names(stub, 'kind = "repair"', page_size=1) == [done_names[3],
                                                                         done_names[1]]
            assert await names(stub, "state=RUNNING") == [running]
            assert await names(stub, "state=running AND kind=attack") == [running]
            assert await names(stub, "done=true AND kind=attack") == attacks[1:]
            assert await names(stub, "done=false") == [running]
            assert await names(stub, "done=true AND state=RUNNING") == []
            resp = await stub.ListOperations(operations_pb2.ListOperationsRequest(page_size=1))
            assert len(resp.operations) == 1 and resp.next_page_token
            for bad in ("kind=attack OR kind=repair", "owner=me", "state=DONE", "kind=a AND kind=b",
                        "done=maybe", "kind"):
                await expect_error(stub.ListOperations(
                    operations_pb2.ListOperationsRequest(filter=bad)),
                    grpc.StatusCode.INVALID_ARGUMENT, "filter")
            st = await expect_error(stub.ListOperations(operations_pb2.ListOperationsRequest(
                page_token="not-a-token")), grpc.StatusCode.INVALID_ARGUMENT, "page_token")
            bad_req = error_details_pb2.BadRequest()
            assert any(d.Unpack(bad_req) for d in st.details)
            assert bad_req.field_violations[0].field == "page_token"
            await expect_error(stub.ListOperations(operations_pb2.ListOperationsRequest(
                page_token=resp.next_page_token, filter="kind=attack")),
                grpc.StatusCode.INVALID_ARGUMENT, "same filter")
            await expect_error(stub.ListOperations(operations_pb2.ListOperationsRequest(
                page_size=-3)), grpc.StatusCode.INVALID_ARGUMENT, "page_size")
            await expect_error(stub.ListOperations(operations_pb2.ListOperationsRequest(
                name="projects/p")), grpc.StatusCode.INVALID_ARGUMENT, "name")
        release.set()

    run(body)


def test_cancel_and_delete(store: JobStore, make_runner: Callable[..., JobRunner]) -> None:
    runner = make_runner()
    release, started = threading.Event(), threading.Event()
    name = runner.submit("attack", TYPE, b"", blocking_job(release, started)).name
    assert started.wait(HANG)

    async def body() -> None:
        async with serve(store, runner) as stub:
            await expect_error(stub.DeleteOperation(
                operations_pb2.DeleteOperationRequest(name=name)),
                grpc.StatusCode.FAILED_PRECONDITION, "cancel it first")
            await stub.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=name))
            assert op.done and op.error.code == code_pb2.CANCELLED
            assert error_info(op.error.details).reason == "CANCELLED"
            # AIP-151: cancelling a finished operation is an OK no-op
            await stub.CancelOperation(operations_pb2.CancelOperationRequest(name=name))
            await expect_error(stub.CancelOperation(
                operations_pb2.CancelOperationRequest(name="operations/attack-0")),
                grpc.StatusCode.NOT_FOUND, "does not exist")
            await stub.DeleteOperation(operations_pb2.DeleteOperationRequest(name=name))
            await expect_error(stub.GetOperation(operations_pb2.GetOperationRequest(name=name)),
                               grpc.StatusCode.NOT_FOUND, name)
            await expect_error(stub.DeleteOperation(
                operations_pb2.DeleteOperationRequest(name=name)),
                grpc.StatusCode.NOT_FOUND, name)

    run(body)
    assert not release.is_set()  # the job stopped because of the cancel, not a release


def test_wait_operation(store: JobStore, make_runner: Callable[..., JobRunner]) -> None:
    runner = make_runner()
    release, started = threading.Event(), threading.Event()
    name = runner.submit("repair", TYPE, b"", blocking_job(release, started)).name
    assert started.wait(HANG)

    async def body() -> None:
        async with serve(store, runner) as stub:
            short = duration_pb2.Duration(nanos=100_000_000)
            op = await stub.WaitOperation(operations_pb2.WaitOperationRequest(name=name,
                                                                              timeout=short))
            assert op.name == name and not op.done  # timed out: latest state, not an error

            long = duration_pb2.Duration(seconds=30)
            waiter = asyncio.ensure_future(stub.WaitOperation(
                operations_pb2.WaitOperationRequest(name=name, timeout=long)))
            # the event loop is not blocked by the pending wait: other RPCs are served
            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=name))
            assert not op.done and not waiter.done()
            release.set()
            op = await waiter
            assert op.done and op.WhichOneof("result") == "response"
            result = wrappers_pb2.StringValue()
            op.response.Unpack(result)
            assert result.value == "released"
            # done already: returns at once even with the default (unset) timeout
            op = await stub.WaitOperation(operations_pb2.WaitOperationRequest(name=name))
            assert op.done

            await expect_error(stub.WaitOperation(operations_pb2.WaitOperationRequest(
                name=name, timeout=duration_pb2.Duration(seconds=-1))),
                grpc.StatusCode.INVALID_ARGUMENT, "timeout")
            await expect_error(stub.WaitOperation(operations_pb2.WaitOperationRequest(
                name="operations/none-1")), grpc.StatusCode.NOT_FOUND, "operations/none-1")

    run(body)


def test_wait_respects_the_rpc_deadline(store: JobStore,
                                        make_runner: Callable[..., JobRunner]) -> None:
    runner = make_runner()
    release = threading.Event()
    name = runner.submit("attack", TYPE, b"", blocking_job(release)).name

    async def body() -> None:
        async with serve(store, runner) as stub:
            # default wait is 60 s, but the client allows 2 s: the latest state comes back
            # instead of DEADLINE_EXCEEDED
            op = await stub.WaitOperation(operations_pb2.WaitOperationRequest(name=name),
                                          timeout=2.0)
            assert not op.done
        release.set()

    run(body)


def test_restart_keeps_finished_and_interrupts_unfinished(db_path: Path) -> None:
    # --- first "process": one job finishes, one is running when the server stops ---
    store1 = JobStore(db_path)
    runner1 = JobRunner(store1)
    finished = runner1.submit("attack", TYPE, b"", ok_job("kept")).name
    runner1.wait(finished, HANG)
    started = threading.Event()
    running = runner1.submit("repair", TYPE, b"", blocking_job(threading.Event(), started)).name
    assert started.wait(HANG)
    # a row some earlier crashed process left behind as RUNNING (no thread owns it)
    orphan = store1.create("attack", TYPE, b"").name
    store1.set_running(orphan)

    async def first() -> None:
        async with serve(store1, runner1) as stub:
            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=running))
            assert not op.done

    run(first)
    assert runner1.shutdown(grace_s=HANG) == 1  # the orphan is not this runner's job
    store1.close()

    # --- second "process" on the same file ---
    store2 = JobStore(db_path)
    assert store2.mark_interrupted_on_startup() == 1  # the orphan
    runner2 = JobRunner(store2)

    async def second() -> None:
        async with serve(store2, runner2) as stub:
            op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=finished))
            result = wrappers_pb2.StringValue()
            assert op.done and op.response.Unpack(result) and result.value == "kept"
            for name in (running, orphan):
                op = await stub.GetOperation(operations_pb2.GetOperationRequest(name=name))
                assert op.done and op.error.code == code_pb2.ABORTED
                assert error_info(op.error.details).reason == "INTERRUPTED"
                assert "submit it again" in op.error.message
            resp = await stub.ListOperations(operations_pb2.ListOperationsRequest(
                filter="state=FAILED"))
            assert {op.name for op in resp.operations} == {running, orphan}

    try:
        run(second)
    finally:
        runner2.shutdown(grace_s=HANG)
        store2.close()


def test_parse_filter_grammar() -> None:
    from pairdots_server.service.jobs.store import JobState

    assert parse_filter("") == (None, None)
    assert parse_filter("  kind=attack  ") == ("attack", None)
    assert parse_filter('state="succeeded"') == (None, {JobState.SUCCEEDED})
    assert parse_filter("done=false AND kind=repair") == (
        "repair", {JobState.PENDING, JobState.RUNNING})
    assert parse_filter("done=true AND state=PENDING") == (None, set())
    for bad in ("kind=attack and state=RUNNING", "kind==attack", "kind=", "x=1", "state=X"):
        with pytest.raises(errors.InvalidArgument, match="filter"):
            parse_filter(bad)
