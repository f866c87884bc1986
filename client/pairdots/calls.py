"""Every call of the client, written once for the sync and the asyncio client.

A call is a *plan*: a generator that builds the request, yields the I/O it needs — `Rpc` (one
attempt of one RPC) or `Sleep` (a retry back-off or a poll interval) — and returns the typed
result. `PairdotsClient` (pairdots.client) runs plans with blocking calls and time.sleep,
`AsyncPairdotsClient` (pairdots.aio) with awaits and asyncio.sleep; request building, the
retry loop (pairdots.retry) and the wait-for-an-operation loop exist only here.

An Rpc step's failure is thrown back into the plan as the grpc.RpcError it raised.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar

import grpc

from pairdots import operations as ops
from pairdots.config import ClientConfig
from pairdots.errors import DeadlineExceededError, PairdotsError, UnimplementedError, error_from_rpc
from pairdots.operations import (
    BatchResultsPage,
    JobProgress,
    OperationHandle,
    OperationOutcome,
    OperationPage,
    operation_from_proto,
    page_from_proto,
)
from pairdots.options import (
    AttackMode,
    InfluenceOptions,
    LabeledText,
    RepairMode,
    RetrainOptions,
    SaliencyOptions,
)
from pairdots.results import Explanation, ModelInfo
from pairdots.retry import CallDeadline, RetryPolicy
from pairdots.v1 import pairdots_pb2

__all__ = [
    "AttackArgs", "BatchInputArg", "ClientCore", "ExplainArgs", "ExplainBatchArgs", "Plan", "ProgressCallback", "RepairArgs", "Rpc",
    "Sleep", "Stepper", "TimeoutArg", "open_channel",
]

T = TypeVar("T")

#: Called by wait_operation with the operation's progress whenever it changes.
ProgressCallback = Callable[[JobProgress], None]

#: Extra time a WaitOperation RPC may take beyond the wait it asks the server for.
WAIT_RPC_MARGIN_S = 2.0

SERVICE = "service"  # Rpc.stub: pairdots.v1.PairdotsService
OPERATIONS = "operations"  # Rpc.stub: google.longrunning.Operations


@dataclass(frozen=True)
class Rpc:
    """One attempt of one unary RPC: stub (SERVICE / OPERATIONS), method name, request and
    the attempt's timeout in seconds."""

    stub: str
    method: str
    request: Any
    timeout: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


Plan = Generator["Rpc | Sleep", Any, T]


class Stepper(Generic[T]):
    """Runs a plan one step at a time for a client: next() gives the step to perform (None
    once the plan returned, its value in .value); the client sets .result (or .failure, the
    RPC's grpc.RpcError) before the next call."""

    def __init__(self, plan: Plan[T]) -> None:
        self.plan = plan
        self.result: Any = None
        self.failure: grpc.RpcError | None = None
        self.value: T | None = None

    def next(self) -> Rpc | Sleep | None:
        try:
            if self.failure is None:
                step = self.plan.send(self.result)
            else:
                step = self.plan.throw(self.failure)
        except StopIteration as done:
            self.value = done.value
            return None
        self.result, self.failure = None, None
        return step


def open_channel(config: ClientConfig, grpc_module: Any) -> Any:
    """A channel to config.address from `grpc_module` (grpc or grpc.aio), TLS when configured."""
    creds = config.channel_credentials()
    options = config.grpc_options()
    if creds is None:
        return grpc_module.insecure_channel(config.address, options=options)
    return grpc_module.secure_channel(config.address, creds, options=options)


# -- the keyword arguments of the calls (one definition for both clients) ---------------------


class TimeoutArg(TypedDict, total=False):
    timeout: float | None  # seconds for the whole call, all attempts; default_timeout_s


class ExplainArgs(TimeoutArg, total=False):
    model: str | None
    target_label: int | None
    gold_label: int | None
    top_words: int | None
    word_positions: Sequence[int]
    examples_per_word: int
    saliency: SaliencyOptions | None
    influence: InfluenceOptions | None


class _JobArgs(TimeoutArg, total=False):
    model: str | None
    saliency: SaliencyOptions | None
    influence: InfluenceOptions | None
    retrain: RetrainOptions | None
    seed: int
    request_id: str | None


