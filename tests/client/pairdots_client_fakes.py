"""A real gRPC server (127.0.0.1, ephemeral port) with scriptable test servicers.

`FakePairdots` answers PairdotsService calls from canned protos; each method can be given a
script of actions consumed one per attempt: ``OK``, ``("abort", google.rpc.Status)`` or
``("hang", seconds)`` (waits until the client's deadline cancels the call). Every attempt's
invocation metadata is recorded. `FakeOperations` implements google.longrunning.Operations
over an in-memory dict; each Get/Wait advances a running operation by one stage.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, duration_pb2, empty_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from pairdots.v1 import pairdots_pb2, pairdots_pb2_grpc

OK = "ok"
DOMAIN = "pairdots.dev"
HOSTILE = 'x<script>alert("1")</script>&\'"'


def pack(msg: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def rich_status(code: int, message: str, *, reason: str = "", violations: tuple[tuple[str, str], ...] = (),
                retry_delay_s: float | None = None) -> status_pb2.Status:
    """google.rpc.Status with ErrorInfo / BadRequest / RetryInfo details."""
    st = status_pb2.Status(code=code, message=message)
    if reason:
        st.details.append(pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN,
                                                           metadata={"k": "v"})))
    if violations:
        st.details.append(pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
            for f, d in violations])))
    if retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_delay_s * 1e9))
        st.details.append(pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return st


def seconds(s: float) -> duration_pb2.Duration:
    """A google.protobuf.Duration of `s` seconds."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(s * 1e9))
    return d


def model_proto(name: str = "tiny-sst2") -> pairdots_pb2.Model:
    m = pairdots_pb2.Model(
        name=f"models/{name}", labels=["negative", "positive"], base_model="tiny-bert",
        training_example_count=100, dev_accuracy=0.875, scope="classifier",
        scope_parameter_count=1538,
        has_index=True, has_low_rank=False, default_solver=pairdots_pb2.SOLVER_LISSA,
        format_version=1, max_length=64)
    m.create_time.CopyFrom(timestamp_pb2.Timestamp(seconds=1_700_000_000))
    return m


def example_proto(idx: int, text: str, influence: float, responsible: int,
                  label: int = 1) -> pairdots_pb2.InfluentialExample:
    words = text.split(" ")
    return pairdots_pb2.InfluentialExample(
        train_index=idx, text=text, label=label,
        label_name=["negative", "positive"][label], influence=influence,
        words=[pairdots_pb2.WordInfluence(text=w, influence=influence * (0.5 if i == responsible
                                                                          else -0.1 * i))
               for i, w in enumerate(words)],
        responsible_word=responsible)


def explain_response(text: str = "a gripping , funny film") -> pairdots_pb2.ExplainResponse:
    """A canned two-label (target + gold) answer; words are `text` split on spaces."""
    words = text.split(" ")
    pos = 0
    wprotos = []
    for i, w in enumerate(words):
        wprotos.append(pairdots_pb2.Word(index=i, text=w, char_start=pos, char_end=pos + len(w),
                                         piece_count=1))
        pos += len(w) + 1
    sal = [0.5 - 0.3 * i for i in range(len(words))]
    target = pairdots_pb2.LabelExplanation(
        label=1, label_name="positive", role=pairdots_pb2.EXPLANATION_ROLE_TARGET,
        word_saliency=sal,
        salient_words=[pairdots_pb2.SalientWord(
            word_index=0, text=words[0], saliency=sal[0],
            supporting=[example_proto(7, "truly gripping story", 0.25, 1),
                        example_proto(3, HOSTILE + " fun", 0.125, 0)],
            opposing=[example_proto(11, "dull and slow", -0.5, 0, label=0)],
            solver=pairdots_pb2.SolverDiagnostics(
                solver=pairdots_pb2.SOLVER_LISSA, curvature=pairdots_pb2.CURVATURE_GAUSS_NEWTON,
                iteration_count=200, relative_change=1e-4, norm=3.5, effective_damping=0.01,
                converged=True, duration=seconds(0.75), cached=False))])
    gold = pairdots_pb2.LabelExplanation(
        label=0, label_name="negative", role=pairdots_pb2.EXPLANATION_ROLE_GOLD,
        word_saliency=[-s for s in sal],
        salient_words=[pairdots_pb2.SalientWord(
            word_index=1, text=words[1], saliency=-sal[1],
            supporting=[example_proto(5, "no responsible word", 0.0625, -1)])])
    return pairdots_pb2.ExplainResponse(
        model="models/tiny-sst2",
        prediction=pairdots_pb2.Prediction(label=1, label_name="positive",
                                           probabilities=[0.25, 0.75]),
        words=wprotos, explanations=[target, gold],
        diagnostics=pairdots_pb2.Diagnostics(
            influence_computed=True, candidate_search=pairdots_pb2.CANDIDATE_SEARCH_EXHAUSTIVE,
            scored_candidate_count=100, training_example_count=100,
            timings=[pairdots_pb2.StageTiming(stage="saliency", duration=seconds(0.01)),
                     pairdots_pb2.StageTiming(stage="solve", duration=seconds(0.5))],
            warnings=["solver note " + HOSTILE], notes=["a note"],
            total_duration=seconds(0.6)))


