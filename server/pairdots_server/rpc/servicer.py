"""PairdotsService handlers: convert the request, delegate to the service, convert back."""

from __future__ import annotations

import time

import grpc

from pairdots.v1 import pairdots_pb2 as pb
from pairdots.v1 import pairdots_pb2_grpc as pb_grpc
from pairdots_server.errors import CancelToken
from pairdots_server.rpc import convert
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
        return pb.GetModelResponse(model=convert.model_proto(self.service.registry.get(request.name)))

    async def Explain(self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
                      ) -> pb.ExplainResponse:
        query = convert.explain_query(request, self.service.config.explain)
        runtime = self.service.registry.get(request.model)
        answer = await self.service.explain(request.model, query, cancel_token(context))
        return convert.explain_response(runtime, answer)
