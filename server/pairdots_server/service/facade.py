"""The facade the RPC layer calls: served models, bounded model work, Explain.

No gRPC here: methods take validated domain queries and return domain answers; errors are
errors.PairdotsError subclasses that the interceptor maps to status codes.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from pairdots_server.config import ServerConfig
from pairdots_server.errors import CancelToken, InvalidArgument, NotFound
from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, explain
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.service.workers import WorkerPool
from pairdots_server.storage.bundle import discover_bundles, validate_bundle_name

if TYPE_CHECKING:
    from pairdots_server.service.jobs.runner import JobRunner

log = logging.getLogger("pairdots.service")


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
        """The served model `name`; `field` is the request field that named it (for the
        BadRequest violation: `model` in Explain/Attack/Repair, `name` in GetModel)."""
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


class PairdotsService:
    def __init__(self, config: ServerConfig, registry: ModelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.pool = WorkerPool(config.max_workers, config.max_queue)
        self.jobs: JobRunner | None = None  # set by rpc/app.py (Attack/Repair operations)

    async def explain(self, model: str, query: ExplainQuery, token: CancelToken) -> ExplainAnswer:
        runtime = self.registry.get(model)
        limits = self.config.explain
        default_k = limits.default_candidates(runtime.n_train)

        def work(tok: CancelToken) -> ExplainAnswer:
            with runtime.compute.hold(tok):  # one computation per model at a time
                return explain(
                    runtime, query, tok.check, default_candidates=default_k,
                    scoring_batch_size=limits.scoring_batch_size,
                )

        return await self.pool.run(work, token)

    def close(self) -> None:
        self.pool.shutdown()
