"""PairdotsService handlers: convert the request, delegate to the service, convert back."""

from __future__ import annotations

import time

import grpc
from google.longrunning import operations_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server.errors import CancelToken, Unavailable
from pairdots_server.jobs.perturb_jobs import JobEnv, attack_job, repair_job
from pairdots_server.jobs.runner import JobRunner
from pairdots_server.rpc import convert, convert_jobs
from pairdots_server.rpc.operations import record_to_operation
from pairdots_server.runtime import ModelRuntime
from pairdots_server.service import PairdotsService


def cancel_token(context: grpc.aio.ServicerContext) -> CancelToken:
    """A token whose deadline is the call's deadline (checked between batches/iterations)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + max(remaining, 0.0)
    return CancelToken(deadline=deadline)


class PairdotsServicer(pb_grpc.PairdotsServiceServicer):
    def __init__(self, service: PairdotsService) -> None:
        self.service = service

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[convert.model_proto(rt) for rt in self.service.registry.all()]
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
                       ) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=convert.model_proto(self.service.registry.get(request.name, "name")))

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ExplainResponse:
        query = convert.explain_query(request, self.service.config.explain)
        runtime = self.service.registry.get(request.model)
        answer = await self.service.explain(request.model, query, cancel_token(context))
        return convert.explain_response(runtime, answer)

    # -- long-running operations (paper §4.2–4.3) ---------------------------------------------

    def _jobs(self) -> JobRunner:
        if self.service.jobs is None:
            raise Unavailable("this server runs no job runner; Attack and Repair are off")
        return self.service.jobs

    def _job_env(self, rt: ModelRuntime) -> JobEnv:
        cfg = self.service.config
        return JobEnv(
            default_candidates=cfg.explain.default_candidates(rt.n_train),
            scoring_batch_size=cfg.explain.scoring_batch_size,
            output_root=cfg.output_root,
        )

    async def Attack(self, request: pb.AttackRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        runtime = self.service.registry.get(request.model)
        cfg = self.service.config
        query, retrain = convert_jobs.attack_query(
            request, len(runtime.bundle.labels), cfg.jobs, cfg.explain, cfg.output_root
        )
        fn = attack_job(runtime, query, retrain, self._job_env(runtime))
        record = self._jobs().submit(
            "attack", pb.AttackRequest.DESCRIPTOR.full_name, request.SerializeToString(), fn
        )
        return record_to_operation(record)

    async def Repair(self, request: pb.RepairRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        runtime = self.service.registry.get(request.model)
        cfg = self.service.config
        query, retrain = convert_jobs.repair_query(
            request, len(runtime.bundle.labels), cfg.jobs, cfg.explain, cfg.output_root
        )
        fn = repair_job(runtime, query, retrain, self._job_env(runtime))
        record = self._jobs().submit(
            "repair", pb.RepairRequest.DESCRIPTOR.full_name, request.SerializeToString(), fn
        )
        return record_to_operation(record)
