"""ExplainBatch as a job function: many inputs explained one after the other, each answer (or
error) appended as one JSON line to a results file next to the job store.

Each input runs the Explain use case (influence/explain.explain) while the job holds the
model's compute gate (perturb_jobs.model_turns: Explain calls waiting for the model run first
at every checkpoint). Cancellation stops the job at the next checkpoint (between inputs, and
inside an input between solver iterations and scoring batches); the lines written so far stay.
An input that fails (e.g. a gold label out of range, a diverged solver) becomes an error line
with its google.rpc.Code name and message, and the batch goes on.

How an answer becomes a JSON object and the summary a stored result is the BatchEncoding the
caller passes (rpc/batch.py: protobuf's JSON mapping of ExplainResponse, ExplainBatchResult),
so this module holds no protobuf.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots_server import errors
from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, explain
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.service.jobs.perturb_jobs import JobEnv, ProgressReporter, model_turns
from pairdots_server.service.jobs.runner import JobContext, JobFn, JobResult

log = logging.getLogger(__name__)

KIND = "explain_batch"
RESULTS_DIR = "batch-results"
CODE_NAMES = {v: k for k, v in vars(errors.Code).items() if not k.startswith("_")}


@dataclass(frozen=True)
class BatchItem:
    """One validated input: its position, the caller's id and the Explain query."""

    index: int
    id: str
    query: ExplainQuery


@dataclass(frozen=True)
class BatchSummary:
    """What a finished batch reports."""

    input_count: int
    succeeded: int
    failed: int
    results_path: Path
    seconds: float


@dataclass(frozen=True)
class BatchEncoding:
    """answer: ExplainAnswer → JSON-ready dict (the ExplainResponse's JSON mapping);
    result: the summary → (type URL, bytes) of the operation's response."""

    answer: Callable[[ModelRuntime, ExplainAnswer], dict[str, Any]]
    result: Callable[[BatchSummary], JobResult]


def results_path(results_dir: Path, operation: str) -> Path:
    """The JSON-lines file of operation ``operations/<id>``: ``<results_dir>/<id>.jsonl``."""
    ident = operation.rsplit("/", 1)[-1]
    if not ident or not all(c.isalnum() or c in "-_" for c in ident):
        raise errors.InvalidArgument.for_field(
            "operation", f"{operation[:80]!r} is not an operation name like 'operations/<id>'"
        )
    return results_dir / f"{ident}.jsonl"


def error_line(index: int, ident: str, exc: BaseException) -> dict[str, Any]:
    code = errors.code_for(exc)
    message = exc.message if isinstance(exc, errors.PairdotsError) else str(exc)
    return {
        "index": index,
        "id": ident,
        "error": {"code": CODE_NAMES.get(code, "INTERNAL"), "message": message},
    }


def explain_batch_job(
    rt: ModelRuntime,
    items: Sequence[BatchItem],
    results_dir: Path,
    env: JobEnv,
    encoding: BatchEncoding,
) -> JobFn:
    """The job function of one ExplainBatch operation."""

    def run(ctx: JobContext) -> JobResult:
        report = ProgressReporter(ctx, KIND, rt.name, env.encoding)
        path = results_path(results_dir, ctx.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        ok = failed = 0
        report("explaining", 0, len(items))
        with path.open("w", encoding="utf-8") as out, model_turns(rt, ctx) as should_stop:
            for done, item in enumerate(items):
                should_stop()
                try:
                    answer = explain(
                        rt,
                        item.query,
                        should_stop,
                        default_candidates=env.default_candidates,
                        scoring_batch_size=env.scoring_batch_size,
                    )
                    line = {
                        "index": item.index,
                        "id": item.id,
                        "response": encoding.answer(rt, answer),
                    }
                    ok += 1
                except (errors.Cancelled, errors.DeadlineExceeded):
                    raise
                except errors.PairdotsError as exc:
                    line = error_line(item.index, item.id, exc)
                    failed += 1
                except Exception as exc:  # one input's bug must not lose the batch
                    log.exception("ExplainBatch %s: input %d failed", ctx.name, item.index)
                    line = error_line(item.index, item.id, exc)
                    failed += 1
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
                out.flush()  # ListExplainBatchResults reads the lines while the job runs
                report("explaining", done + 1, len(items))
        report("done", 1, 1)
        return encoding.result(
            BatchSummary(len(items), ok, failed, path, time.perf_counter() - started)
        )

    return run
