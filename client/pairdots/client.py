"""The synchronous client, and the request builders it shares with the asyncio client.

    from pairdots import ClientConfig, PairdotsClient
    with PairdotsClient(ClientConfig.from_env()) as client:
        expl = client.explain("a gripping, funny film", model="minilm-sst2")

Every call carries a deadline (its `timeout`, else ClientConfig.default_timeout_s) shared by
all its attempts, the bearer token as ``authorization: Bearer <token>`` metadata, and is
retried on UNAVAILABLE / RESOURCE_EXHAUSTED only (pairdots.retry). Failures raise the typed
exceptions of pairdots.errors.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from pairdots import operations as ops
from pairdots.config import ClientConfig
from pairdots.errors import PairdotsError, UnimplementedError, error_from_rpc
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

__all__ = ["PairdotsClient", "ProgressCallback"]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

#: Called by wait_operation with the operation's progress whenever it changes.
ProgressCallback = Callable[[JobProgress], None]

#: Extra time a WaitOperation RPC may take beyond the wait it asks the server for.
WAIT_RPC_MARGIN_S = 2.0


# ---- request builders (shared with pairdots.aio) --------------------------------------------

def resolve_model(config: ClientConfig, model: str | None) -> str:
    name = model if model is not None else config.default_model
    if not name:
        raise ValueError("no model named: pass model=... or set ClientConfig.default_model "
                         "(PAIRDOTS_MODEL); list_models() shows the served names")
    return name


def explain_request(
    config: ClientConfig, text: str, *, model: str | None, target_label: int | None,
    gold_label: int | None, top_words: int | None, word_positions: Sequence[int],
    examples_per_word: int, saliency: SaliencyOptions | None,
    influence: InfluenceOptions | None,
) -> pairdots_pb2.ExplainRequest:
    """Build an ExplainRequest; None/empty arguments leave the server defaults."""
    req = pairdots_pb2.ExplainRequest(
        model=resolve_model(config, model), text=text, target_label=target_label,
        gold_label=gold_label, top_words=top_words,
        word_positions=[int(p) for p in word_positions], examples_per_word=examples_per_word,
    )
    if saliency is not None:
        req.saliency.CopyFrom(saliency.to_proto())
    if influence is not None:
        req.influence.CopyFrom(influence.to_proto())
    return req


def attack_request(
    config: ClientConfig, examples: Sequence[LabeledText | tuple[str, int]], *,
    model: str | None, mode: AttackMode, examples_per_test: int,
    random_candidates: int | None, saliency: SaliencyOptions | None,
    influence: InfluenceOptions | None, retrain: RetrainOptions | None, seed: int,
    request_id: str | None = None,
) -> pairdots_pb2.AttackRequest:
    """Build an AttackRequest (paper §4.2). `request_id` None: a fresh UUID4 (AIP-155)."""
    req = pairdots_pb2.AttackRequest(
        model=resolve_model(config, model),
        examples=[LabeledText.coerce(e).to_proto() for e in examples],
        mode=pairdots_pb2.AttackMode.ValueType(int(mode)),
        examples_per_test=examples_per_test, random_candidates=random_candidates, seed=seed,
        request_id=request_id or str(uuid.uuid4()),
    )
    if saliency is not None:
        req.saliency.CopyFrom(saliency.to_proto())
    if influence is not None:
        req.influence.CopyFrom(influence.to_proto())
    if retrain is not None:
        req.retrain.CopyFrom(retrain.to_proto())
    return req


def repair_request(
    config: ClientConfig, examples: Sequence[LabeledText | tuple[str, int]], *,
    model: str | None, examples_per_error: int, mode: RepairMode,
    saliency: SaliencyOptions | None, influence: InfluenceOptions | None,
    retrain: RetrainOptions | None, seed: int, request_id: str | None = None,
) -> pairdots_pb2.RepairRequest:
    """Build a RepairRequest (paper §4.3). `request_id` None: a fresh UUID4 (AIP-155)."""
    req = pairdots_pb2.RepairRequest(
        model=resolve_model(config, model),
        examples=[LabeledText.coerce(e).to_proto() for e in examples],
        examples_per_error=examples_per_error,
        mode=pairdots_pb2.RepairMode.ValueType(int(mode)), seed=seed,
        request_id=request_id or str(uuid.uuid4()),
    )
    if saliency is not None:
        req.saliency.CopyFrom(saliency.to_proto())
    if influence is not None:
        req.influence.CopyFrom(influence.to_proto())
    if retrain is not None:
        req.retrain.CopyFrom(retrain.to_proto())
    return req


def wait_expired(name: str, timeout_s: float) -> PairdotsError:
    from pairdots.errors import DeadlineExceededError

    return DeadlineExceededError(
        f"operation {name} did not finish within {timeout_s:g} s; it keeps running on the "
        "server: wait again, or cancel_operation() it", reason="CLIENT_WAIT_TIMEOUT",
        error_metadata={"operation": name})


# ---- the client -----------------------------------------------------------------------------

class PairdotsClient:
    """Blocking client for pairdots.v1.PairdotsService and its google.longrunning.Operations.

    Use as a context manager (or call close()). Thread-safe: one channel, many calls.
    """

    def __init__(self, config: ClientConfig | None = None, *,
                 channel: grpc.Channel | None = None) -> None:
        self.config = config if config is not None else ClientConfig()
        self._retry = RetryPolicy.from_config(self.config)
        if channel is None:
            creds = self.config.channel_credentials()
            options = self.config.grpc_options()
            if creds is None:
                channel = grpc.insecure_channel(self.config.address, options=options)
            else:
                channel = grpc.secure_channel(self.config.address, creds, options=options)
        self._channel = channel
        self._stub = pairdots_pb2_grpc.PairdotsServiceStub(channel)
        self._ops: Any = ops.operations_stub(channel)
        self._metadata = self.config.metadata()
        #: False once the server answered WaitOperation with UNIMPLEMENTED: poll instead.
        self._use_wait = True

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the retry loop ------------------------------------------------------------------

    def _invoke(self, what: str, method: grpc.UnaryUnaryMultiCallable[_Req, _Resp],
                request: _Req, timeout: float | None) -> _Resp:
        deadline = CallDeadline(timeout if timeout is not None else self.config.default_timeout_s)
        retries = 0
        while True:
            try:
                return method(request, timeout=max(deadline.remaining(), 0.001),
                              metadata=self._metadata)
            except grpc.RpcError as rpc_err:
                error = error_from_rpc(rpc_err)
            wait = self._retry.delay(error, retries, deadline.remaining())
            if wait is None:
                raise error
            time.sleep(wait)
            retries += 1

    # -- models ----------------------------------------------------------------------------

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The served model bundles, sorted by name."""
        resp = self._invoke("ListModels", self._stub.ListModels,
                            pairdots_pb2.ListModelsRequest(), timeout)
        return [ModelInfo.from_proto(m) for m in resp.models]

    def get_model(self, name: str, *, timeout: float | None = None) -> ModelInfo:
        """One served model; NotFoundError when unknown."""
        resp = self._invoke("GetModel", self._stub.GetModel,
                            pairdots_pb2.GetModelRequest(name=name), timeout)
        return ModelInfo.from_proto(resp.model)

    # -- explain ---------------------------------------------------------------------------

    def explain(
        self, text: str, *, model: str | None = None, target_label: int | None = None,
        gold_label: int | None = None, top_words: int | None = None,
        word_positions: Sequence[int] = (), examples_per_word: int = 0,
        saliency: SaliencyOptions | None = None, influence: InfluenceOptions | None = None,
        timeout: float | None = None,
    ) -> Explanation:
        """Explain the prediction for `text`: word saliency (paper Eq. 1-2), and for the
        `top_words` most salient words (or `word_positions`) the supporting / opposing training
        examples (Eq. 5) with their responsible words (Eq. 8). `gold_label` different from the
        explained label adds the gold explanation (error analysis, §4.1)."""
        req = explain_request(
            self.config, text, model=model, target_label=target_label, gold_label=gold_label,
            top_words=top_words, word_positions=word_positions,
            examples_per_word=examples_per_word, saliency=saliency, influence=influence)
        return Explanation.from_proto(self._invoke("Explain", self._stub.Explain, req, timeout))

    # -- attack / repair -------------------------------------------------------------------

    def attack(
        self, examples: Sequence[LabeledText | tuple[str, int]], *, mode: AttackMode,
        examples_per_test: int, model: str | None = None,
        random_candidates: int | None = None, saliency: SaliencyOptions | None = None,
        influence: InfluenceOptions | None = None, retrain: RetrainOptions | None = None,
        seed: int = 0, timeout: float | None = None, request_id: str | None = None,
    ) -> OperationHandle:
        """Start an Attack operation (paper §4.2); wait_operation() gives an AttackOutcome.

        `request_id` (AIP-155; default a fresh UUID4) is sent with every retry of this call,
        so a retried Attack returns the same operation and never starts the job twice."""
        req = attack_request(
            self.config, examples, model=model, mode=mode, examples_per_test=examples_per_test,
            random_candidates=random_candidates, saliency=saliency, influence=influence,
            retrain=retrain, seed=seed, request_id=request_id)
        return operation_from_proto(self._invoke("Attack", self._stub.Attack, req, timeout))

    def repair(
        self, examples: Sequence[LabeledText | tuple[str, int]], *, examples_per_error: int,
        model: str | None = None, mode: RepairMode = RepairMode.UNSPECIFIED,
        saliency: SaliencyOptions | None = None, influence: InfluenceOptions | None = None,
        retrain: RetrainOptions | None = None, seed: int = 0, timeout: float | None = None,
        request_id: str | None = None,
    ) -> OperationHandle:
        """Start a Repair operation (paper §4.3); wait_operation() gives a RepairOutcome.
        `request_id`: as for attack()."""
        req = repair_request(
            self.config, examples, model=model, examples_per_error=examples_per_error,
            mode=mode, saliency=saliency, influence=influence, retrain=retrain, seed=seed,
            request_id=request_id)
        return operation_from_proto(self._invoke("Repair", self._stub.Repair, req, timeout))

    # -- operations ------------------------------------------------------------------------

    def get_operation(self, name: str, *, timeout: float | None = None) -> OperationHandle:
        """The current state of an operation; NotFoundError when unknown."""
        op = self._invoke("GetOperation", self._ops.GetOperation, ops.get_request(name), timeout)
        return operation_from_proto(op)

    def list_operations(self, filter: str = "", page_size: int = 0,
                        page_token: str = "", *, timeout: float | None = None) -> OperationPage:
        """One page of operations, e.g. ``filter="kind=attack AND state=RUNNING"``."""
        resp = self._invoke("ListOperations", self._ops.ListOperations,
                            ops.list_request(filter, page_size, page_token), timeout)
        return page_from_proto(resp)

    def cancel_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Ask the server to cancel; a finished operation is left as it is."""
        self._invoke("CancelOperation", self._ops.CancelOperation, ops.cancel_request(name),
                     timeout)

    def delete_operation(self, name: str, *, timeout: float | None = None) -> None:
        """Forget a finished operation (FailedPreconditionError while it runs)."""
        self._invoke("DeleteOperation", self._ops.DeleteOperation, ops.delete_request(name),
                     timeout)

    def wait_operation(self, name: str, timeout: float | None = None,
                       progress: ProgressCallback | None = None) -> OperationOutcome:
        """Wait until the operation is done and return its AttackOutcome / RepairOutcome.

        Waits with WaitOperation in windows of ClientConfig.poll_interval_s (falling back to
        GetOperation polls when the server lacks WaitOperation), calling `progress` whenever
        the JobMetadata changes. Raises the operation's error as a typed PairdotsError
        (RpcCancelledError after a cancel), or DeadlineExceededError (reason
        CLIENT_WAIT_TIMEOUT) after `timeout` (default ClientConfig.wait_timeout_s) seconds;
        the operation keeps running then.
        """
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
                    handle = operation_from_proto(self._invoke(
                        "WaitOperation", self._ops.WaitOperation, ops.wait_request(name, window),
                        window + WAIT_RPC_MARGIN_S))
                except UnimplementedError:
                    self._use_wait = False
            if handle is None:
                handle = self.get_operation(name, timeout=window + WAIT_RPC_MARGIN_S)
            if progress is not None and handle.progress is not None and handle.progress != last:
                last = handle.progress
                progress(handle.progress)
            if handle.done:
                return handle.result()
            if not self._use_wait:
                time.sleep(max(0.0, min(window, deadline.remaining())))
