"""Long-running operation types (Attack, Repair, ExplainBatch) read from
google.longrunning.Operation.

An operation's ``metadata`` is a pairdots.v1.JobMetadata (`JobProgress` here), its
``response`` an AttackResult or RepairResult (`AttackOutcome` / `RepairOutcome`), its
``error`` a google.rpc.Status (raised as a typed `PairdotsError`).

google.longrunning ships without type information, so the Operation message is typed ``Any``
at this boundary only; everything handed to callers is typed.

As in pairdots.results, field names follow the proto (``*_count``, durations as
`datetime.timedelta`) and the names before the v1 renames remain as read-only properties.
The proto's closed sets that used to be strings (JobMetadata.kind, TrainingEdit.relation,
TargetEffect.measurement) stay strings here: the enum's lower-case member name ("attack",
"synonym", "prediction_margin"); the enums themselves are pairdots.JobKind,
SubstitutionRelation and EffectMeasurement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from google.rpc import code_pb2

from pairdots.errors import PairdotsError, UnexpectedResponseError, error_from_status
from pairdots.options import (
    EffectMeasurement,
    JobKind,
    SubstitutionRelation,
    datetime_from_proto,
    enum_name,
    model_id,
    timedelta_from_proto,
)
from pairdots.results import Explanation
from pairdots.v1 import pairdots_pb2

__all__ = [
    "AttackOutcome", "BatchItem", "BatchResultsPage", "Evaluation", "ExampleEffect", "ExplainBatchOutcome",
    "JobProgress", "OperationHandle", "OperationOutcome", "OperationPage", "RepairOutcome", "Substitution", "TargetEffect",
    "TrainingEdit", "operation_from_proto",
]

_TYPE_PREFIX = "type.googleapis.com/"


@dataclass(frozen=True)
class JobProgress:
    """Progress of an operation (pairdots.v1.JobMetadata): `kind` "attack", "repair" or
    "explain_batch", `model` the bare id."""

    kind: str
    model: str
    stage: str
    done_count: int
    total_count: int
    create_time: datetime | None
    update_time: datetime | None

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.JobMetadata) -> JobProgress:
        return cls(enum_name(JobKind, msg.kind), model_id(msg.model), msg.stage,
                   msg.done_count, msg.total_count, datetime_from_proto(msg.create_time),
                   datetime_from_proto(msg.update_time))

    @property
    def done(self) -> int:
        """done_count (its name before the v1 renames)."""
        return self.done_count

    @property
    def total(self) -> int:
        """total_count (its name before the v1 renames)."""
        return self.total_count

    @property
    def fraction(self) -> float | None:
        """done / total of the current stage, None when the total is unknown."""
        return self.done_count / self.total_count if self.total_count > 0 else None


@dataclass(frozen=True)
class Substitution:
    """One substituted word of a training example."""

    word_index: int
    original_word: str
    substitute: str
    relation: str


@dataclass(frozen=True)
class TrainingEdit:
    """One perturbed (attack) or added (repair) training example; `influence_change` is
    I(z̃, w) - I(z, w) (paper Eq. 7); `predicted_change` / `predicted_margin_change` the
    first-order change of the optimised measurement / of the example's margin once retrained
    (attack (I(z̃) - I(z))/N, repair I(z̃)/N)."""

    train_index: int
    original_text: str
    new_text: str
    label: int
    example_index: int
    word_index: int
    original_word: str
    substitute: str
    relation: str
    influence_change: float
    objective: str
    influence_before: float = 0.0
    influence_after: float = 0.0
    predicted_change: float = 0.0
    predicted_margin_change: float = 0.0
    substitutions: tuple[Substitution, ...] = ()

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.TrainingEdit) -> TrainingEdit:
        return cls(msg.train_index, msg.original_text, msg.new_text, msg.label,
                   msg.example_index, msg.word_index, msg.original_word, msg.substitute,
                   enum_name(SubstitutionRelation, msg.relation), msg.influence_change,
                   msg.objective, msg.influence_before, msg.influence_after,
                   msg.predicted_change, msg.predicted_margin_change,
                   tuple(Substitution(s.word_index, s.original_word, s.substitute,
                                      enum_name(SubstitutionRelation, s.relation))
                         for s in msg.substitutions))


@dataclass(frozen=True)
class TargetEffect:
    """One objective's target: the word, what f is, f(x) and its predicted change."""

    objective: str
    word: str
    measurement: str
    value: float
    predicted_change: float


