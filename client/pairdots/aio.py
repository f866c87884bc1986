"""The asyncio client: the same methods as pairdots.PairdotsClient, as coroutines.

    async with AsyncPairdotsClient(ClientConfig.from_env()) as client:
        expl = await client.explain("a gripping, funny film", model="minilm-sst2")

Create it inside a running event loop (grpc.aio channels belong to the loop they start on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from pairdots import operations as ops
from pairdots.client import (
    WAIT_RPC_MARGIN_S,
    ProgressCallback,
    attack_request,
    explain_request,
    repair_request,
    wait_expired,
)
from pairdots.config import ClientConfig
from pairdots.errors import UnimplementedError, error_from_rpc
from pairdots.operations import (
    JobProgress,
    OperationHandle,
    OperationOutcome,
    OperationPage,
    operation_from_proto,
    page_from_proto,
)
from pairdots.results import (
    AttackMode,
    Explanation,
    InfluenceOptions,
    LabeledText,
    ModelInfo,
    RepairMode,
    RetrainOptions,
    SaliencyOptions,
)
from pairdots.retry import CallDeadline, RetryPolicy
from pairdots.v1 import pairdots_pb2, pairdots_pb2_grpc

if TYPE_CHECKING:
    from typing import Self

__all__ = ["AsyncPairdotsClient"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


class AsyncPairdotsClient:
    """asyncio client for pairdots.v1.PairdotsService and google.longrunning.Operations.

    Use as an async context manager (or await close()).
    """

    def __init__(self, config: ClientConfig | None = None, *,
                 channel: grpc.aio.Channel | None = None) -> None:
        self.config = config if config is not None else ClientConfig()
        self._retry = RetryPolicy.from_config(self.config)
        if channel is None:
            creds = self.config.channel_credentials()
            options = self.config.grpc_options()
            if creds is None:
                channel = grpc.aio.insecure_channel(self.config.address, options=options)
            else:
                channel = grpc.aio.secure_channel(self.config.address, creds, options=options)
        self._channel = channel
        self._stub = pairdots_pb2_grpc.PairdotsServiceStub(channel)
        self._ops: Any = ops.operations_stub(channel)
        self._metadata = self.config.metadata()
        #: False once the server answered WaitOperation with UNIMPLEMENTED: poll instead.
        self._use_wait = True

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # -- the retry loop ------------------------------------------------------------------

    async def _invoke(self, what: str, method: grpc.aio.UnaryUnaryMultiCallable[_Req, _Resp],
                      request: _Req, timeout: float | None) -> _Resp:
        deadline = CallDeadline(timeout if timeout is not None else self.config.default_timeout_s)
        retries = 0
        while True:
            try:
                return await method(request, timeout=max(deadline.remaining(), 0.001),
                                    metadata=self._metadata)
            except grpc.RpcError as rpc_err:
                error = error_from_rpc(rpc_err)
            wait = self._retry.delay(error, retries, deadline.remaining())
            if wait is None:
                raise error
            await asyncio.sleep(wait)
            retries += 1

    # -- models ----------------------------------------------------------------------------

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served model bundles, sorted by name."""
        resp = await self._invoke("ListModels", self._stub.ListModels,
                                  pairdots_pb2.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    async def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One served model; NotFoundError when unknown."""
        resp = await self._invoke("GetModel", self._stub.GetModel,
                                  pairdots_pb2.GetModelRequest(name=name), timeout)
        return ModelInfo.from_proto(resp.model)

    # -- explain ---------------------------------------------------------------------------

    async def explain(
        self, text: str, *, model: str | None = None, target_label: int | None = None,
        gold_label: int | None = None, top_words: int | None = None,
        word_positions: Sequence[int] = (), examples_per_word: int = 0,
        saliency: SaliencyOptions | None = None, influence: InfluenceOptions | None = None,
        timeout: float | None = None,
    ) -> Explanation:
        """See PairdotsClient.explain."""
        req = explain_request(
            self.config, text, model=model, target_label=target_label, gold_label=gold_label,
            top_words=top_words, word_positions=word_positions,
            examples_per_word=examples_per_word, saliency=saliency, influence=influence)
        return Explanation.from_proto(
            await self._invoke("Explain", self._stub.Explain, req, timeout))

    # -- attack / repair -------------------------------------------------------------------

    async def attack(
        self, examples: Sequence[LabeledText | tuple[str, int]], *, mode: AttackMode,
        examples_per_test: int, model: str | None = None,
        random_candidates: int | None = None, saliency: SaliencyOptions | None = None,
        influence: InfluenceOptions | None = None, retrain: RetrainOptions | None = None,
        seed: int = 0, timeout: float | None = None, request_id: str | None = None,
    ) -> OperationHandle:
        """See PairdotsClient.attack."""
        req = attack_request(
            self.config, examples, model=model, mode=mode, examples_per_test=examples_per_test,
            random_candidates=random_candidates, saliency=saliency, influence=influence,
            retrain=retrain, seed=seed, request_id=request_id)
        return operation_from_proto(
            await self._invoke("Attack", self._stub.Attack, req, timeout))

    async def repair(
        self, examples: Sequence[LabeledText | tuple[str, int]], *, examples_per_error: int,
        model: str | None = None, mode: RepairMode = RepairMode.UNSPECIFIED,
        saliency: SaliencyOptions | None = None, influence: InfluenceOptions | None = None,
        retrain: RetrainOptions | None = None, seed: int = 0, timeout: float | None = None,
        request_id: str | None = None,
    ) -> OperationHandle:
        """See PairdotsClient.repair."""
        req = repair_request(
            self.config, examples, model=model, examples_per_error=examples_per_error,
            mode=mode, saliency=saliency, influence=influence, retrain=retrain, seed=seed,
            request_id=request_id)
        return operation_from_proto(
            await self._invoke("Repair", self._stub.Repair, req, timeout))

    # -- operations ------------------------------------------------------------------------

    async def get_operation(self, name: str, *, timeout: float | None = None) -> OperationHandle:
        """See PairdotsClient.get_operation."""
        op = await self._invoke("GetOperation", self._ops.GetOperation, ops.get_request(name),
                                timeout)
        return operation_from_proto(op)

    async def list_operations(self, filter: str = "", page_size: int = 0,
                              page_token: str = "", *,
                              timeout: float | None = None) -> OperationPage:
        """See PairdotsClient.list_operations."""
        resp = await self._invoke("ListOperations", self._ops.ListOperations,
                                  ops.list_request(filter, page_size, page_token), timeout)
        return page_from_proto(resp)

    async def cancel_operation(self, name: str, *, timeout: float | None = None) -> None:
        """See PairdotsClient.cancel_operation."""
        await self._invoke("CancelOperation", self._ops.CancelOperation,
                           ops.cancel_request(name), timeout)

    async def delete_operation(self, name: str, *, timeout: float | None = None) -> None:
        """See PairdotsClient.delete_operation."""
        await self._invoke("DeleteOperation", self._ops.DeleteOperation,
                           ops.delete_request(name), timeout)

    async def wait_operation(self, name: str, timeout: float | None = None,
                             progress: ProgressCallback | None = None) -> OperationOutcome:
        """See PairdotsClient.wait_operation."""
        total = timeout if timeout is not None else self.config.wait_timeout_s
        deadline = CallDeadline(total)
        last: JobProgress | None = None
        while True:
            remaining = deadline.remaining()
            if remaining <= 0:
                raise wait_expired(name, total)
            window = min(self.config.poll_interval_s, remaining)
            handle: OperationHandle | None = None
            if self._use_wait:
                try:
                    handle = operation_from_proto(await self._invoke(
                        "WaitOperation", self._ops.WaitOperation, ops.wait_request(name, window),
                        window + WAIT_RPC_MARGIN_S))
                except UnimplementedError:
                    self._use_wait = False
            if handle is None:
                handle = await self.get_operation(
                    name, timeout=window + WAIT_RPC_MARGIN_S)
            if progress is not None and handle.progress is not None and handle.progress != last:
                last = handle.progress
                progress(handle.progress)
            if handle.done:
                return handle.result()
            if not self._use_wait:
                await asyncio.sleep(max(0.0, min(window, deadline.remaining())))