class AttackArgs(_JobArgs, total=False):
    random_candidates: int | None
    max_words: int | None
    adaptive: bool


class RepairArgs(_JobArgs, total=False):
    mode: RepairMode
    max_words: int | None


class ExplainBatchArgs(TimeoutArg, total=False):
    model: str | None
    top_words: int | None
    examples_per_word: int
    saliency: SaliencyOptions | None
    influence: InfluenceOptions | None
    request_id: str | None


# -- request builders -----------------------------------------------------------------------


def resolve_model(config: ClientConfig, model: str | None) -> str:
    name = model if model is not None else config.default_model
    if not name:
        raise ValueError("no model named: pass model=... or set ClientConfig.default_model "
                         "(PAIRDOTS_MODEL); list_models() shows the served names")
    return name


def _options(req: Any, saliency: SaliencyOptions | None, influence: InfluenceOptions | None,
             retrain: RetrainOptions | None = None) -> None:
    if saliency is not None:
        req.saliency.CopyFrom(saliency.to_proto())
    if influence is not None:
        req.influence.CopyFrom(influence.to_proto())
    if retrain is not None:
        req.retrain.CopyFrom(retrain.to_proto())


def explain_request(
    config: ClientConfig, text: str, *, model: str | None = None,
    target_label: int | None = None, gold_label: int | None = None,
    top_words: int | None = None, word_positions: Sequence[int] = (),
    examples_per_word: int = 0, saliency: SaliencyOptions | None = None,
    influence: InfluenceOptions | None = None,
) -> pairdots_pb2.ExplainRequest:
    """Build an ExplainRequest; None/empty arguments leave the server defaults."""
    req = pairdots_pb2.ExplainRequest(
        model=resolve_model(config, model), text=text, target_label=target_label,
        gold_label=gold_label, top_words=top_words,
        word_positions=[int(p) for p in word_positions], examples_per_word=examples_per_word,
    )
    _options(req, saliency, influence)
    return req


def _examples(examples: Sequence[LabeledText | tuple[str, int]]) -> list[pairdots_pb2.LabeledText]:
    return [LabeledText.coerce(e).to_proto() for e in examples]


def attack_request(
    config: ClientConfig, examples: Sequence[LabeledText | tuple[str, int]], *,
    mode: AttackMode, examples_per_test: int, model: str | None = None,
    random_candidates: int | None = None, saliency: SaliencyOptions | None = None,
    influence: InfluenceOptions | None = None, retrain: RetrainOptions | None = None,
    seed: int = 0, request_id: str | None = None, max_words: int | None = None,
    adaptive: bool = False,
) -> pairdots_pb2.AttackRequest:
    """Build an AttackRequest (paper §4.2). `request_id` None: a fresh UUID4 (AIP-155); the
    request is built once, so every retry of the call carries the same id and a retried
    Attack returns the same operation instead of starting the job twice."""
    req = pairdots_pb2.AttackRequest(
        model=resolve_model(config, model), examples=_examples(examples),
        mode=pairdots_pb2.AttackMode.ValueType(int(mode)),
        examples_per_test=examples_per_test, random_candidates=random_candidates, seed=seed,
        request_id=request_id or str(uuid.uuid4()), max_words=max_words, adaptive=adaptive,
    )
    _options(req, saliency, influence, retrain)
    return req


def repair_request(
    config: ClientConfig, examples: Sequence[LabeledText | tuple[str, int]], *,
    examples_per_error: int, model: str | None = None,
    mode: RepairMode = RepairMode.UNSPECIFIED, saliency: SaliencyOptions | None = None,
    influence: InfluenceOptions | None = None, retrain: RetrainOptions | None = None,
    seed: int = 0, request_id: str | None = None, max_words: int | None = None,
) -> pairdots_pb2.RepairRequest:
    """Build a RepairRequest (paper §4.3). `request_id`: as for attack_request."""
    req = pairdots_pb2.RepairRequest(
        model=resolve_model(config, model), examples=_examples(examples),
        examples_per_error=examples_per_error,
        mode=pairdots_pb2.RepairMode.ValueType(int(mode)), seed=seed,
        request_id=request_id or str(uuid.uuid4()), max_words=max_words,
    )
    _options(req, saliency, influence, retrain)
    return req


#: One ExplainBatch input: a text, (text, gold label) or (text, gold label or None, id).
BatchInputArg = str | tuple[str, int | None] | tuple[str, int | None, str]