@dataclass(frozen=True)
class ExampleEffect:
    """What the edits for one request example are predicted to move (first order) and the
    flip budget; `measured_margin` after a retrain (None without one);
    `request_predicted_margin_change`: the predicted change under every edit of the request
    (what a retrain on the whole edited set is predicted to do), `predicted_flip`: that
    change flips the prediction."""

    example_index: int
    label: int
    margin: float
    edit_count: int
    predicted_margin_change: float
    flip_budget: int  # 0: the edits do not move the margin towards zero
    flip_budget_reached: bool
    targets: tuple[TargetEffect, ...]
    measured_margin: float | None
    request_predicted_margin_change: float | None = None  # None: not computed (RANDOM)
    predicted_flip: bool = False
    request_flip_budget: int = 0  # edits per example (in rounds) to flip it; 0: never/absent
    request_flip_budget_reached: bool = False

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ExampleEffect) -> ExampleEffect:
        return cls(msg.example_index, msg.label, msg.margin, msg.edit_count,
                   msg.predicted_margin_change, msg.flip_budget, msg.flip_budget_reached,
                   tuple(TargetEffect(t.objective, t.word,
                                      enum_name(EffectMeasurement, t.measurement), t.value,
                                      t.predicted_change) for t in msg.targets),
                   msg.measured_margin if msg.HasField("measured_margin") else None,
                   msg.request_predicted_margin_change
                   if msg.HasField("request_predicted_margin_change") else None,
                   msg.predicted_flip, msg.request_flip_budget,
                   msg.request_flip_budget_reached)

    @property
    def edits(self) -> int:
        """edit_count (its name before the v1 renames)."""
        return self.edit_count


@dataclass(frozen=True)
class Evaluation:
    """Accuracy before and after retraining on the edited training set."""

    accuracy_before: float
    accuracy_after: float
    example_count: int
    saved_model: str
    retrain_duration: timedelta

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.Evaluation) -> Evaluation:
        return cls(msg.accuracy_before, msg.accuracy_after, msg.example_count, msg.saved_model,
                   timedelta_from_proto(msg.retrain_duration))

    @property
    def examples(self) -> int:
        """example_count (its name before the v1 renames)."""
        return self.example_count

    @property
    def retrain_seconds(self) -> float:
        """The retraining wall time in seconds (the field before the v1 renames)."""
        return self.retrain_duration.total_seconds()


@dataclass(frozen=True)
class AttackOutcome:
    """The result of a finished Attack operation (paper §4.2)."""

    operation: str
    edits: tuple[TrainingEdit, ...]
    evaluation: Evaluation | None
    notes: tuple[str, ...]
    raw: pairdots_pb2.AttackResult = field(repr=False, compare=False)
    effects: tuple[ExampleEffect, ...] = ()

    @classmethod
    def from_proto(cls, operation: str, msg: pairdots_pb2.AttackResult) -> AttackOutcome:
        return cls(operation, tuple(TrainingEdit.from_proto(e) for e in msg.edits),
                   Evaluation.from_proto(msg.evaluation) if msg.HasField("evaluation") else None,
                   tuple(msg.notes), msg, tuple(ExampleEffect.from_proto(x) for x in msg.effects))


@dataclass(frozen=True)
class RepairOutcome:
    """The result of a finished Repair operation (paper §4.3)."""

    operation: str
    error_count: int
    edits: tuple[TrainingEdit, ...]
    evaluation: Evaluation | None
    notes: tuple[str, ...]
    raw: pairdots_pb2.RepairResult = field(repr=False, compare=False)
    effects: tuple[ExampleEffect, ...] = ()

    @classmethod
    def from_proto(cls, operation: str, msg: pairdots_pb2.RepairResult) -> RepairOutcome:
        return cls(operation, msg.error_count,
                   tuple(TrainingEdit.from_proto(e) for e in msg.edits),
                   Evaluation.from_proto(msg.evaluation) if msg.HasField("evaluation") else None,
                   tuple(msg.notes), msg, tuple(ExampleEffect.from_proto(x) for x in msg.effects))

    @property
    def errors_found(self) -> int:
        """error_count (its name before the v1 renames)."""
        return self.error_count


@dataclass(frozen=True)
class ExplainBatchOutcome:
    """The result of a finished ExplainBatch operation; read the answers with
    batch_results() / iter_batch_results()."""

    operation: str
    input_count: int
    succeeded_count: int
    failed_count: int
    results_path: str
    duration: timedelta
    inputs_per_second: float
    raw: pairdots_pb2.ExplainBatchResult = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, operation: str, msg: pairdots_pb2.ExplainBatchResult
                   ) -> ExplainBatchOutcome:
        return cls(operation, msg.input_count, msg.succeeded_count, msg.failed_count,
                   msg.results_path, timedelta_from_proto(msg.duration),
                   msg.inputs_per_second, msg)

    @property
    def seconds(self) -> float:
        """The batch's wall time in seconds (the field before the v1 renames)."""
        return self.duration.total_seconds()


@dataclass(frozen=True)
class BatchItem:
    """One input's result: its index and id, and the Explanation or the error
    (`error_code` the google.rpc.Code name, e.g. "INVALID_ARGUMENT"; "" on success)."""

    index: int
    id: str
    explanation: Explanation | None
    error_code: str
    error_message: str

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ExplainBatchItem) -> BatchItem:
        expl = Explanation.from_proto(msg.response) if msg.HasField("response") else None
        code = "" if msg.error_code == code_pb2.OK else code_pb2.Code.Name(msg.error_code)
        return cls(int(msg.index), msg.id, expl, code, msg.error_message)


