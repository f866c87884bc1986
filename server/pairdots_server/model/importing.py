"""`pairdots import`: a bundle from an already fine-tuned HuggingFace sequence classifier and
its training data, without re-training.

θ is taken as given: the model is loaded, evaluated on the dev data when given, and the bundle
gets the same artifacts as `prepare` (candidate index, low-rank GGN, EK-FAC, diagonal Fisher,
through the same after_train hook); the manifest records ``train.trained_by_pairdots: false``
and where the model came from. Influence I(z, f) = -∇θf^T H⁻¹ ∇θL(z) (paper Eq. 5) assumes θ
is (near) a minimum of the training loss on *these* examples: import the data the model was
fine-tuned on.

The model is a local directory (config.json, weights, tokenizer.json) or an MLflow URI
(``models:/name/version``, ``models:/name@alias``, ``runs:/<run_id>/path``), downloaded with
the optional ``mlflow`` package (``pip install pairdots[mlflow]``) from the tracking/registry
server in ``MLFLOW_TRACKING_URI`` or the one passed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import FailedPrecondition, InvalidArgument, NotFound
from pairdots_server.model.prepare import AfterTrain, check_free, finish_bundle, read_training_data
from pairdots_server.model.scope import ScopeSpec

if TYPE_CHECKING:
    from collections.abc import Mapping

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


@dataclass(frozen=True)
class ImportConfig:
    """What `import_bundle` builds.

    model: a local HF model dir or an MLflow URI (MLFLOW_SCHEMES); train_path / dev_path: the
    data the model was fine-tuned on and a dev set to evaluate it on (dev may be None); labels:
    class names in the model's output order (None: the model config's id2label); label_base,
    text_column, label_column, limit_*: as in PrepareConfig; max_length: tokens per example
    for evaluation, the index and serving; tracking_uri: the MLflow server (None: mlflow's own
    default, $MLFLOW_TRACKING_URI).
    """

    model: str
    train_path: str
    dev_path: str | None = None
    name: str = "imported"
    out_root: str = "bundles"
    labels: tuple[str, ...] | None = None
    label_base: int | None = None
    text_column: str = "text"
    label_column: str = "label"
    scope: ScopeSpec = field(default_factory=ScopeSpec)
    max_length: int = 128
    limit_train: int | None = None
    limit_dev: int | None = None
    tracking_uri: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        from pairdots_server.storage.bundle import validate_bundle_name
        from pairdots_server.storage.labels import LabelSpec

        validate_bundle_name(self.name)
        LabelSpec(self.labels, self.label_base)
        if not self.model:
            raise InvalidArgument.for_field("model", "pass a model directory or an MLflow URI")
        if not self.train_path:
            raise InvalidArgument.for_field(
                "train", "pass the training data the model was fine-tuned on (--train)"
            )
        if self.max_length < 2:
            raise InvalidArgument.for_field("max_length", f"must be >= 2, got {self.max_length}")


def is_mlflow_uri(model: str) -> bool:
    return model.startswith(MLFLOW_SCHEMES)


def download_mlflow_model(uri: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Download an MLflow model's artifacts into dst and return the HF model dir inside."""
    try:
        import mlflow  # type: ignore[import-not-found, import-untyped, unused-ignore]
    except ImportError:
        raise FailedPrecondition(
            f"importing {uri} needs the optional 'mlflow' package; `pip install "
            "pairdots[mlflow]`, or download the model and pass its directory"
        ) from None
    if tracking_uri:
        mlflow.set_registry_uri(tracking_uri)
    try:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri
        )
    except Exception as exc:  # MlflowException, OSError, ... from any store
        raise NotFound(
            f"could not download {uri} from MLflow ({exc}); check the model name and "
            "version/alias or the run id, and --mlflow-tracking-uri / $MLFLOW_TRACKING_URI"
        ) from exc
    return find_hf_dir(Path(local), uri)


def find_hf_dir(root: Path, what: str) -> Path:
    """The HF model directory under root: the one holding config.json (the shallowest), with
    the tokenizer found beside it or elsewhere under root (mlflow.transformers keeps it in
    components/tokenizer/) copied in."""
    configs = sorted(root.rglob("config.json"), key=lambda p: len(p.parts))
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")
    model_dirs = [c.parent for c in configs if any((c.parent / w).is_file() for w in weights)]
    if not model_dirs:
        raise NotFound(
            f"{what}: no HuggingFace model found (a directory with config.json and "
            "model.safetensors); log the model with save_pretrained's files"
        )
    model_dir = model_dirs[0]
    if not (model_dir / "tokenizer.json").is_file():
        toks = sorted(root.rglob("tokenizer.json"), key=lambda p: len(p.parts))
        if not toks:
            raise FailedPrecondition(
                f"{what}: no tokenizer.json (a fast tokenizer) next to the model or under it; "
                "log the tokenizer's save_pretrained files with the model"
            )
        for f in toks[0].parent.iterdir():
            if f.is_file() and not (model_dir / f.name).exists():
                shutil.copy2(f, model_dir / f.name)
    return model_dir


def import_bundle(
    cfg: ImportConfig,
    after_train: AfterTrain | None = None,
    *,
    manifest_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Load the fine-tuned model as is, read its data (labels in the model's output order),
    evaluate, build the artifacts and save the bundle. Returns the bundle path."""
    from pairdots_server.model.task import Task
    from pairdots_server.storage.labels import LabelSpec

    out_root = Path(cfg.out_root)
    check_free(out_root, cfg.name, cfg.overwrite)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pairdots-import-") as tmp:
        if is_mlflow_uri(cfg.model):
            model_dir = download_mlflow_model(cfg.model, Path(tmp), cfg.tracking_uri)
        else:
            model_dir = Path(cfg.model)
            if not (model_dir / "config.json").is_file():
                raise NotFound(
                    f"no HuggingFace model at {model_dir} (config.json missing); pass the "
                    "directory save_pretrained wrote, or an MLflow URI (models:/name/version)"
                )
        task = Task.from_pretrained(model_dir, scope=cfg.scope)  # the config's id2label
        if cfg.labels is not None:
            if len(cfg.labels) != task.num_labels:
                raise InvalidArgument.for_field(
                    "labels",
                    f"{len(cfg.labels)} label names for a model with {task.num_labels} outputs "
                    f"(its config names {task.labels})",
                )
            task = Task.from_pretrained(model_dir, labels=list(cfg.labels), scope=cfg.scope)
        source_sha = _weights_sha256(model_dir)
        data = read_training_data(
            cfg.train_path,
            cfg.dev_path,
            LabelSpec(tuple(task.labels), cfg.label_base),
            text_column=cfg.text_column,
            label_column=cfg.label_column,
            limit_train=cfg.limit_train,
            limit_dev=cfg.limit_dev,
        )
        extra: dict[str, Any] = {
            "model": {
                "source": cfg.model,
                "imported": True,
                "weights_sha256": source_sha,
            },
            "train": {
                "trained_by_pairdots": False,
                "max_length": cfg.max_length,
                "note": "theta as imported: not fine-tuned by pairdots",
            },
        }
        return finish_bundle(
            task,
            data,
            name=cfg.name,
            out_root=out_root,
            overwrite=cfg.overwrite,
            max_length=cfg.max_length,
            extra=extra,
            manifest_extra=manifest_extra,
            after_train=after_train,
            started=t0,
        )


def _weights_sha256(model_dir: Path) -> dict[str, str]:
    """SHA-256 of the imported weight files (what was imported, checkable against the source)."""
    from pairdots_server.storage.atomic import sha256_file

    return {
        p.name: sha256_file(p)
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".bin")
    }
