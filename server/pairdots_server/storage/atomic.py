"""Crash-safe file writes and the helpers around them (bundles and their manifests).

Every write goes to a temp file beside the destination, is fsync'ed and renamed into place
(os.replace), and the directory is fsync'ed, so a reader sees the old content or the new,
never a half-written file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pairdots_server.errors import NotFound


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory (directories: best effort, not all platforms allow it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _write_temp(dest: Path, content: bytes | Path) -> Path:
    """Write bytes (or copy a file) to a fsync'ed temp file beside dest and return its path;
    nothing is left on error."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.tmp")
    try:
        if isinstance(content, (bytes, bytearray, memoryview)):
            with tmp.open("wb") as f:
                f.write(content)
                f.flush()
                os.fsync(f.fileno())
        else:
            src = Path(content)
            if not src.is_file():
                raise NotFound(f"artifact source {src} is not a file")
            shutil.copyfile(src, tmp)
            fsync_path(tmp)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return tmp


def write_file(dest: Path, content: bytes | Path) -> None:
    """Write bytes (or copy a file) to dest via a temp file + fsync + os.replace."""
    tmp = _write_temp(dest, content)
    try:
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def stage_file(dest: Path, content: bytes | Path) -> Path:
    """Write content to a fsync'ed temp file beside dest (not yet in place) and return its
    path; ``os.replace(tmp, dest)`` then installs it atomically. Nothing is left on error."""
    tmp = _write_temp(dest, content)
    try:
        tmp.chmod(0o644)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return tmp


def deep_merge(base: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; a value of None deletes the key."""
    out = copy.deepcopy(base)
    for key, value in updates.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return out
