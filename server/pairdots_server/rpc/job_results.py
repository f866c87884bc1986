"""Job progress and Attack/Repair outcomes as the protobuf messages the operations carry
(pairdots.v1.JobMetadata, AttackResult, RepairResult): the encoding the jobs are given
(service/jobs/perturb_jobs.JobEncoding), so the jobs themselves hold no protobuf."""

from __future__ import annotations

from google.protobuf import timestamp_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.influence.pipeline import MeasurementKind
from pairdots_server.model.retrain import Evaluation
from pairdots_server.perturb.attack import AttackOutcome
from pairdots_server.perturb.objectives import Edit, ExampleReport
from pairdots_server.perturb.repair import RepairOutcome
from pairdots_server.rpc.convert import duration, enum_table, model_name
from pairdots_server.service.jobs.perturb_jobs import JobEncoding, JobProgress

TYPE_PREFIX = "type.googleapis.com/"
METADATA_TYPE = TYPE_PREFIX + pb.JobMetadata.DESCRIPTOR.full_name
ATTACK_RESULT_TYPE = TYPE_PREFIX + pb.AttackResult.DESCRIPTOR.full_name
REPAIR_RESULT_TYPE = TYPE_PREFIX + pb.RepairResult.DESCRIPTOR.full_name


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


#: Job kind (the operation name's prefix, rpc/job_kinds.JOB_KINDS) → JobMetadata.kind.
JOB_KINDS = {"attack": pb.JOB_KIND_ATTACK, "repair": pb.JOB_KIND_REPAIR,
             "explain_batch": pb.JOB_KIND_EXPLAIN_BATCH}
#: Substitution relation (perturb.search.RELATIONS) → SubstitutionRelation.
RELATIONS = {"synonym": pb.SUBSTITUTION_RELATION_SYNONYM,
             "antonym": pb.SUBSTITUTION_RELATION_ANTONYM}
#: Objective measurement (influence.pipeline.MeasurementKind values) → EffectMeasurement.
MEASUREMENTS = {kind.value: pb.EffectMeasurement.ValueType(value) for value, kind in
                enum_table(pb.EffectMeasurement, "EFFECT_MEASUREMENT_", MeasurementKind).items()}


def metadata_proto(kind: str, model: str, stage: str, done: int, total: int, created: float,
                   updated: float) -> pb.JobMetadata:
    """JobMetadata of a job of `kind` on the model with bare id `model`."""
    return pb.JobMetadata(
        kind=JOB_KINDS.get(kind, pb.JOB_KIND_UNSPECIFIED), model=model_name(model), stage=stage,
        done_count=done, total_count=total, create_time=timestamp(created),
        update_time=timestamp(updated),
    )


def job_metadata(p: JobProgress) -> tuple[str, bytes]:
    meta = metadata_proto(p.kind, p.model, p.stage, p.done, p.total, p.created, p.updated)
    return METADATA_TYPE, meta.SerializeToString()


def edit_proto(e: Edit) -> pb.TrainingEdit:
    return pb.TrainingEdit(
        train_index=e.train_index, original_text=e.original_text, new_text=e.new_text,
        label=e.label, example_index=e.example_index, word_index=e.word_index,
        original_word=e.original_word, substitute=e.substitute,
        relation=RELATIONS.get(e.relation, pb.SUBSTITUTION_RELATION_UNSPECIFIED),
        influence_change=e.influence_change, objective=e.objective,
        influence_before=e.influence_before, influence_after=e.influence_after,
        predicted_change=e.predicted_change, predicted_margin_change=e.predicted_margin_change,
        substitutions=[
            pb.Substitution(word_index=w, original_word=o, substitute=n,
                            relation=RELATIONS.get(r, pb.SUBSTITUTION_RELATION_UNSPECIFIED))
            for w, o, n, r in e.substitutions
        ],
    )


def effect_proto(r: ExampleReport) -> pb.ExampleEffect:
    out = pb.ExampleEffect(
        example_index=r.example_index, label=r.label, margin=r.margin, edit_count=r.edits,
        predicted_margin_change=r.predicted_margin_change, flip_budget=r.flip_budget,
        flip_budget_reached=r.flip_budget_reached,
        predicted_flip=r.predicted_flip, request_flip_budget=r.request_flip_budget,
        request_flip_budget_reached=r.request_flip_budget_reached,
        targets=[
            pb.TargetEffect(
                objective=t.objective, word=t.word,
                measurement=MEASUREMENTS.get(t.measurement, pb.EFFECT_MEASUREMENT_UNSPECIFIED),
                value=t.value, predicted_change=t.predicted_change)
            for t in r.targets
        ],
    )
    if r.measured_margin is not None:
        out.measured_margin = r.measured_margin
    if r.request_predicted_margin_change is not None:
        out.request_predicted_margin_change = r.request_predicted_margin_change
    return out


def evaluation_proto(ev: Evaluation) -> pb.Evaluation:
    return pb.Evaluation(
        accuracy_before=ev.accuracy_before, accuracy_after=ev.accuracy_after,
        example_count=ev.examples, saved_model=ev.saved_model,
        retrain_duration=duration(ev.retrain_seconds),
    )


def _add_evaluation(result: pb.AttackResult | pb.RepairResult, ev: Evaluation | None) -> None:
    if ev is not None:
        result.evaluation.CopyFrom(evaluation_proto(ev))
        result.notes.extend(ev.notes)


def attack_result(out: AttackOutcome, ev: Evaluation | None) -> tuple[str, bytes]:
    result = pb.AttackResult(edits=[edit_proto(e) for e in out.edits], notes=out.notes,
                             effects=[effect_proto(r) for r in out.reports])
    _add_evaluation(result, ev)
    return ATTACK_RESULT_TYPE, result.SerializeToString()


def repair_result(out: RepairOutcome, ev: Evaluation | None) -> tuple[str, bytes]:
    result = pb.RepairResult(
        error_count=out.errors_found, edits=[edit_proto(e) for e in out.edits], notes=out.notes,
        effects=[effect_proto(r) for r in out.reports],
    )
    _add_evaluation(result, ev)
    return REPAIR_RESULT_TYPE, result.SerializeToString()


ENCODING = JobEncoding(progress=job_metadata, attack=attack_result, repair=repair_result)
