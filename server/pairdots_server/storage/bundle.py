"""A model bundle on disk: the unit that is prepared, shipped and served (docs/DESIGN.md §3).

Layout of ``<root>/<name>/``::

    manifest.json        format_version, name, labels, created_at, model source, dataset
                         (path, SHA-256, count), scope, train config, dev accuracy, defaults,
                         library versions, files: {relpath: sha256} for every other file
    model/               save_pretrained output: safetensors weights + tokenizer
    train.jsonl          the training examples in order (line i = training example i)
    index/ ...           optional artifacts (also lowrank.safetensors, ekfac.safetensors,
                         diagonal.safetensors) added by prepare or later with update_bundle

Guarantees: ``save_bundle`` builds the bundle in ``<root>/.tmp-<name>-<rand>`` and renames
it into place, so a crash never leaves a half bundle under ``<root>/<name>``;
``update_bundle`` writes the manifest last, so it never lists a missing or mismatching file;
``load_bundle`` verifies the format version and every listed file's SHA-256. Everything is
JSON or safetensors: no pickles. The manifest, names and verification are in manifest.py.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import secrets
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pairdots_server.errors import (
    AlreadyExists,
    BundleError,
    InvalidArgument,
    NotFound,
    PairdotsError,
)
from pairdots_server.storage import atomic
from pairdots_server.storage.manifest import (  # noqa: F401 (re-exported)
    FIX,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_DIR,
    RESERVED,
    TRAIN_FILE,
    check_relpath,
    check_reserved,
    hash_tree,
    read_manifest,
    validate_bundle_name,
    verify_bundle,
    verify_files,
)

if TYPE_CHECKING:
    from pairdots_server.model.task import Task
    from pairdots_server.storage.data import Example

TMP_PREFIX = ".tmp-"


def library_versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    import pairdots_server

    return {
        "pairdots": pairdots_server.__version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


# --------------------------------------------------------------------------------------------
# Bundle
# --------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the model adapter and the training examples."""

    name: str
    path: Path
    manifest: dict[str, Any]
    task: Task
    train: list[Example]

    @property
    def labels(self) -> list[str]:
        return list(self.manifest["labels"])

    @property
    def files(self) -> dict[str, str]:
        return dict(self.manifest.get("files", {}))

    def has_artifact(self, relpath: str) -> bool:
        return relpath in self.manifest.get("files", {})

    @classmethod
    def unsaved(
        cls, name: str, path: Path, task: Task, train: Sequence[Example],
        train_config: Mapping[str, Any],
    ) -> Bundle:
        """A bundle being prepared, not yet saved (no artifacts): what building its artifacts
        (index, low-rank factors) needs before save_bundle writes it."""
        manifest = {"labels": list(task.labels), "train": dict(train_config), "files": {}}
        return cls(name, path, manifest, task, list(train))