def job_metadata(stage: str, done: int, total: int, kind: str = "attack") -> any_pb2.Any:
    return pack(pairdots_pb2.JobMetadata(
        kind=pairdots_pb2.JobKind.Value("JOB_KIND_" + kind.upper()), model="models/tiny-sst2",
        stage=stage, done_count=done, total_count=total))


def attack_result() -> pairdots_pb2.AttackResult:
    return pairdots_pb2.AttackResult(
        edits=[pairdots_pb2.TrainingEdit(
            train_index=7, original_text="truly gripping story", new_text="truly riveting story",
            label=1, example_index=0, word_index=1, original_word="gripping",
            substitute="riveting", relation=pairdots_pb2.SUBSTITUTION_RELATION_SYNONYM,
            influence_change=-0.2,
            objective="decrease I(z, w_y)")],
        evaluation=pairdots_pb2.Evaluation(accuracy_before=0.9, accuracy_after=0.6,
                                           example_count=10, retrain_duration=seconds(1.5)),
        notes=["ok"])


@dataclass
class FakePairdots(pairdots_pb2_grpc.PairdotsServiceServicer):
    """PairdotsService with per-method scripts and recorded metadata."""

    ops: FakeOperations
    scripts: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    calls: dict[str, list[dict[str, str]]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _step(self, method: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method].append({k: v for k, v in context.invocation_metadata()
                                       if isinstance(v, str)})
            self.requests[method].append(request)
            script = self.scripts[method]
            action = script.pop(0) if script else OK
        if action == OK:
            return
        kind, arg = action
        if kind == "abort":
            context.abort_with_status(rpc_status.to_status(arg))
        elif kind == "hang":
            end = time.monotonic() + arg
            while context.is_active() and time.monotonic() < end:
                time.sleep(0.01)
        else:
            raise AssertionError(f"bad action {action!r}")

    def ListModels(self, request: Any, context: Any) -> pairdots_pb2.ListModelsResponse:
        self._step("ListModels", request, context)
        return pairdots_pb2.ListModelsResponse(models=[model_proto("a-model"), model_proto()])

    def GetModel(self, request: Any, context: Any) -> pairdots_pb2.Model:
        self._step("GetModel", request, context)
        if request.name != "tiny-sst2":
            context.abort_with_status(rpc_status.to_status(rich_status(
                code_pb2.NOT_FOUND, f"model {request.name!r} is not served",
                reason="MODEL_NOT_FOUND")))
        return model_proto()

    def Explain(self, request: Any, context: Any) -> pairdots_pb2.ExplainResponse:
        self._step("Explain", request, context)
        return explain_response()

    def Attack(self, request: Any, context: Any) -> operations_pb2.Operation:
        self._step("Attack", request, context)
        return self.ops.start("attack", [("explaining", 0, 2), ("perturbing", 1, 2),
                                         ("retraining", 0, 1)], attack_result())

    def Repair(self, request: Any, context: Any) -> operations_pb2.Operation:
        self._step("Repair", request, context)
        result = pairdots_pb2.RepairResult(error_count=2, notes=["repaired"])
        return self.ops.start("repair", [("explaining", 0, 1)], result)


@dataclass
class _Job:
    op: operations_pb2.Operation
    stages: list[tuple[str, int, int]]
    result: Any
    kind: str


class FakeOperations(operations_pb2_grpc.OperationsServicer):
    """In-memory google.longrunning.Operations; Get/Wait advance a job by one stage."""

    def __init__(self, *, wait_implemented: bool = True) -> None:
        self.jobs: dict[str, _Job] = {}
        self.lock = threading.Lock()
        self.wait_implemented = wait_implemented
        self.calls: dict[str, int] = defaultdict(int)
        self.fail_with: status_pb2.Status | None = None  # finish jobs with this error
        self.frozen = False  # never advance

    def start(self, kind: str, stages: list[tuple[str, int, int]], result: Any) -> Any:
        with self.lock:
            name = f"operations/{kind}-{len(self.jobs):04d}"
            op = operations_pb2.Operation(name=name, done=False)
            op.metadata.CopyFrom(job_metadata(*stages[0], kind=kind))
            self.jobs[name] = _Job(op, stages[1:], result, kind)
            return op

    def _advance(self, name: str, context: grpc.ServicerContext) -> operations_pb2.Operation:
        with self.lock:
            job = self.jobs.get(name)
            if job is None:
                context.abort_with_status(rpc_status.to_status(rich_status(
                    code_pb2.NOT_FOUND, f"operation {name} not found", reason="OPERATION_NOT_FOUND")))
            assert job is not None
            if not job.op.done and not self.frozen:
                if job.stages:
                    job.op.metadata.CopyFrom(job_metadata(*job.stages.pop(0), kind=job.kind))
                else:
                    job.op.metadata.CopyFrom(job_metadata("done", 1, 1, kind=job.kind))
                    job.op.done = True
                    if self.fail_with is not None:
                        job.op.error.CopyFrom(self.fail_with)
                    else:
                        job.op.response.Pack(job.result)
            out = operations_pb2.Operation()
            out.CopyFrom(job.op)
            return out

    def GetOperation(self, request: Any, context: Any) -> operations_pb2.Operation:
        self.calls["GetOperation"] += 1
        return self._advance(request.name, context)

    def WaitOperation(self, request: Any, context: Any) -> operations_pb2.Operation:
        self.calls["WaitOperation"] += 1
        if not self.wait_implemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "WaitOperation is not implemented")
        if self.frozen:  # a real server blocks up to the requested timeout
            time.sleep(min(request.timeout.ToNanoseconds() / 1e9, 0.05))
        return self._advance(request.name, context)

    def ListOperations(self, request: Any, context: Any) -> operations_pb2.ListOperationsResponse:
        self.calls["ListOperations"] += 1
        with self.lock:
            ops = [j.op for j in self.jobs.values()
                   if not request.filter or request.filter == f"kind={j.kind}"]
        size = request.page_size or 50
        start = int(request.page_token or 0)
        nxt = str(start + size) if start + size < len(ops) else ""
        return operations_pb2.ListOperationsResponse(operations=ops[start:start + size],
                                                     next_page_token=nxt)

    def CancelOperation(self, request: Any, context: Any) -> empty_pb2.Empty:
        self.calls["CancelOperation"] += 1
        with self.lock:
            job = self.jobs[request.name]
            if not job.op.done:
                job.op.done = True
                job.op.error.CopyFrom(rich_status(code_pb2.CANCELLED, "cancelled by the caller",
                                                  reason="CANCELLED"))
        return empty_pb2.Empty()

    def DeleteOperation(self, request: Any, context: Any) -> empty_pb2.Empty:
        self.calls["DeleteOperation"] += 1
        with self.lock:
            self.jobs.pop(request.name, None)
        return empty_pb2.Empty()


@dataclass
class Harness:
    address: str
    service: FakePairdots
    ops: FakeOperations


@contextmanager
def serve(*, wait_implemented: bool = True) -> Iterator[Harness]:
    """Start the fake server on 127.0.0.1:<ephemeral>; stop it on exit."""
    ops = FakeOperations(wait_implemented=wait_implemented)
    service = FakePairdots(ops)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pairdots_pb2_grpc.add_PairdotsServiceServicer_to_server(service, server)
    operations_pb2_grpc.add_OperationsServicer_to_server(ops, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Harness(f"127.0.0.1:{port}", service, ops)
    finally:
        server.stop(grace=None)
