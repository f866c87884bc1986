"""The asyncio client has the sync client's behaviour (same fake server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import code_pb2
from pairdots_client_fakes import OK, Harness, rich_status

from pairdots import (
    AsyncPairdotsClient,
    AttackMode,
    AttackOutcome,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    JobProgress,
    NotFoundError,
    PairdotsClient,
    RepairOutcome,
    RpcCancelledError,
    UnavailableError,
)

T = TypeVar("T")


def run(factory: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await factory()
    return asyncio.run(main())


def test_async_parity_models_and_explain(harness: Harness, make_config) -> None:
    cfg = make_config(harness.address, token="tok")

    async def go() -> tuple[Any, Any, Any]:
        async with AsyncPairdotsClient(cfg) as client:
            return (await client.list_models(), await client.get_model("tiny-sst2"),
                    await client.explain("a gripping , funny film", top_words=1))

    models, model, expl = run(go)
    with PairdotsClient(cfg) as sync:
        assert models == sync.list_models()
        assert model == sync.get_model("tiny-sst2")
        sync_expl = sync.explain("a gripping , funny film", top_words=1)
    assert expl == sync_expl and expl.raw == sync_expl.raw
    assert harness.service.calls["Explain"][0]["authorization"] == "Bearer tok"


def test_async_retry_and_no_retry(harness: Harness, make_config) -> None:
    unavailable = ("abort", rich_status(code_pb2.UNAVAILABLE, "starting", reason="STARTING"))
    harness.service.scripts["Explain"] = [unavailable, OK]
    harness.service.scripts["GetModel"] = [("abort", rich_status(
        code_pb2.INVALID_ARGUMENT, "bad name", reason="BAD", violations=(("name", "empty"),)))]
    harness.service.scripts["ListModels"] = [unavailable] * 3

    async def go() -> list[type[BaseException] | str]:
        out: list[type[BaseException] | str] = []
        async with AsyncPairdotsClient(make_config(harness.address, max_retries=2)) as client:
            out.append((await client.explain("x")).model)
            for call in (lambda: client.get_model("tiny-sst2"), client.list_models):
                try:
                    await call()
                except (InvalidArgumentError, UnavailableError) as err:
                    out.append(type(err))
        return out

    assert run(go) == ["tiny-sst2", InvalidArgumentError, UnavailableError]
    assert len(harness.service.calls["Explain"]) == 2
    assert len(harness.service.calls["GetModel"]) == 1
    assert len(harness.service.calls["ListModels"]) == 3


def test_async_deadline_and_not_found(harness: Harness, make_config) -> None:
    harness.service.scripts["Explain"] = [("hang", 30.0)]

    async def go() -> None:
        async with AsyncPairdotsClient(make_config(harness.address)) as client:
            with pytest.raises(DeadlineExceededError) as info:
                await client.explain("x", timeout=0.3)
            assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
            with pytest.raises(NotFoundError) as nf:
                await client.get_model("missing")
            assert nf.value.reason == "MODEL_NOT_FOUND"

    run(go)


def test_async_operations(harness: Harness, make_config) -> None:
    seen: list[JobProgress] = []

    async def go() -> tuple[Any, Any]:
        async with AsyncPairdotsClient(make_config(harness.address)) as client:
            a = await client.attack([("x", 0)], mode=AttackMode.PROMOTE_WRONG,
                                    examples_per_test=1)
            outcome = await client.wait_operation(a.name, timeout=10.0, progress=seen.append)
            r = await client.repair([("x", 0)], examples_per_error=1)
            await client.cancel_operation(r.name)
            with pytest.raises(RpcCancelledError):
                await client.wait_operation(r.name, timeout=10.0)
            page = await client.list_operations()
            return outcome, page

    outcome, page = run(go)
    assert isinstance(outcome, AttackOutcome) and outcome.edits[0].train_index == 7
    assert [p.stage for p in seen] == ["perturbing", "retraining", "done"]
    assert len(page.operations) == 2 and all(op.done for op in page.operations)


def test_async_wait_fallback_and_failure(harness_no_wait: Harness, make_config) -> None:
    h = harness_no_wait

    async def go() -> Any:
        async with AsyncPairdotsClient(make_config(h.address)) as client:
            r = await client.repair([("x", 0)], examples_per_error=1)
            outcome = await client.wait_operation(r.name, timeout=10.0)
            h.ops.fail_with = rich_status(code_pb2.FAILED_PRECONDITION, "no index",
                                          reason="NO_INDEX")
            a = await client.attack([("x", 0)], mode=AttackMode.RANDOM, examples_per_test=1)
            with pytest.raises(FailedPreconditionError) as info:
                await client.wait_operation(a.name, timeout=10.0)
            assert info.value.reason == "NO_INDEX"
            return outcome

    outcome = run(go)
    assert isinstance(outcome, RepairOutcome) and outcome.notes == ("repaired",)
    assert h.ops.calls["WaitOperation"] == 1  # UNIMPLEMENTED once, then GetOperation polls