def save_bundle(
    root: str | Path,
    name: str,
    task: Task,
    train_examples: Sequence[Example],
    manifest_extra: Mapping[str, Any] | None = None,
    *,
    files: Mapping[str, bytes | Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a new bundle ``<root>/<name>`` atomically and return its path.

    manifest_extra is deep-merged into the manifest (e.g. {"dataset": {"path": ...},
    "train": {...}, "dev": {"accuracy": ...}, "defaults": {...}}); files are extra artifacts
    {relpath: bytes | source path}. AlreadyExists if the bundle exists unless overwrite=True,
    in which case the old one is swapped out by renames and then deleted.
    """
    from pairdots_server.storage.data import sha256_of_examples, write_jsonl

    validate_bundle_name(name)
    extra = dict(manifest_extra or {})
    check_reserved(extra, "manifest_extra")
    for rel in files or {}:
        check_relpath(rel)
        if rel == TRAIN_FILE or rel.startswith(MODEL_DIR + "/"):
            raise InvalidArgument.for_field("files", f"{rel!r} is written by save_bundle itself")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    if final.exists() and not overwrite:
        raise AlreadyExists(
            f"bundle {name!r} already exists at {final}; choose another name or pass overwrite"
        )
    tmp = root / f"{TMP_PREFIX}{name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        task.save_pretrained(tmp / MODEL_DIR)
        write_jsonl(tmp / TRAIN_FILE, train_examples)
        for rel, content in (files or {}).items():
            atomic.write_file(tmp / rel, content)
        for p in tmp.rglob("*"):
            if p.is_file():
                p.chmod(0o644)  # save_pretrained may leave 0600 temp-file modes; bundles ship
                atomic.fsync_path(p)
        manifest: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "name": name,
            "labels": list(task.labels),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "source": str(getattr(task.model.config, "_name_or_path", "") or ""),
                "architecture": type(task.model).__name__,
                "model_type": str(getattr(task.model.config, "model_type", "")),
                "num_parameters": int(sum(p.numel() for p in task.model.parameters())),
                "dtype": str(task.dtype).replace("torch.", ""),
            },
            "dataset": {
                "path": None,
                "sha256": sha256_of_examples(train_examples),
                "count": len(train_examples),
            },
            "scope": task.scope.to_dict(),
            "scope_description": task.scope.describe(),
            "scope_num_parameters": int(sum(t.numel() for t in task.scope_params().values())),
            "train": None,
            "dev": None,
            "defaults": {},
            "versions": library_versions(),
        }
        manifest = atomic.deep_merge(manifest, extra) if extra else manifest
        manifest["files"] = hash_tree(tmp)
        atomic.write_json_atomic(tmp / MANIFEST, manifest)
        atomic.fsync_path(tmp)
        if final.exists():  # overwrite: swap by renames, then delete the old one
            old = root / f"{TMP_PREFIX}old-{name}-{secrets.token_hex(4)}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        atomic.fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def load_bundle(
    path: str | Path, *, device: str = "cpu", verify: bool = True, dtype: Any = None
) -> Bundle:
    """Load and verify a bundle directory (BundleError naming the bundle + file on problems).

    verify=True checks every listed file's SHA-256 and the dataset hash of train.jsonl;
    verify=False only checks that the listed files exist.
    """
    from pairdots_server.model.scope import ScopeSpec
    from pairdots_server.model.task import Task
    from pairdots_server.storage.data import read_examples, sha256_of_examples

    path = Path(path)
    manifest = read_manifest(path)
    name = manifest["name"]
    try:
        validate_bundle_name(name)
    except InvalidArgument:
        raise BundleError(f"bundle at {path}: manifest name {name!r} is invalid; {FIX}") from None
    verify_files(path, manifest, check_hashes=verify)
    try:
        train = read_examples(path / TRAIN_FILE, "jsonl", label_names=manifest["labels"])
        dataset = manifest.get("dataset") or {}
        if verify and dataset.get("sha256") not in (None, sha256_of_examples(train)):
            raise BundleError(
                f"bundle {name!r} ({path}): {TRAIN_FILE} does not match the dataset SHA-256 in "
                f"the manifest; {FIX}"
            )
        if dataset.get("count") not in (None, len(train)):
            raise BundleError(
                f"bundle {name!r} ({path}): {TRAIN_FILE} has {len(train)} examples, the "
                f"manifest says {dataset.get('count')}; {FIX}"
            )
        config = json.loads((path / MODEL_DIR / "config.json").read_text(encoding="utf-8"))
        saved_n = len(config.get("id2label") or {}) or int(config.get("num_labels", 2))
        if saved_n != len(manifest["labels"]):
            raise BundleError(
                f"bundle {name!r} ({path}): the manifest names {len(manifest['labels'])} labels "
                f"but model/config.json has {saved_n} classes; {FIX}"
            )
        scope = ScopeSpec.from_dict(manifest["scope"])
        if dtype is None:  # the dtype the bundle was saved in (float32 unless stated)
            import torch

            dtype = getattr(torch, str((manifest.get("model") or {}).get("dtype", "float32")))
            if not isinstance(dtype, torch.dtype):
                raise BundleError(f"bundle {name!r} ({path}): unknown model dtype; {FIX}")
        task = Task.from_pretrained(
            path / MODEL_DIR, labels=manifest["labels"], scope=scope, device=device, dtype=dtype
        )
    except BundleError:
        raise
    except PairdotsError as exc:
        raise BundleError(f"bundle {name!r} ({path}): {exc.message}; {FIX}") from exc
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise BundleError(
            f"bundle {name!r} ({path}): cannot load ({type(exc).__name__}: {exc}); {FIX}"
        ) from exc
    return Bundle(name=name, path=path, manifest=manifest, task=task, train=train)


def discover_bundles(
    root: str | Path, *, device: str = "cpu", verify: bool = True
) -> tuple[list[Bundle], dict[str, str]]:
    """Load every bundle directory under root (skipping hidden and .tmp-* dirs).

    Returns (good bundles sorted by directory name, {dir: error message} for the bad ones).
    A bundle whose manifest name repeats an earlier one's is reported as an error.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotFound(f"bundle root {root} does not exist; run `pairdots prepare` first")
    good: list[Bundle] = []
    bad: dict[str, str] = {}
    seen: dict[str, Path] = {}
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            b = load_bundle(d, device=device, verify=verify)
        except PairdotsError as exc:
            bad[str(d)] = exc.message
            continue
        if b.name in seen:
            bad[str(d)] = (
                f"bundle {b.name!r} at {d} has the same name as the bundle at {seen[b.name]}; "
                "rename or remove one of them"
            )
            continue
        seen[b.name] = d
        good.append(b)
    return good, bad
