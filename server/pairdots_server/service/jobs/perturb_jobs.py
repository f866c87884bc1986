"""Attack and Repair as job functions for the JobRunner: validated query in, encoded result out.

A job reports progress (kind, model, stage, done/total, create/update time) — stages
"explaining"/"perturbing" (per test example or error), "predicting" (the request-wide
effects, perturb/objectives.request_effects), "evaluating", "retraining" (per
optimiser step), "saving", "done" — at most every `min_interval_s` seconds except on stage
changes, and returns its AttackOutcome / RepairOutcome with the retraining's Evaluation. How
progress and outcomes become stored bytes is the JobEncoding the caller passes (the rpc layer
gives rpc/job_results.ENCODING: JobMetadata, AttackResult, RepairResult).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.retrain import Evaluation, RetrainSpec, retrain_and_evaluate
from pairdots_server.model.task import Task
from pairdots_server.perturb.attack import AttackOutcome, AttackQuery, run_attack
from pairdots_server.perturb.objectives import Edit, ExampleReport, margins
from pairdots_server.perturb.repair import RepairOutcome, RepairQuery, run_repair
from pairdots_server.service.jobs.runner import JobContext, JobFn, JobResult
from pairdots_server.storage.data import Example


@dataclass(frozen=True)
class JobProgress:
    """One progress report of a job (times in seconds since the epoch)."""

    kind: str
    model: str
    stage: str
    done: int
    total: int
    created: float
    updated: float


@dataclass(frozen=True)
class JobEncoding:
    """How progress and outcomes become (type URL, bytes) for the job store."""

    progress: Callable[[JobProgress], tuple[str, bytes]]
    attack: Callable[[AttackOutcome, Evaluation | None], JobResult]
    repair: Callable[[RepairOutcome, Evaluation | None], JobResult]


@dataclass(frozen=True)
class JobEnv:
    """What a job needs from the server besides the model: candidate defaults and the
    directory where save_as bundles go."""

    default_candidates: int
    scoring_batch_size: int
    output_root: Path
    encoding: JobEncoding


class ProgressReporter:
    """Publishes progress through ctx.set_metadata, throttled within a stage."""

    def __init__(self, ctx: JobContext, kind: str, model: str, encode: JobEncoding,
                 min_interval_s: float = 0.5) -> None:
        self.ctx = ctx
        self.encode = encode.progress
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
        self.ctx.set_metadata(*self.encode(JobProgress(
            self.kind, self.model, stage, done, total, self.created, time.time(),
        )))


def _provenance(kind: str, edits: Sequence[Edit], seed: int) -> dict[str, object]:
    return {"operation_kind": kind, "edits": len(edits), "seed": seed}


def _retrain(
    rt: ModelRuntime, train: Sequence[Example], retrain: RetrainSpec | None,
    examples: Sequence[Example], report: ProgressReporter, env: JobEnv,
    provenance: dict[str, object], should_stop: Callable[[], None],
    reports: Sequence[ExampleReport] = (),
) -> Evaluation | None:
    """Retrain on the edited training set and evaluate (None when no retraining is asked);
    the reports get the retrained model's margins."""
    if retrain is None:
        return None
    return retrain_and_evaluate(
        rt, train, retrain, examples, should_stop, report, output_root=env.output_root,
        provenance=provenance, inspect=lambda task: _measure(rt, task, examples, reports),
    )


def _measure(rt: ModelRuntime, task: Task, examples: Sequence[Example],
             reports: Sequence[ExampleReport]) -> None:
    """Each report's measured_margin: m_y of its request example under the retrained task."""
    picked = [examples[r.example_index] for r in reports]
    for r, m in zip(reports, margins(task, picked, rt.max_length), strict=True):
        r.measured_margin = m


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


def attack_job(rt: ModelRuntime, q: AttackQuery, retrain: RetrainSpec | None, env: JobEnv
               ) -> JobFn:
    """The job function of one Attack operation."""

    def run(ctx: JobContext) -> JobResult:
        report = ProgressReporter(ctx, "attack", rt.name, env.encoding)
        report("explaining", 0, len(q.examples))
        with model_turns(rt, ctx) as should_stop:
            out = run_attack(
                rt, q, should_stop, report, default_candidates=env.default_candidates,
                scoring_batch_size=env.scoring_batch_size,
            )
            ev = _retrain(rt, out.train, retrain, q.examples, report, env,
                          _provenance("attack", out.edits, q.seed), should_stop, out.reports)
        report("done", 1, 1)
        return env.encoding.attack(out, ev)

    return run


def repair_job(rt: ModelRuntime, q: RepairQuery, retrain: RetrainSpec | None, env: JobEnv
               ) -> JobFn:
    """The job function of one Repair operation."""

    def run(ctx: JobContext) -> JobResult:
        report = ProgressReporter(ctx, "repair", rt.name, env.encoding)
        with model_turns(rt, ctx) as should_stop:
            out = run_repair(
                rt, q, should_stop, report, default_candidates=env.default_candidates,
                scoring_batch_size=env.scoring_batch_size,
            )
            ev = _retrain(rt, out.train, retrain, q.examples, report, env,
                          _provenance("repair", out.edits, q.seed), should_stop, out.reports)
        report("done", 1, 1)
        return env.encoding.repair(out, ev)

    return run
