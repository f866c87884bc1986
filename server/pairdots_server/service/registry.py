"""The served models: one ModelRuntime per healthy bundle directory under a root, reloaded
while serving.

`refresh()` rescans the root: a new or changed bundle directory is loaded and verified (every
file's SHA-256, storage/bundle.load_bundle) *outside* the lock and then swapped in under it,
so calls in flight keep the ModelRuntime they already hold (the old model lives until its last
call or job step drops it); a directory that disappeared is unlisted; a bundle that fails
verification is refused with its reason and unlisted. A directory is "changed" when its
fingerprint (manifest.json bytes plus size, mtime and inode of every file) differs from the
one it was loaded or refused with. With `settle=True` (the watcher) a new fingerprint must be
seen on two consecutive scans before it is loaded, so a bundle still being copied in is not
loaded half-written.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pairdots_server.errors import InvalidArgument, NotFound, PairdotsError
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.influence.scope_inputs import SCOPE_INPUT_MAX_BYTES
from pairdots_server.storage.bundle import load_bundle, validate_bundle_name
from pairdots_server.storage.manifest import MANIFEST

log = logging.getLogger("pairdots.service")

#: The resource-name prefix of a model (AIP-122): "models/{model}". Requests may name a model
#: either way; the HTTP/JSON paths (/v1/models/{model}:explain) always carry the prefix.
MODEL_PREFIX = "models/"


def model_id(name: str) -> str:
    """The bare model id of `name`: "models/minilm-sst2" and "minilm-sst2" → "minilm-sst2"."""
    return name.removeprefix(MODEL_PREFIX)
Fingerprint = str


def bundle_fingerprint(path: Path) -> Fingerprint:
    """SHA-256 over manifest.json's bytes and (relative path, size, mtime_ns, inode) of every
    file below `path`: cheap (one stat per file, no data read) and it changes when a file is
    added, removed, rewritten or replaced, or when the manifest is updated."""
    h = hashlib.sha256()
    try:
        h.update((path / MANIFEST).read_bytes())
    except OSError:
        h.update(b"<no manifest>")
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            try:
                st = full.stat()
            except OSError:
                continue
            rel = full.relative_to(path).as_posix()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class RefreshResult:
    """What one scan changed: model names added, replaced (reloaded) and removed, the
    directories newly refused ({dir: reason}) and those no longer refused (gone)."""

    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    refused: dict[str, str] = field(default_factory=dict)
    cleared: tuple[str, ...] = ()

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed or self.refused or self.cleared)


@dataclass
class _Loaded:
    name: str
    fingerprint: Fingerprint


class ModelRegistry:
    """The served models, loaded from every bundle directory under a root.

    A bundle that fails verification is refused with its reason (kept in `errors`, keyed by
    its directory, and logged) while the healthy ones serve.
    """

    def __init__(self, root: Path, *, device: str = "cpu", cache_size: int = 256,
                 scope_input_max_bytes: int | None = SCOPE_INPUT_MAX_BYTES) -> None:
        self.root = root
        self.device = device
        self.cache_size = cache_size
        self.scope_input_max_bytes = scope_input_max_bytes  # per bundle (None = unbounded)
        self._models: dict[str, ModelRuntime] = {}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()
        self._scan_lock = threading.Lock()  # one scan at a time (watcher and load_all)
        self._loaded: dict[Path, _Loaded] = {}  # bundle directory → what is served from it
        self._refused: dict[Path, Fingerprint] = {}  # directory → fingerprint it was refused at
        self._pending: dict[Path, Fingerprint] = {}  # seen once, waiting to settle

    def load_all(self) -> None:
        """Load every bundle under the root now (the start-up scan; nothing waits to settle)."""
        if not self.root.is_dir():
            raise NotFound(f"bundle root {self.root} does not exist; run `pairdots prepare` first")
        self.refresh(settle=False)
        log.info("serving %d model(s): %s", len(self._models),
                 ", ".join(self.names()) or "none")

    def refresh(self, *, settle: bool = True) -> RefreshResult:
        """Rescan the root once; load new or changed bundles, unlist removed or refused ones."""
        with self._scan_lock:
            return self._refresh(settle)

    def _refresh(self, settle: bool) -> RefreshResult:
        added: list[str] = []
        replaced: list[str] = []
        removed: list[str] = []
        refused: dict[str, str] = {}
        cleared: list[str] = []
        try:
            dirs = sorted(d for d in self.root.iterdir()
                          if d.is_dir() and not d.name.startswith("."))
        except OSError as exc:  # the root vanished or is unreadable: keep serving what we have
            log.error("cannot scan the bundle root %s: %s", self.root, exc)
            return RefreshResult()
        present = set(dirs)
        for d in [d for d in self._loaded if d not in present]:
            name = self._loaded.pop(d).name
            with self._lock:
                self._models.pop(name, None)
            removed.append(name)
            log.info("bundle %s removed from %s: model %r unlisted", d.name, self.root, name)
        for d in [d for d in self._refused if d not in present]:
            del self._refused[d]
            with self._lock:
                self.errors.pop(str(d), None)
            cleared.append(str(d))
        for d in [d for d in self._pending if d not in present]:
            del self._pending[d]

        for d in dirs:
            fp = bundle_fingerprint(d)
            known = self._loaded.get(d)
            if (known is not None and known.fingerprint == fp) or self._refused.get(d) == fp:
                self._pending.pop(d, None)
                continue
            if settle and self._pending.get(d) != fp:
                self._pending[d] = fp  # load it once two scans agree
                continue
            self._pending.pop(d, None)
            try:
                runtime = self._load(d)
            except PairdotsError as exc:
                why = exc.message
            else:
                why = self._name_clash(d, runtime.name)
            if why is not None:
                self._refuse(d, fp, why, refused)
                if known is not None:
                    self._loaded.pop(d)
                    with self._lock:
                        self._models.pop(known.name, None)
                    removed.append(known.name)
                continue
            with self._lock:
                if known is not None and known.name != runtime.name:
                    self._models.pop(known.name, None)
                self._models[runtime.name] = runtime
                self.errors.pop(str(d), None)
            self._refused.pop(d, None)
            self._loaded[d] = _Loaded(runtime.name, fp)
            (replaced if known is not None else added).append(runtime.name)
            log.info("%s model %r from %s", "reloaded" if known else "loaded", runtime.name, d)
        return RefreshResult(tuple(added), tuple(replaced), tuple(removed), refused,
                             tuple(cleared))

    def _load(self, d: Path) -> ModelRuntime:
        return ModelRuntime(load_bundle(d, device=self.device), cache_size=self.cache_size,
                            scope_input_max_bytes=self.scope_input_max_bytes)

    def _name_clash(self, d: Path, name: str) -> str | None:
        other = next((p for p, e in self._loaded.items() if e.name == name and p != d), None)
        if other is None:
            return None
        return (f"bundle {name!r} at {d} has the same name as the bundle at {other}; "
                "rename or remove one of them")

    def _refuse(self, d: Path, fp: Fingerprint, why: str, refused: dict[str, str]) -> None:
        log.error("refusing bundle %s: %s", d, why)
        self._refused[d] = fp
        refused[str(d)] = why
        with self._lock:
            self.errors[str(d)] = why

    def refused_names(self) -> list[str]:
        """The directory names of the refused bundles (their model name may be unreadable)."""
        with self._lock:
            return sorted(Path(p).name for p in self.errors)

    def add(self, runtime: ModelRuntime) -> None:
        with self._lock:
            self._models[runtime.name] = runtime

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def get(self, name: str, field: str = "model") -> ModelRuntime:
        """The served model `name` (bare, or the resource name "models/{name}"); `field` is the
        request field that named it (for the BadRequest violation: `model` in
        Explain/Attack/Repair, `name` in GetModel)."""
        name = model_id(name)
        if not name:
            raise InvalidArgument.for_field(field, "required: the name of a served model")
        try:
            validate_bundle_name(name)
        except InvalidArgument:
            raise InvalidArgument.for_field(
                field, f"{name[:80]!r} is not a model name (lower-case letters, digits, '.', "
                "'_', '-'; at most 63 characters; never a path)"
            ) from None
        with self._lock:
            runtime = self._models.get(name)
        if runtime is None:
            served = ", ".join(self.names()) or "none"
            raise NotFound(f"model {name!r} is not served here; served models: {served}")
        return runtime

    def all(self) -> list[ModelRuntime]:
        with self._lock:
            return [self._models[n] for n in sorted(self._models)]
