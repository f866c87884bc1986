"""The served models: one ModelRuntime per healthy bundle directory under a root."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from pairdots_server.errors import InvalidArgument, NotFound
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.storage.bundle import discover_bundles, validate_bundle_name

log = logging.getLogger("pairdots.service")

#: The resource-name prefix of a model (AIP-122): "models/{model}". Requests may name a model
#: either way; the HTTP/JSON paths (/v1/models/{model}:explain) always carry the prefix.
MODEL_PREFIX = "models/"


def model_id(name: str) -> str:
    """The bare model id of `name`: "models/minilm-sst2" and "minilm-sst2" → "minilm-sst2"."""
    return name.removeprefix(MODEL_PREFIX)


class ModelRegistry:
    """The served models, loaded from every bundle directory under a root.

    A bundle that fails verification is refused with its reason (kept in `errors` and
    logged) while the healthy ones serve.
    """

    def __init__(self, root: Path, *, device: str = "cpu", cache_size: int = 256) -> None:
        self.root = root
        self.device = device
        self.cache_size = cache_size
        self._models: dict[str, ModelRuntime] = {}
        self.errors: dict[str, str] = {}
        self._lock = threading.Lock()

    def load_all(self) -> None:
        bundles, bad = discover_bundles(self.root, device=self.device)
        for path, why in bad.items():
            log.error("refusing bundle %s: %s", path, why)
        models = {b.name: ModelRuntime(b, cache_size=self.cache_size) for b in bundles}
        with self._lock:
            self._models = models
            self.errors = dict(bad)
        log.info("serving %d model(s): %s", len(models), ", ".join(sorted(models)) or "none")

    def add(self, runtime: ModelRuntime) -> None:
        with self._lock:
            self._models[runtime.name] = runtime

    def names(self) -> list[str]:
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
