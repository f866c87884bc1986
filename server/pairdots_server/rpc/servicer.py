"""PairdotsService handlers: convert the request, delegate to the service, convert back."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import grpc
from google.longrunning import operations_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server.errors import CancelToken, InvalidArgument, Unavailable
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.rpc import batch, convert, convert_jobs, job_results
from pairdots_server.rpc.operations import record_to_operation
from pairdots_server.service.facade import PairdotsService
from pairdots_server.service.jobs.batch_jobs import KIND as BATCH_KIND
from pairdots_server.service.jobs.batch_jobs import explain_batch_job
from pairdots_server.service.jobs.perturb_jobs import JobEnv, attack_job, repair_job
from pairdots_server.service.jobs.runner import JobRunner


def cancel_token(context: grpc.aio.ServicerContext) -> CancelToken:
    """A token whose deadline is the call's deadline (checked between batches/iterations)."""
    remaining = context.time_remaining()
    deadline = None if remaining is None else time.monotonic() + max(remaining, 0.0)
    return CancelToken(deadline=deadline)


MAX_REQUEST_ID_CHARS = 128


def idempotency(
    request: pb.AttackRequest | pb.RepairRequest | pb.ExplainBatchRequest,
) -> tuple[str, str]:
    """(request_id, fingerprint) of an Attack/Repair request (AIP-155): the fingerprint is a
    digest of the request without its id, so a retry matches and a different request does not."""
    rid = request.request_id
    if rid and (len(rid) > MAX_REQUEST_ID_CHARS
                or not all(33 <= ord(c) < 127 for c in rid)):
        raise InvalidArgument.for_field(
            "request_id", f"must be at most {MAX_REQUEST_ID_CHARS} printable ASCII characters "
            "without spaces (a UUID4 is recommended), got "
            f"{len(rid)} characters")
    bare: Any = type(request)()
    bare.CopyFrom(request)
    bare.request_id = ""
    return rid, hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def queued_metadata(kind: str, model: str) -> tuple[str, bytes]:
    """The JobMetadata of a just-created operation (stage "queued")."""
    now = job_results.timestamp(time.time())
    meta = pb.JobMetadata(kind=kind, model=model, stage="queued", create_time=now,
                          update_time=now)
    return job_results.METADATA_TYPE, meta.SerializeToString()


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
            encoding=job_results.ENCODING,
        )

    def _submit(self, kind: str, request: Any, to_query: Callable[..., Any],
                to_job: Callable[..., Any]) -> operations_pb2.Operation:
        """Attack / Repair: convert the request (to_query), build the job (to_job) and submit
        it as an operation of `kind`."""
        runtime = self.service.registry.get(request.model)
        cfg = self.service.config
        query, retrain = to_query(
            request, len(runtime.bundle.labels), cfg.jobs, cfg.explain, cfg.output_root
        )
        rid, fingerprint = idempotency(request)
        fn = to_job(runtime, query, retrain, self._job_env(runtime))
        record = self._jobs().submit(
            kind, request.DESCRIPTOR.full_name, request.SerializeToString(), fn,
            request_id=rid, fingerprint=fingerprint,
            metadata=queued_metadata(kind, runtime.name),
        )
        return record_to_operation(record)

    async def Attack(self, request: pb.AttackRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        return self._submit("attack", request, convert_jobs.attack_query, attack_job)

    async def Repair(self, request: pb.RepairRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        return self._submit("repair", request, convert_jobs.repair_query, repair_job)

    async def ExplainBatch(self, request: pb.ExplainBatchRequest,
                           context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        runtime = self.service.registry.get(request.model)
        cfg = self.service.config
        rid, fingerprint = idempotency(request)
        # reading an input file and validating 10k inputs is blocking work: off the event loop
        items = await asyncio.to_thread(batch.batch_items, request, runtime, cfg)
        fn = explain_batch_job(runtime, items, cfg.batch_results_path,
                               self._job_env(runtime), batch.ENCODING)
        record = self._jobs().submit(
            BATCH_KIND, request.DESCRIPTOR.full_name, request.SerializeToString(), fn,
            request_id=rid, fingerprint=fingerprint,
            metadata=queued_metadata(BATCH_KIND, runtime.name),
        )
        return record_to_operation(record)

    async def ListExplainBatchResults(
        self, request: pb.ListExplainBatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExplainBatchResultsResponse:
        return batch.list_results(request, self._jobs().store,
                                  self.service.config.batch_results_path)
