"""Artifacts added to a bundle after it is prepared (index, low-rank, EK-FAC and diagonal
curvature): crash-safe update of files + manifest, and lookup of a listed artifact.

update_bundle: at every instant the manifest lists only files that exist with their hash (a
replaced file is unlisted while it is rewritten). update_bundle_staged: the same, and nothing
listed is lost on a failure (new files are staged first, replaced ones kept until the new
manifest is in)."""

from __future__ import annotations

import copy
import os
import secrets
import shutil
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


def update_bundle_staged(
    bundle_dir: str | Path,
    files: Mapping[str, bytes | Path] | None = None,
    manifest_updates: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``update_bundle`` with a stronger guarantee (what `pairdots curvature fit` uses):
    nothing listed is lost when it fails.

    Crash safety: every new file is first staged beside its destination (temp file, fsync'ed,
    hashed) while the bundle is untouched, so a failure there (disk full, a bad source) changes
    nothing and the staged files are removed. Then files that replace listed ones are dropped
    from the manifest (written atomically), every staged file is renamed into place
    (os.replace) and the final manifest (with fresh hashes) replaces the old one. At every
    instant the manifest on disk lists only files that exist with the listed hash. Replaced
    files are kept as hard links (or copies) until the end, so an error during the renames
    puts them and the previous manifest back: nothing is lost on a failure.
    """
    path = Path(bundle_dir)
    manifest = read_manifest(path)
    files = dict(files or {})
    updates = dict(manifest_updates or {})
    check_reserved(updates, "manifest_updates")
    for rel in files:
        check_relpath(rel)
    staged: dict[str, Path] = {}
    backups: dict[str, Path] = {}
    new_hashes: dict[str, str] = {}
    try:
        for rel, content in files.items():
            staged[rel] = atomic.stage_file(path / rel, content)
            new_hashes[rel] = atomic.sha256_file(staged[rel])
        final = atomic.deep_merge(manifest, updates) if updates else copy.deepcopy(manifest)
        final["files"] = {**manifest["files"], **new_hashes}
        replaced = [rel for rel in files if rel in manifest["files"]]
        for rel in replaced:  # the old content stays reachable until the new manifest is in
            backups[rel] = _backup(path / rel)
        if replaced:
            interim = copy.deepcopy(manifest)
            for rel in replaced:
                del interim["files"][rel]
            atomic.write_json_atomic(path / MANIFEST, interim)
        installed: list[str] = []
        try:
            for rel, tmp in staged.items():
                os.replace(tmp, path / rel)
                installed.append(rel)
            atomic.fsync_path(path)
            atomic.write_json_atomic(path / MANIFEST, final)
        except BaseException:
            for rel in installed:  # put the replaced files back, then the old manifest
                if rel in backups:
                    os.replace(backups.pop(rel), path / rel)
            atomic.write_json_atomic(path / MANIFEST, manifest)
            raise
    finally:
        for tmp in [*staged.values(), *backups.values()]:
            if tmp.exists():
                tmp.unlink()
    return final


def _backup(dest: Path) -> Path:
    """A hard link (a copy where links are not possible) of dest beside it."""
    bak = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.bak")
    try:
        os.link(dest, bak)
    except OSError:
        shutil.copy2(dest, bak)
    return bak


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
