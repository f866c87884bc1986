"""Artifacts added to a bundle after it is prepared (index, low-rank factors): crash-safe
update of files + manifest, and lookup of a listed artifact."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pairdots_server.errors import BundleError, NotFound
from pairdots_server.storage import atomic
from pairdots_server.storage.bundle import (
    FIX,
    MANIFEST,
    Bundle,
    check_relpath,
    check_reserved,
    read_manifest,
)


def update_bundle(
    bundle_dir: str | Path,
    files: Mapping[str, bytes | Path] | None = None,
    manifest_updates: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Add/replace artifacts and deep-merge manifest keys (None deletes a key); returns the
    new manifest.

    Crash safety: files that replace listed ones are first dropped from the manifest (written
    atomically), then every file is written via temp + os.replace, then the final manifest
    (with fresh hashes) replaces the old one. At every instant the manifest on disk lists only
    files that exist with the listed hash.
    """
    path = Path(bundle_dir)
    manifest = read_manifest(path)
    files = dict(files or {})
    updates = dict(manifest_updates or {})
    check_reserved(updates, "manifest_updates")
    for rel in files:
        check_relpath(rel)
    replaced = [rel for rel in files if rel in manifest["files"]]
    if replaced:
        interim = copy.deepcopy(manifest)
        for rel in replaced:
            del interim["files"][rel]
        atomic.write_json_atomic(path / MANIFEST, interim)
    new_hashes: dict[str, str] = {}
    for rel, content in files.items():
        atomic.write_file(path / rel, content)
        new_hashes[rel] = atomic.sha256_file(path / rel)
    final = atomic.deep_merge(manifest, updates) if updates else copy.deepcopy(manifest)
    final["files"] = {**manifest["files"], **new_hashes}
    atomic.write_json_atomic(path / MANIFEST, final)
    return final


def read_artifact(bundle: Bundle | str | Path, relpath: str) -> Path:
    """Path of a listed artifact of the bundle; NotFound if the manifest does not list it."""
    check_relpath(relpath)
    if isinstance(bundle, Bundle):
        path, manifest = bundle.path, bundle.manifest
    else:
        path = Path(bundle)
        manifest = read_manifest(path)
    if relpath not in manifest.get("files", {}):
        raise NotFound(
            f"bundle {manifest.get('name', path.name)!r} has no artifact {relpath}; build it "
            "(e.g. `pairdots index`) or re-run `pairdots prepare`"
        )
    fp = path / relpath
    if not fp.is_file():
        raise BundleError(
            f"bundle {manifest.get('name')!r} ({path}): file {relpath} is listed "
            f"but missing; {FIX}"
        )
    return fp