def explain_batch_request(
    config: ClientConfig, inputs: Sequence[BatchInputArg] = (), *, input_path: str = "",
    text_column: str = "", label_column: str = "", id_column: str = "",
    model: str | None = None, top_words: int | None = None, examples_per_word: int = 0,
    saliency: SaliencyOptions | None = None, influence: InfluenceOptions | None = None,
    request_id: str | None = None,
) -> pairdots_pb2.ExplainBatchRequest:
    """Build an ExplainBatchRequest: inline `inputs`, or `input_path` on the server.
    `request_id`: as for attack_request (a fresh UUID4 when None)."""
    req = pairdots_pb2.ExplainBatchRequest(
        model=resolve_model(config, model), input_path=input_path, text_column=text_column,
        label_column=label_column, id_column=id_column, top_words=top_words,
        examples_per_word=examples_per_word, request_id=request_id or str(uuid.uuid4()),
    )
    for item in inputs:
        if isinstance(item, str):
            req.inputs.add(text=item)
        else:
            one = req.inputs.add(text=item[0], id=item[2] if len(item) > 2 else "")
            if item[1] is not None:
                one.gold_label = int(item[1])
    _options(req, saliency, influence)
    return req


def wait_expired(name: str, timeout_s: float) -> PairdotsError:
    return DeadlineExceededError(
        f"operation {name} did not finish within {timeout_s:g} s; it keeps running on the "
        "server: wait again, or cancel_operation() it", reason="CLIENT_WAIT_TIMEOUT",
        error_metadata={"operation": name})


# -- the calls ------------------------------------------------------------------------------


