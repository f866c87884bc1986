"""The facade the RPC layer calls: bounded model work and Explain over the served models
(service/registry.py).

No gRPC here: methods take validated domain queries and return domain answers; errors are
errors.PairdotsError subclasses that the interceptor maps to status codes.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pairdots_server.config import ServerConfig
from pairdots_server.errors import CancelToken
from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, explain
from pairdots_server.service.registry import ModelRegistry
from pairdots_server.service.workers import WorkerPool

if TYPE_CHECKING:
    from pairdots_server.service.jobs.runner import JobService

log = logging.getLogger("pairdots.service")


class PairdotsService:
    def __init__(self, config: ServerConfig, registry: ModelRegistry) -> None:
        self.config = config
        self.registry = registry
        self.pool = WorkerPool(config.max_workers, config.max_queue)
        # set by rpc/app.py: the in-process JobRunner, or a JobQueue with --no-worker
        self.jobs: JobService | None = None

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
