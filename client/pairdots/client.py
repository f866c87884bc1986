"""The synchronous client.

    from pairdots import ClientConfig, PairdotsClient
    with PairdotsClient(ClientConfig.from_env()) as client:
        expl = client.explain("a gripping, funny film", model="minilm-sst2")

Every call carries a deadline (its `timeout`, else ClientConfig.default_timeout_s) shared by
all its attempts, the bearer token as ``authorization: Bearer <token>`` metadata, and is
retried on UNAVAILABLE / RESOURCE_EXHAUSTED only (pairdots.retry). Failures raise the typed
exceptions of pairdots.errors. The calls themselves (requests, retries, waiting) are written
once in pairdots.calls and shared with the asyncio client; this class runs them blocking.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

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

__all__ = ["PairdotsClient", "ProgressCallback"]

T = TypeVar("T")


class PairdotsClient:
    """Blocking client for pairdots.v1.PairdotsService and its google.longrunning.Operations.

    Use as a context manager (or call close()). Thread-safe: one channel, many calls.
    """

    def __init__(self, config: ClientConfig | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        self.config = config if config is not None else ClientConfig()
        self._core = ClientCore(self.config)
        self._channel: grpc.Channel = channel if channel is not None else open_channel(
            self.config, grpc)
        self._stubs: dict[str, Any] = {
            "service": pairdots_pb2_grpc.PairdotsServiceStub(self._channel),
            "operations": ops.operations_stub(self._channel),
        }

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _run(self, plan: Plan[T]) -> T:
        """Perform a plan's steps: blocking RPCs and time.sleep."""
        s = Stepper(plan)
        while (step := s.next()) is not None:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                continue
            try:
                method = getattr(self._stubs[step.stub], step.method)
                s.result = method(step.request, timeout=step.timeout, metadata=self._core.metadata)
            except grpc.RpcError as exc:
                s.failure = exc
        return s.value  # type: ignore[return-value]

    # -- models ----------------------------------------------------------------------------

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served model bundles, sorted by name."""
        return self._run(self._core.list_models(timeout))

    def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One served model; NotFoundError when unknown."""
        return self._run(self._core.get_model(name, timeout))

    # -- explain, attack, repair (arguments: pairdots.calls.ExplainArgs, ...) ----------------

    def explain(self, text: str, **options: Unpack[ExplainArgs]) -> Explanation:
        """Explain the prediction for `text`: word saliency (paper Eq. 1-2), and for the
        `top_words` most salient words (or `word_positions`) the supporting / opposing training
        examples (Eq. 5) with their responsible words (Eq. 8). `gold_label` different from the
        explained label adds the gold explanation (error analysis, §4.1)."""
        return self._run(self._core.explain(text, **options))

    def attack(self, examples: Sequence[LabeledText | tuple[str, int]], *, mode: AttackMode,
               examples_per_test: int, **options: Unpack[AttackArgs]) -> OperationHandle:
        """Start an Attack operation (paper §4.2); wait_operation() gives an AttackOutcome."""
        return self._run(self._core.attack(
            examples, mode=mode, examples_per_test=examples_per_test, **options))

    def repair(self, examples: Sequence[LabeledText | tuple[str, int]], *,
               examples_per_error: int, **options: Unpack[RepairArgs]) -> OperationHandle:
        """Start a Repair operation (paper §4.3); wait_operation() gives a RepairOutcome."""
        return self._run(self._core.repair(
            examples, examples_per_error=examples_per_error, **options))

    def explain_batch(self, inputs: Sequence[BatchInputArg] = (), *, input_path: str = "",
                      text_column: str = "", label_column: str = "", id_column: str = "",
                      **options: Unpack[ExplainBatchArgs]) -> OperationHandle:
        """Start an ExplainBatch operation over `inputs` (texts, (text, gold) or
        (text, gold, id)) or `input_path` on the server; wait_operation() gives an
        ExplainBatchOutcome, batch_results() the answers page by page."""
        return self._run(self._core.explain_batch(
            inputs, input_path=input_path, text_column=text_column, label_column=label_column,
            id_column=id_column, **options))

    def batch_results(self, operation: str, page_size: int = 0, page_token: str = "", *,
                      timeout: float | None = None) -> BatchResultsPage:
        """One page of an ExplainBatch operation's results (see BatchResultsPage)."""
        return self._run(self._core.batch_results(operation, page_size, page_token, timeout))

    # -- operations ------------------------------------------------------------------------

    def get_operation(self, name: str, *, timeout: float | None = None) -> OperationHandle:
        """The current state of an operation; NotFoundError when unknown."""
        return self._run(self._core.get_operation(name, timeout))

    def list_operations(self, filter: str = "", page_size: int = 0, page_token: str = "", *,
                        timeout: float | None = None) -> OperationPage:
        """One page of operations, e.g. ``filter="kind=attack AND state=RUNNING"``."""
        return self._run(self._core.list_operations(filter, page_size, page_token, timeout))

    def cancel_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Ask the server to cancel; a finished operation is left as it is."""
        self._run(self._core.cancel_operation(name, timeout))

    def delete_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Forget a finished operation (FailedPreconditionError while it runs)."""
        self._run(self._core.delete_operation(name, timeout))

    def wait_operation(self, name: str, timeout: float | None = None,
                       progress: ProgressCallback | None = None) -> OperationOutcome:
        """Wait until the operation is done; see pairdots.calls.ClientCore.wait_operation."""
        return self._run(self._core.wait_operation(name, timeout, progress))