class ClientCore:
    """The state both clients share (config, retry policy, call metadata, whether the server
    has WaitOperation) and every call as a plan."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.retry = RetryPolicy.from_config(config)
        self.metadata = config.metadata()
        #: False once the server answered WaitOperation with UNIMPLEMENTED: poll instead.
        self.use_wait = True

    def invoke(self, stub: str, method: str, request: Any, timeout: float | None) -> Plan[Any]:
        """One RPC under one deadline (`timeout`, else default_timeout_s) shared by all its
        attempts, retried on UNAVAILABLE / RESOURCE_EXHAUSTED only (pairdots.retry)."""
        deadline = CallDeadline(timeout if timeout is not None else self.config.default_timeout_s)
        retries = 0
        while True:
            try:
                return (yield Rpc(stub, method, request, max(deadline.remaining(), 0.001)))
            except grpc.RpcError as rpc_err:
                error = error_from_rpc(rpc_err)
            wait = self.retry.delay(error, retries, deadline.remaining())
            if wait is None:
                raise error
            yield Sleep(wait)
            retries += 1

    # -- models ----------------------------------------------------------------------------

    def list_models(self, timeout: float | None = None) -> Plan[list[ModelInfo]]:
        """The served model bundles, sorted by name (every page of ListModels)."""
        models: list[ModelInfo] = []
        token = ""
        while True:
            resp = yield from self.invoke(
                SERVICE, "ListModels", pairdots_pb2.ListModelsRequest(page_token=token), timeout)
            models += [ModelInfo.from_proto(m) for m in resp.models]
            token = resp.next_page_token
            if not token:
                return models

    def get_model(self, name: str, timeout: float | None = None) -> Plan[ModelInfo]:
        """One served model; NotFoundError when unknown."""
        resp = yield from self.invoke(SERVICE, "GetModel", pairdots_pb2.GetModelRequest(name=name),
                                      timeout)
        return ModelInfo.from_proto(resp)  # GetModel returns the Model resource (AIP-131)

    # -- explain, attack, repair -----------------------------------------------------------

    def explain(self, text: str, timeout: float | None = None, **kw: Any) -> Plan[Explanation]:
        """Explain the prediction for `text`: word saliency (paper Eq. 1-2), and for the
        `top_words` most salient words (or `word_positions`) the supporting / opposing training
        examples (Eq. 5) with their responsible words (Eq. 8). `gold_label` different from the
        explained label adds the gold explanation (error analysis, §4.1)."""
        req = explain_request(self.config, text, **kw)
        return Explanation.from_proto((yield from self.invoke(SERVICE, "Explain", req, timeout)))

    def attack(self, examples: Sequence[LabeledText | tuple[str, int]], *, mode: AttackMode,
               examples_per_test: int, timeout: float | None = None, **kw: Any
               ) -> Plan[OperationHandle]:
        """Start an Attack operation (paper §4.2); wait_operation() gives an AttackOutcome."""
        req = attack_request(self.config, examples, mode=mode,
                             examples_per_test=examples_per_test, **kw)
        return operation_from_proto((yield from self.invoke(SERVICE, "Attack", req, timeout)))

    def repair(self, examples: Sequence[LabeledText | tuple[str, int]], *,
               examples_per_error: int, timeout: float | None = None, **kw: Any
               ) -> Plan[OperationHandle]:
        """Start a Repair operation (paper §4.3); wait_operation() gives a RepairOutcome."""
        req = repair_request(self.config, examples, examples_per_error=examples_per_error, **kw)
        return operation_from_proto((yield from self.invoke(SERVICE, "Repair", req, timeout)))

    def explain_batch(self, inputs: Sequence[BatchInputArg] = (), *, input_path: str = "",
                      text_column: str = "", label_column: str = "", id_column: str = "",
                      timeout: float | None = None, **kw: Any) -> Plan[OperationHandle]:
        """Start an ExplainBatch operation over `inputs` (or a file under the server's batch
        input root); wait_operation() gives an ExplainBatchOutcome, batch_results() the
        answers page by page (also while it runs)."""
        req = explain_batch_request(self.config, inputs, input_path=input_path,
                                    text_column=text_column, label_column=label_column,
                                    id_column=id_column, **kw)
        return operation_from_proto((yield from self.invoke(SERVICE, "ExplainBatch", req,
                                                            timeout)))

    def batch_results(self, operation: str, page_size: int = 0, page_token: str = "",
                      timeout: float | None = None) -> Plan[BatchResultsPage]:
        """One page of an ExplainBatch operation's results, in input order."""
        req = pairdots_pb2.ListExplainBatchResultsRequest(
            operation=operation, page_size=page_size, page_token=page_token)
        resp = yield from self.invoke(SERVICE, "ListExplainBatchResults", req, timeout)
        return BatchResultsPage.from_proto(resp)

    # -- operations ------------------------------------------------------------------------

    def get_operation(self, name: str, timeout: float | None = None) -> Plan[OperationHandle]:
        """The current state of an operation; NotFoundError when unknown."""
        op = yield from self.invoke(OPERATIONS, "GetOperation", ops.get_request(name), timeout)
        return operation_from_proto(op)

    def list_operations(self, filter: str = "", page_size: int = 0, page_token: str = "",
                        timeout: float | None = None) -> Plan[OperationPage]:
        """One page of operations, e.g. ``filter="kind=attack AND state=RUNNING"``."""
        resp = yield from self.invoke(OPERATIONS, "ListOperations",
                                      ops.list_request(filter, page_size, page_token), timeout)
        return page_from_proto(resp)

    def cancel_operation(self, name: str, timeout: float | None = None) -> Plan[None]:
        """Ask the server to cancel; a finished operation is left as it is."""
        yield from self.invoke(OPERATIONS, "CancelOperation", ops.cancel_request(name), timeout)

    def delete_operation(self, name: str, timeout: float | None = None) -> Plan[None]:
        """Forget a finished operation (FailedPreconditionError while it runs)."""
        yield from self.invoke(OPERATIONS, "DeleteOperation", ops.delete_request(name), timeout)

    def wait_operation(self, name: str, timeout: float | None = None,
                       progress: ProgressCallback | None = None) -> Plan[OperationOutcome]:
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
            if self.use_wait:
                try:
                    handle = operation_from_proto((yield from self.invoke(
                        OPERATIONS, "WaitOperation", ops.wait_request(name, window),
                        window + WAIT_RPC_MARGIN_S)))
                except UnimplementedError:
                    self.use_wait = False
            if handle is None:
                handle = yield from self.get_operation(name, window + WAIT_RPC_MARGIN_S)
            if progress is not None and handle.progress is not None and handle.progress != last:
                last = handle.progress
                progress(handle.progress)
            if handle.done:
                return handle.result()
            if not self.use_wait:
                yield Sleep(max(0.0, min(window, deadline.remaining())))
