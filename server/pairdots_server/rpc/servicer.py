"""PairdotsService handlers: convert the request, delegate to the service, convert back."""

from __future__ import annotations

import asyncio
import hashlib
import time
from typing import Any

import grpc
from google.longrunning import operations_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server.errors import CancelToken, InvalidArgument, Unavailable
from pairdots_server.rpc import batch, convert, job_results, paging
from pairdots_server.rpc.job_kinds import build_job
from pairdots_server.rpc.operations import record_to_operation
from pairdots_server.service.facade import PairdotsService
from pairdots_server.service.jobs.batch_jobs import KIND as BATCH_KIND
from pairdots_server.service.jobs.runner import JobService


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
    now = time.time()
    meta = job_results.metadata_proto(kind, model, "queued", 0, 0, now, now)
    return job_results.METADATA_TYPE, meta.SerializeToString()


class PairdotsServicer(pb_grpc.PairdotsServiceServicer):
    def __init__(self, service: PairdotsService) -> None:
        self.service = service

    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
                         ) -> pb.ListModelsResponse:
        runtimes = {rt.name: rt for rt in self.service.registry.all()}
        names, next_token = paging.paginate(list(runtimes), request.page_size, request.page_token)
        return pb.ListModelsResponse(
            models=[convert.model_proto(runtimes[n]) for n in names], next_page_token=next_token
        )

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext
                       ) -> pb.Model:
        """AIP-131: the Model resource itself."""
        return convert.model_proto(self.service.registry.get(request.name, "name"))

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ExplainResponse:
        query = convert.explain_query(request, self.service.config.explain)
        runtime = self.service.registry.get(request.model)
        answer = await self.service.explain_on(runtime, query, cancel_token(context))
        return convert.explain_response(runtime, answer)

    # -- long-running operations (paper §4.2–4.3) ---------------------------------------------

    def _jobs(self) -> JobService:
        if self.service.jobs is None:
            raise Unavailable("this server runs no job runner; Attack and Repair are off")
        return self.service.jobs

    def _submit(self, kind: str, request: Any) -> operations_pb2.Operation:
        """Attack / Repair: validate the request and build its job (rpc/job_kinds.py), then
        submit it as an operation of `kind` (run here, or queued for the workers)."""
        jobs = self._jobs()
        runtime, fn = build_job(kind, request, self.service.config, self.service.registry)
        rid, fingerprint = idempotency(request)
        record = jobs.submit(
            kind, request.DESCRIPTOR.full_name, request.SerializeToString(), fn,
            request_id=rid, fingerprint=fingerprint,
            metadata=queued_metadata(kind, runtime.name),
        )
        return record_to_operation(record)

    async def Attack(self, request: pb.AttackRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        return self._submit("attack", request)

    async def Repair(self, request: pb.RepairRequest, context: grpc.aio.ServicerContext
                     ) -> operations_pb2.Operation:
        return self._submit("repair", request)

    async def ExplainBatch(self, request: pb.ExplainBatchRequest,
                           context: grpc.aio.ServicerContext) -> operations_pb2.Operation:
        # reading an input file and validating 10k inputs is blocking work: off the event loop
        return await asyncio.to_thread(self._submit, BATCH_KIND, request)

    async def ListExplainBatchResults(
        self, request: pb.ListExplainBatchResultsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExplainBatchResultsResponse:
        return batch.list_results(request, self._jobs().store,
                                  self.service.config.batch_results_path)
