"""The asyncio client: the same methods as pairdots.PairdotsClient, as coroutines.

    async with AsyncPairdotsClient(ClientConfig.from_env()) as client:
        expl = await client.explain("a gripping, funny film", model="minilm-sst2")

Create it inside a running event loop (grpc.aio channels belong to the loop they start on).
The calls are pairdots.calls' plans, run here with awaits and asyncio.sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from pairdots import operations as ops
from pairdots.calls import (
    AttackArgs,
    BatchInputArg,
    ClientCore,
    ExplainArgs,
    ExplainBatchArgs,
    Plan,
    ProgressCallback,
    RepairArgs,
    Sleep,
    Stepper,
    open_channel,
)
from pairdots.config import ClientConfig
from pairdots.operations import (
    BatchResultsPage,
    OperationHandle,
    OperationOutcome,
    OperationPage,
)
from pairdots.options import AttackMode, LabeledText
from pairdots.results import Explanation, ModelInfo
from pairdots.v1 import pairdots_pb2_grpc

if TYPE_CHECKING:
    from typing import Self, Unpack

__all__ = ["AsyncPairdotsClient"]

T = TypeVar("T")


class AsyncPairdotsClient:
    """asyncio client for pairdots.v1.PairdotsService and google.longrunning.Operations.

    Use as an async context manager (or await close()).
    """

    def __init__(self, config: ClientConfig | None = None, *,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.config = config if config is not None else ClientConfig()
        self._core = ClientCore(self.config)
        self._channel: grpc.aio.Channel = channel if channel is not None else open_channel(
            self.config, grpc.aio)
        self._stubs: dict[str, Any] = {
            "service": pairdots_pb2_grpc.PairdotsServiceStub(self._channel),
            "operations": ops.operations_stub(self._channel),
        }

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def _run(self, plan: Plan[T]) -> T:
        """Perform a plan's steps: awaited RPCs and asyncio.sleep."""
        s = Stepper(plan)
        while (step := s.next()) is not None:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                continue
            try:
                method = getattr(self._stubs[step.stub], step.method)
                s.result = await method(step.request, timeout=step.timeout,
                                        metadata=self._core.metadata)
            except grpc.RpcError as exc:
                s.failure = exc
        return s.value  # type: ignore[return-value]

    # -- models ----------------------------------------------------------------------------

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served model bundles, sorted by name."""
        return await self._run(self._core.list_models(timeout))

    async def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One served model; NotFoundError when unknown."""
        return await self._run(self._core.get_model(name, timeout))

    # -- explain, attack, repair (arguments: pairdots.calls.ExplainArgs, ...) ----------------

    async def explain(self, text: str, **options: Unpack[ExplainArgs]) -> Explanation:
        """See PairdotsClient.explain."""
        return await self._run(self._core.explain(text, **options))

    async def attack(self, examples: Sequence[LabeledText | tuple[str, int]], *, mode: AttackMode,
                     examples_per_test: int, **options: Unpack[AttackArgs]) -> OperationHandle:
        """Start an Attack operation (paper §4.2); wait_operation() gives an AttackOutcome."""
        return await self._run(self._core.attack(
            examples, mode=mode, examples_per_test=examples_per_test, **options))

    async def repair(self, examples: Sequence[LabeledText | tuple[str, int]], *,
                     examples_per_error: int, **options: Unpack[RepairArgs]) -> OperationHandle:
        """Start a Repair operation (paper §4.3); wait_operation() gives a RepairOutcome."""
        return await self._run(self._core.repair(
            examples, examples_per_error=examples_per_error, **options))

    async def explain_batch(self, inputs: Sequence[BatchInputArg] = (), *, input_path: str = "",
                      text_column: str = "", label_column: str = "", id_column: str = "",
                      **options: Unpack[ExplainBatchArgs]) -> OperationHandle:
        """Start an ExplainBatch operation over `inputs` (texts, (text, gold) or
        (text, gold, id)) or `input_path` on the server; wait_operation() gives an
        ExplainBatchOutcome, batch_results() the answers page by page."""
        return await self._run(self._core.explain_batch(
            inputs, input_path=input_path, text_column=text_column, label_column=label_column,
            id_column=id_column, **options))

    async def batch_results(self, operation: str, page_size: int = 0, page_token: str = "", *,
                      timeout: float | None = None) -> BatchResultsPage:
        """One page of an ExplainBatch operation's results (see BatchResultsPage)."""
        return await self._run(self._core.batch_results(operation, page_size, page_token, timeout))

    # -- operations ------------------------------------------------------------------------

    async def get_operation(self, name: str, *, timeout: float | None = None) -> OperationHandle:
        """The current state of an operation; NotFoundError when unknown."""
        return await self._run(self._core.get_operation(name, timeout))

    async def list_operations(self, filter: str = "", page_size: int = 0, page_token: str = "", *,
                              timeout: float | None = None) -> OperationPage:
        """One page of operations, e.g. ``filter="kind=attack AND state=RUNNING"``."""
        return await self._run(self._core.list_operations(filter, page_size, page_token, timeout))

    async def cancel_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Ask the server to cancel; a finished operation is left as it is."""
        await self._run(self._core.cancel_operation(name, timeout))

    async def delete_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Forget a finished operation (FailedPreconditionError while it runs)."""
        await self._run(self._core.delete_operation(name, timeout))

    async def wait_operation(self, name: str, timeout: float | None = None,
                             progress: ProgressCallback | None = None) -> OperationOutcome:
        """Wait until the operation is done; see pairdots.calls.ClientCore.wait_operation."""
        return await self._run(self._core.wait_operation(name, timeout, progress))