@dataclass(frozen=True)
class BatchResultsPage:
    """One page of ListExplainBatchResults; next_page_token "" once all are read and done."""

    items: tuple[BatchItem, ...]
    next_page_token: str
    total_size: int
    done: bool
    raw: pairdots_pb2.ListExplainBatchResultsResponse = field(repr=False, compare=False)

    @classmethod
    def from_proto(cls, msg: pairdots_pb2.ListExplainBatchResultsResponse) -> BatchResultsPage:
        return cls(tuple(BatchItem.from_proto(i) for i in msg.items), msg.next_page_token,
                   int(msg.total_size), bool(msg.done), msg)


OperationOutcome: TypeAlias = AttackOutcome | RepairOutcome | ExplainBatchOutcome


@dataclass(frozen=True)
class OperationHandle:
    """The state of one operation. When `done`, exactly one of `outcome` / `error` is set."""

    name: str
    done: bool
    progress: JobProgress | None
    outcome: OperationOutcome | None
    error: PairdotsError | None
    raw: Any = field(repr=False, compare=False)  # google.longrunning.Operation

    def result(self) -> OperationOutcome:
        """The outcome; raises the operation's error, or ValueError when not done yet."""
        if self.error is not None:
            raise self.error
        if self.outcome is None:
            raise ValueError(f"operation {self.name} is not done yet; use wait_operation()")
        return self.outcome


@dataclass(frozen=True)
class OperationPage:
    """One page of ListOperations; pass `next_page_token` back for the next ("" = last)."""

    operations: tuple[OperationHandle, ...]
    next_page_token: str


def _type_name(any_msg: Any) -> str:
    url = str(any_msg.type_url)
    return url[len(_TYPE_PREFIX):] if url.startswith(_TYPE_PREFIX) else url.rsplit("/", 1)[-1]


def operation_from_proto(op: Any) -> OperationHandle:
    """Convert a google.longrunning.Operation."""
    name = str(op.name)
    progress: JobProgress | None = None
    if op.HasField("metadata") and _type_name(op.metadata) == "pairdots.v1.JobMetadata":
        meta = pairdots_pb2.JobMetadata()
        meta.ParseFromString(bytes(op.metadata.value))
        progress = JobProgress.from_proto(meta)
    outcome: OperationOutcome | None = None
    error: PairdotsError | None = None
    result = str(op.WhichOneof("result") or "")
    if result == "error":
        error = error_from_status(op.error)
    elif result == "response":
        kind = _type_name(op.response)
        data = bytes(op.response.value)
        if kind == "pairdots.v1.AttackResult":
            outcome = AttackOutcome.from_proto(name, pairdots_pb2.AttackResult.FromString(data))
        elif kind == "pairdots.v1.RepairResult":
            outcome = RepairOutcome.from_proto(name, pairdots_pb2.RepairResult.FromString(data))
        elif kind == "pairdots.v1.ExplainBatchResult":
            outcome = ExplainBatchOutcome.from_proto(
                name, pairdots_pb2.ExplainBatchResult.FromString(data))
        else:
            error = UnexpectedResponseError(
                f"operation {name} finished with a {kind or 'typeless'} response; this client "
                "reads pairdots.v1.AttackResult and pairdots.v1.RepairResult (upgrade the client?)",
                reason="UNEXPECTED_RESPONSE_TYPE")
    done = bool(op.done)
    if done and outcome is None and error is None:
        error = UnexpectedResponseError(
            f"operation {name} is done but has neither a response nor an error",
            reason="EMPTY_OPERATION_RESULT")
    return OperationHandle(name, done, progress, outcome, error, op)


def page_from_proto(resp: Any) -> OperationPage:
    """Convert a google.longrunning.ListOperationsResponse."""
    return OperationPage(tuple(operation_from_proto(op) for op in resp.operations),
                         str(resp.next_page_token))


# ---- request builders for the google.longrunning.Operations service ------------------------

def get_request(name: str) -> Any:
    from google.longrunning import operations_pb2

    return operations_pb2.GetOperationRequest(name=name)


def list_request(filter: str, page_size: int, page_token: str) -> Any:
    from google.longrunning import operations_pb2

    return operations_pb2.ListOperationsRequest(
        name="operations", filter=filter, page_size=page_size, page_token=page_token)


def cancel_request(name: str) -> Any:
    from google.longrunning import operations_pb2

    return operations_pb2.CancelOperationRequest(name=name)


def delete_request(name: str) -> Any:
    from google.longrunning import operations_pb2

    return operations_pb2.DeleteOperationRequest(name=name)


def wait_request(name: str, timeout_s: float) -> Any:
    from google.longrunning import operations_pb2
    from google.protobuf import duration_pb2

    timeout = duration_pb2.Duration()
    timeout.FromNanoseconds(max(0, int(timeout_s * 1e9)))
    return operations_pb2.WaitOperationRequest(name=name, timeout=timeout)


def operations_stub(channel: Any) -> Any:
    """google.longrunning OperationsStub for a sync or asyncio channel (untyped upstream)."""
    from google.longrunning import operations_pb2_grpc

    return operations_pb2_grpc.OperationsStub(channel)
