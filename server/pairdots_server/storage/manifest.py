"""A bundle's manifest and its names: the format constants, bundle names and artifact paths,
reading and checking manifest.json, and verifying the files it lists against their SHA-256
(bundle.py saves, loads and discovers bundles; update.py adds artifacts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from pairdots_server.errors import BundleError, InvalidArgument, NotFound
from pairdots_server.storage import atomic

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_DIR = "model"
TRAIN_FILE = "train.jsonl"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
RESERVED = ("format_version", "name", "files")
FIX = "re-run `pairdots prepare` to rebuild it"


# --------------------------------------------------------------------------------------------
# names and paths
# --------------------------------------------------------------------------------------------


def validate_bundle_name(name: str) -> str:
    """Return ``name`` if it matches ``^[a-z0-9][a-z0-9._-]{0,62}$`` and is not a path."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise InvalidArgument.for_field(
            "name",
            f"bad bundle name {name!r}: use 1-63 lowercase letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, no '..' and no '/'",
        )
    return name


def check_relpath(relpath: str) -> str:
    p = PurePosixPath(relpath)
    if (
        not relpath
        or p.is_absolute()
        or "\\" in relpath
        or any(part in ("", ".", "..") for part in relpath.split("/"))
        or relpath == MANIFEST
    ):
        raise InvalidArgument.for_field(
            "files",
            f"bad artifact path {relpath!r}: use a relative path like 'index/x.bin' "
            "inside the bundle (no '..', not manifest.json)",
        )
    return relpath


def hash_tree(root: Path) -> dict[str, str]:
    """{relpath: sha256} for every regular file under root except manifest.json."""
    out: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (p.parent == root and p.name == MANIFEST):
            out[p.relative_to(root).as_posix()] = atomic.sha256_file(p)
    return out


def check_reserved(updates: Mapping[str, Any], what: str) -> None:
    bad = [k for k in RESERVED if k in updates]
    if bad:
        raise InvalidArgument.for_field(
            what, f"keys {bad} are managed by pairdots and cannot be set here"
        )


# --------------------------------------------------------------------------------------------
# reading and verifying
# --------------------------------------------------------------------------------------------


def _parse_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST
    if not path.is_dir():
        raise NotFound(f"no bundle directory at {path}")
    if not mpath.is_file():
        raise BundleError(f"bundle at {path} has no {MANIFEST}; {FIX}")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"bundle at {path}: {MANIFEST} is not valid JSON ({exc}); {FIX}"
        ) from None
    if not isinstance(manifest, dict):
        raise BundleError(f"bundle at {path}: {MANIFEST} is not a JSON object; {FIX}")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"bundle at {path} has format_version {version!r}; this server reads version "
            f"{FORMAT_VERSION}; {FIX} with this version of pairdots"
        )
    for key, typ in (("name", str), ("labels", list), ("files", dict), ("scope", dict)):
        if not isinstance(manifest.get(key), typ):
            raise BundleError(
                f"bundle at {path}: {MANIFEST} lacks a valid {key!r} ({typ.__name__}); {FIX}"
            )
    return manifest


def verify_files(path: Path, manifest: Mapping[str, Any], *, check_hashes: bool = True) -> None:
    """Every listed file exists (and matches its SHA-256); model/ and train.jsonl are listed."""
    name = manifest.get("name", path.name)
    files = manifest["files"]
    for required in (TRAIN_FILE, f"{MODEL_DIR}/config.json"):
        if required not in files:
            raise BundleError(
                f"bundle {name!r} ({path}): manifest does not list {required}; {FIX}"
            )
    for rel, digest in files.items():
        try:
            check_relpath(rel)
        except InvalidArgument:
            raise BundleError(
                f"bundle {name!r} ({path}): manifest lists a bad path {rel!r}; {FIX}"
            ) from None
        fp = path / rel
        if not fp.is_file():
            raise BundleError(f"bundle {name!r} ({path}): file {rel} is missing; {FIX}")
        if check_hashes and atomic.sha256_file(fp) != digest:
            raise BundleError(
                f"bundle {name!r} ({path}): file {rel} does not match its SHA-256 in the "
                f"manifest (corrupted or modified); {FIX}"
            )


def verify_bundle(path: str | Path) -> dict[str, Any]:
    """Check a bundle on disk without loading its model: a valid manifest and every listed
    file present with its SHA-256. Returns the manifest; BundleError naming the file if not."""
    path = Path(path)
    manifest = _parse_manifest(path)
    verify_files(path, manifest, check_hashes=True)
    return manifest


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The validated manifest of a bundle dir, without loading the model."""
    return _parse_manifest(Path(path))
