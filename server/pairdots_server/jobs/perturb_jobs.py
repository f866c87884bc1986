"""Attack and Repair as job functions for the JobRunner: validated request in, result proto out.

A job reports progress as a pairdots.v1.JobMetadata (kind, model, stage, done/total,
create/update time) — stages "explaining"/"perturbing" (per test example or error),
"evaluating", "retraining" (per optimiser step), "saving", "done" — at most every
`min_interval_s` seconds except on stage changes, and returns an AttackResult / RepairResult.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import timestamp_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.data import Example
from pairdots_server.jobs.runner import JobContext, JobFn, JobResult
from pairdots_server.perturb.attack import AttackQuery, run_attack
from pairdots_server.perturb.edits import Edit
from pairdots_server.perturb.repair import RepairQuery, run_repair
from pairdots_server.retrain import Evaluation, RetrainSpec, retrain_and_evaluate
from pairdots_server.runtime import ModelRuntime

TYPE_PREFIX = "type.googleapis.com/"
METADATA_TYPE = TYPE_PREFIX + pb.JobMetadata.DESCRIPTOR.full_name
ATTACK_RESULT_TYPE = TYPE_PREFIX + pb.AttackResult.DESCRIPTOR.full_name
REPAIR_RESULT_TYPE = TYPE_PREFIX + pb.RepairResult.DESCRIPTOR.full_name


@dataclass(frozen=True)
class JobEnv:
    """What a job needs from the server besides the model: candidate defaults and the
    directory where save_as bundles go."""

    default_candidates: int
    scoring_batch_size: int
    output_root: Path


def timestamp(t: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(t * 1e9))
    return ts


class ProgressReporter:
    """Publishes JobMetadata through ctx.set_metadata, throttled within a stage."""

    def __init__(self, ctx: JobContext, kind: str, model: str, min_interval_s: float = 0.5
                 ) -> None:
        self.ctx = ctx
        self.kind = kind
        self.model = model
        self.created = time.time()
        self.min_interval_s = min_interval_s
        self._last_stage = ""
        self._last_time = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        final = total > 0 and done >= total
        if stage == self._last_stage and not final and now - self._last_time < self.min_interval_s:
            return
        self._last_stage, self._last_time = stage, now
        meta = pb.JobMetadata(
            kind=self.kind, model=self.model, stage=stage, done=done, total=total,
            create_time=timestamp(self.created), update_time=timestamp(time.time()),
        )
        self.ctx.set_metadata(METADATA_TYPE, meta.SerializeToString())


def edit_proto(e: Edit) -> pb.TrainingEdit:
    return pb.TrainingEdit(
        train_index=e.train_index, original_text=e.original_text, new_text=e.new_text,
        label=e.label, example_index=e.example_index, word_index=e.word_index,
        original_word=e.original_word, substitute=e.substitute, relation=e.relation,
        influence_change=e.influence_change, objective=e.objective,
    )


def evaluation_proto(ev: Evaluation) -> pb.Evaluation:
    return pb.Evaluation(
        accuracy_before=ev.accuracy_before, accuracy_after=ev.accuracy_after,
        examples=ev.examples, saved_model=ev.saved_model, retrain_seconds=ev.retrain_seconds,
    )


def _provenance(kind: str, edits: Sequence[Edit], seed: int) -> dict[str, object]:
    return {"operation_kind": kind, "edits": len(edits), "seed": seed}


@contextlib.contextmanager
def model_turns(rt: ModelRuntime, ctx: JobContext) -> Iterator[Callable[[], None]]:
    """Hold the model's compute gate for the job (runtime.compute; the served model's torch
    state is not thread-safe) and yield the job's `should_stop`: it checks for cancellation
    and, when Explain calls wait for the model, lets them run first (every checkpoint:
    between solver iterations, scoring batches, optimiser steps)."""
    with rt.compute.hold(ctx.token, bounded=False) as gate:
        def should_stop() -> None:
            ctx.check()
            gate.pause(ctx.token)

        yield should_stop


def _retrain_into(
    result: pb.AttackResult | pb.RepairResult, rt: ModelRuntime, train: Sequence[Example],
    retrain: RetrainSpec, examples: Sequence[Example], ctx: JobContext,
    report: ProgressReporter, env: JobEnv, provenance: dict[str, object],
    should_stop: Callable[[], None],
) -> None:
    """Retrain on the edited training set, evaluate, and record it in `result`."""
    ev = retrain_and_evaluate(
        rt, train, retrain, examples, should_stop, report, output_root=env.output_root,
        provenance=provenance,
    )
    result.evaluation.CopyFrom(evaluation_proto(ev))
    result.notes.extend(ev.notes)


def attack_job(rt: ModelRuntime, q: AttackQuery, retrain: RetrainSpec | None, env: JobEnv
               ) -> JobFn:
    """The job function of one Attack operation."""

    def run(ctx: JobContext) -> JobResult:
        report = ProgressReporter(ctx, "attack", rt.name)
        report("explaining", 0, len(q.examples))
        with model_turns(rt, ctx) as should_stop:
            out = run_attack(
                rt, q, should_stop, report, default_candidates=env.default_candidates,
                scoring_batch_size=env.scoring_batch_size,
            )
            result = pb.AttackResult(edits=[edit_proto(e) for e in out.edits], notes=out.notes)
            if retrain is not None:
                _retrain_into(result, rt, out.train, retrain, q.examples, ctx, report, env,
                              _provenance("attack", out.edits, q.seed), should_stop)
        report("done", 1, 1)
        return ATTACK_RESULT_TYPE, result.SerializeToString()

    return run


def repair_job(rt: ModelRuntime, q: RepairQuery, retrain: RetrainSpec | None, env: JobEnv
               ) -> JobFn:
    """The job function of one Repair operation."""

    def run(ctx: JobContext) -> JobResult:
        report = ProgressReporter(ctx, "repair", rt.name)
        with model_turns(rt, ctx) as should_stop:
            out = run_repair(
                rt, q, should_stop, report, default_candidates=env.default_candidates,
                scoring_batch_size=env.scoring_batch_size,
            )
            result = pb.RepairResult(
                errors_found=out.errors_found, edits=[edit_proto(e) for e in out.edits],
                notes=out.notes,
            )
            if retrain is not None:
                _retrain_into(result, rt, out.train, retrain, q.examples, ctx, report, env,
                              _provenance("repair", out.edits, q.seed), should_stop)
        report("done", 1, 1)
        return REPAIR_RESULT_TYPE, result.SerializeToString()

    return run
