"""The facade the RPC layer calls: bounded model work and Explain over the served models
(service/registry.py).

No gRPC here: methods take validated domain queries and return domain answers; errors are
errors.PairdotsError subclasses that the interceptor maps to status codes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from pairdots_server import telemetry
from pairdots_server.config import ServerConfig
from pairdots_server.errors import CancelToken
from pairdots_server.influence.explain import ExplainAnswer, ExplainQuery, explain
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.metrics import Metrics
from pairdots_server.service.registry import ModelRegistry
from pairdots_server.service.workers import WorkerPool

if TYPE_CHECKING:
    from pairdots_server.service.jobs.runner import JobService

log = logging.getLogger("pairdots.service")


def solver_iterations(answer: ExplainAnswer) -> dict[str, list[int]]:
    """{solver method: [iterations of each s_test solve]} of one answer (prediction level
    and every explained word, every label)."""
    out: dict[str, list[int]] = {}
    for label in answer.explanations:
        diags = [w.solver for w in label.salient_words]
        if label.prediction is not None:
            diags.append(label.prediction.solver)
        for diag in diags:
            out.setdefault(str(diag.get("method", "")), []).append(int(diag.get("iterations", 0)))
    return out


class PairdotsService:
    def __init__(self, config: ServerConfig, registry: ModelRegistry,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.pool = WorkerPool(config.max_workers, config.max_queue)
        # set by rpc/app.py: the in-process JobRunner, or a JobQueue with --no-worker
        self.jobs: JobService | None = None

    async def explain(self, model: str, query: ExplainQuery, token: CancelToken) -> ExplainAnswer:
        """Explain on the served `model`. The runtime is taken once: a reload of the bundle
        during the call swaps the registry's entry, not this call's model. Queue time (worker
        pool + the model's compute gate), stage timings and solver iterations are observed."""
        return await self.explain_on(self.registry.get(model), query, token)

    async def explain_on(self, runtime: ModelRuntime, query: ExplainQuery, token: CancelToken
                         ) -> ExplainAnswer:
        """Explain on a runtime the caller already holds (the one its response is built
        from)."""
        limits = self.config.explain
        default_k = limits.default_candidates(runtime.n_train)
        accepted = time.perf_counter()

        def work(tok: CancelToken) -> ExplainAnswer:
            with runtime.compute.hold(tok):  # one computation per model at a time
                queued = time.perf_counter() - accepted
                with telemetry.span("pairdots.explain", **{
                        "pairdots.model": runtime.name, "pairdots.queue_seconds": queued}):
                    answer = explain(
                        runtime, query, tok.check, default_candidates=default_k,
                        scoring_batch_size=limits.scoring_batch_size,
                    )
            if self.metrics is not None:
                self.metrics.observe_queue("explain", runtime.name, queued)
                self.metrics.observe_explain(runtime.name, answer.timings, solver_iterations(answer))
            return answer

        return await self.pool.run(work, token)

    def close(self) -> None:
        self.pool.shutdown()
