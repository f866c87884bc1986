"""Retrain on a perturbed (attack, §4.2) or augmented (repair, §4.3) training set, evaluate
accuracy before and after, and optionally save the result as a new bundle.

Two modes:
  FULL        fine-tune every parameter from the bundle's base checkpoint (manifest
              "model.source") with the bundle's recipe (manifest "train"), as prepare did.
              When the source is not a readable local model directory the served model is
              used as the starting point instead, and a note says so.
  SCOPE_ONLY  fine-tune only the influence-scope parameters, starting from the served model
              (fast; the paper retrains fully).
  SCOPE_PROXIMAL  the influence scope retrained to convergence of the proximal Bregman
              response (model/converged.py): deterministic, the served model itself when
              nothing changed, and what a damped influence function estimates.
The served model is never modified: retraining works on a deep copy (or a fresh load).
"""

from __future__ import annotations

import copy
import enum
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.task import Task
from pairdots_server.model.train import TrainConfig, TrainResult, evaluate, fine_tune
from pairdots_server.storage.bundle import save_bundle, validate_bundle_name
from pairdots_server.storage.data import Example

if TYPE_CHECKING:
    import torch

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)
MAX_EPOCHS = 10


class RetrainMode(enum.Enum):
    FULL = "full"
    SCOPE_ONLY = "scope_only"
    SCOPE_PROXIMAL = "scope_proximal"


@dataclass(frozen=True)
class RetrainSpec:
    """What to do after the edits: `epochs` None = the recipe's; `eval_examples` empty = the
    request's examples; `save_as` None = don't save; `seed` None = the recipe's (batch order,
    dropout, a FULL retrain's new head: benchmarks repeat a table with other seeds)."""

    mode: RetrainMode = RetrainMode.FULL
    epochs: int | None = None
    eval_examples: tuple[Example, ...] = ()
    save_as: str | None = None
    max_steps: int | None = None  # cap (tests, benchmarks); None = the recipe's
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and not 1 <= self.epochs <= MAX_EPOCHS:
            raise InvalidArgument.for_field(
                "retrain.epochs", f"must be in 1..{MAX_EPOCHS}, got {self.epochs}"
            )
        if self.save_as is not None:
            try:
                validate_bundle_name(self.save_as)
            except InvalidArgument as exc:
                raise InvalidArgument.for_field(
                    "retrain.save_as", exc.violations[0].description if exc.violations
                    else exc.message
                ) from None


@dataclass(frozen=True)
class Evaluation:
    accuracy_before: float
    accuracy_after: float
    examples: int
    saved_model: str
    retrain_seconds: float
    notes: tuple[str, ...] = ()


def recipe(rt: ModelRuntime, spec: RetrainSpec) -> TrainConfig:
    """The bundle's training recipe (manifest "train"), with the spec's overrides."""
    raw = rt.bundle.manifest.get("train")
    known = {f.name for f in fields(TrainConfig)}
    d: dict[str, Any] = {k: v for k, v in (raw or {}).items() if k in known} \
        if isinstance(raw, dict) else {}
    d["max_length"] = int(d.get("max_length", rt.max_length))
    if spec.epochs is not None:
        d["epochs"] = spec.epochs
    if spec.max_steps is not None:
        d["max_steps"] = spec.max_steps
    if spec.seed is not None:
        d["seed"] = spec.seed
    d["scope_only"] = spec.mode is RetrainMode.SCOPE_ONLY
    return TrainConfig.from_dict(d)


def check_save_as(output_root: Path, name: str | None) -> None:
    """AlreadyExists when `name` is taken under output_root, FailedPrecondition when
    output_root is not a directory this process can write (probed with a temporary file: a
    read-only mount fails here, at request time, not after the retrain)."""
    if name is None:
        return
    if (output_root / validate_bundle_name(name)).exists():
        raise AlreadyExists(
            f"bundle {name!r} already exists in {output_root}; choose another retrain.save_as"
        )
    fix = ("start the server (and the workers) with --output-bundles pointing at a writable "
           "directory shared with them, or leave retrain.save_as empty")
    if not output_root.is_dir():
        raise FailedPrecondition(
            f"retrain.save_as needs the output directory {output_root}, which "
            f"{'is not a directory' if output_root.exists() else 'does not exist'}; {fix}",
            reason="OUTPUT_NOT_WRITABLE")
    try:
        fd, probe = tempfile.mkstemp(prefix=".pairdots-write-check-", dir=output_root)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FailedPrecondition(
            f"retrain.save_as cannot be written: the output directory {output_root} is not "
            f"writable ({exc.strerror}); {fix}", reason="OUTPUT_NOT_WRITABLE") from exc


def check_supported(rt: ModelRuntime, spec: RetrainSpec | None) -> None:
    """FailedPrecondition when model `rt` cannot run `spec`'s mode (checked when Attack/Repair
    is called, not after the search): SCOPE_PROXIMAL needs the scope split."""
    if spec is not None and spec.mode is RetrainMode.SCOPE_PROXIMAL:
        from pairdots_server.model.converged import require_split

        require_split(rt)


def base_task(
    source: str | Path, labels: Sequence[str], scope: ScopeSpec, device: str, seed: int,
    dtype: torch.dtype | None = None,
) -> Task:
    """The base checkpoint as a Task to fine-tune, its new classifier head seeded by `seed`
    (so the same seed gives the same starting point for every perturbed training set)."""
    import torch

    torch.manual_seed(seed)
    return Task.from_pretrained(source, labels=labels, scope=scope, device=device, dtype=dtype)


def starting_task(rt: ModelRuntime, mode: RetrainMode, seed: int) -> tuple[Task, list[str]]:
    """A new Task to retrain (never the served one) and notes about where it came from."""
    served = rt.task
    if mode is RetrainMode.FULL:
        source = (rt.bundle.manifest.get("model") or {}).get("source")
        if isinstance(source, str) and source and (Path(source) / "config.json").is_file():
            task = base_task(source, rt.bundle.labels, served.scope, served.device, seed,
                             served.dtype)
            return task, []
        note = (
            f"full retrain: the base checkpoint {source!r} is not a readable local model "
            "directory, so every parameter was fine-tuned starting from the served model"
        )
        notes = [note]
    else:
        notes = []
    model = copy.deepcopy(served.model)
    return Task(model, served.tokenizer, list(served.labels), served.scope, served.device), notes


def retrain(
    rt: ModelRuntime,
    new_train: Sequence[Example],
    spec: RetrainSpec,
    should_stop: Callable[[], None],
    progress: ProgressFn | None = None,
) -> tuple[Task, TrainResult, list[str]]:
    """A new Task fine-tuned on `new_train` with the bundle's recipe (see the module
    docstring); the served model is left as it is. Returns (task, train result, notes)."""
    report = progress or (lambda stage, done, total: None)
    if spec.mode is RetrainMode.SCOPE_PROXIMAL:
        from pairdots_server.model.converged import retrain_converged

        report("retraining", 0, 0)
        task, result, how = retrain_converged(
            rt, new_train, should_stop=should_stop,
            progress=lambda done, total, _j: report("retraining", done, total))
        return task, result, [how.note()]
    cfg = recipe(rt, spec)
    task, notes = starting_task(rt, spec.mode, cfg.seed)
    report("retraining", 0, 0)
    result = fine_tune(
        task, list(new_train), cfg,
        progress=lambda step, total, loss: report("retraining", step, total),
        should_stop=should_stop,
    )
    return task, result, notes


def retrain_and_evaluate(
    rt: ModelRuntime,
    new_train: Sequence[Example],
    spec: RetrainSpec,
    default_eval: Sequence[Example],
    should_stop: Callable[[], None],
    progress: ProgressFn | None = None,
    *,
    output_root: Path | None = None,
    provenance: dict[str, Any] | None = None,
    inspect: Callable[[Task], None] | None = None,
) -> Evaluation:
    """Accuracy of the served model on the evaluation examples, retrain on `new_train`,
    accuracy after; save as `spec.save_as` under `output_root` when asked. `inspect` sees
    the retrained task before it is saved or dropped (e.g. to measure margins)."""
    report = progress or (lambda stage, done, total: None)
    eval_set = list(spec.eval_examples or default_eval)
    if not eval_set:
        raise InvalidArgument.for_field("retrain.eval_examples", "no evaluation examples")
    if spec.save_as is not None:
        if output_root is None:
            raise InvalidArgument.for_field("retrain.save_as", "no output directory configured")
        check_save_as(output_root, spec.save_as)
    cfg = recipe(rt, spec)
    report("evaluating", 0, len(eval_set))
    before = evaluate(rt.task, eval_set, max_length=cfg.max_length)
    task, result, notes = retrain(rt, new_train, spec, should_stop, report)
    seconds = result.seconds
    report("evaluating", 0, len(eval_set))
    after = evaluate(task, eval_set, max_length=cfg.max_length)
    if inspect is not None:
        inspect(task)
    saved = ""
    if spec.save_as is not None:
        assert output_root is not None
        should_stop()
        report("saving", 0, 1)
        source = (rt.bundle.manifest.get("model") or {}).get("source")
        extra: dict[str, Any] = {
            "model": {"source": source},
            "dataset": {"path": f"derived from bundle {rt.name!r}"},
            "train": {**cfg.to_dict(), "steps": result.steps, "final_loss": result.final_loss,
                      "seconds": round(seconds, 2)},
            "derived_from": {"bundle": rt.name, "retrain_mode": spec.mode.value,
                             **(provenance or {})},
            "defaults": dict(rt.bundle.manifest.get("defaults") or {}),
        }
        save_bundle(output_root, spec.save_as, task, list(new_train), extra)
        saved = spec.save_as
    return Evaluation(
        before.accuracy, after.accuracy, len(eval_set), saved, seconds, tuple(notes)
    )
