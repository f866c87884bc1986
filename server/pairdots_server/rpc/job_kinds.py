"""The job kinds that an operation can be, and how each is built from its request — once when a
replica accepts it (validation: INVALID_ARGUMENT / ALREADY_EXISTS / FAILED_PRECONDITION at
submit time) and again when a `pairdots worker` claims it from the shared store (the stored
request bytes are all a worker gets).

JOB_KINDS maps a kind ("attack", "repair", "explain_batch") to its request message and its
builder: validation (rpc/convert_jobs, rpc/batch: request → domain query) and the job function
(service/jobs/perturb_jobs, service/jobs/batch_jobs). A new job kind that workers can run is
one JobKind entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError, Message

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.config import ServerConfig
from pairdots_server.errors import InvalidArgument
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.model.retrain import check_supported
from pairdots_server.rpc import batch, convert_jobs, job_results
from pairdots_server.service.jobs.batch_jobs import KIND as BATCH_KIND
from pairdots_server.service.jobs.batch_jobs import explain_batch_job
from pairdots_server.service.jobs.perturb_jobs import JobEnv, attack_job, repair_job
from pairdots_server.service.jobs.runner import JobBuilder, JobFn
from pairdots_server.service.jobs.store import JobRecord
from pairdots_server.service.registry import ModelRegistry

Builder = Callable[[Any, ModelRuntime, ServerConfig], JobFn]


@dataclass(frozen=True)
class JobKind:
    """One kind of operation: `build(request, runtime, config)` validates the request against
    the served model and the configuration and returns the job function."""

    name: str
    request: type[Message]
    build: Builder


def job_env(config: ServerConfig, rt: ModelRuntime) -> JobEnv:
    """What a job needs from the server configuration for model `rt`."""
    return JobEnv(
        default_candidates=config.explain.default_candidates(rt.n_train),
        scoring_batch_size=config.explain.scoring_batch_size,
        output_root=config.output_root,
        encoding=job_results.ENCODING,
    )


def _perturb_builder(to_query: Callable[..., Any], to_job: Callable[..., JobFn]) -> Builder:
    """Attack / Repair: `to_query(request, n_labels, job limits, explain limits, output_root)`
    validates, `to_job(runtime, query, retrain, env)` builds the job function."""

    def build(request: Any, runtime: ModelRuntime, config: ServerConfig) -> JobFn:
        query, retrain = to_query(
            request, len(runtime.bundle.labels), config.jobs, config.explain, config.output_root
        )
        check_supported(runtime, retrain)
        return to_job(runtime, query, retrain, job_env(config, runtime))

    return build


def _batch_builder(request: Any, runtime: ModelRuntime, config: ServerConfig) -> JobFn:
    """ExplainBatch: the inputs (inline or a file under --batch-input-root) validated, one
    JSON line per input into config.batch_results_path."""
    items = batch.batch_items(request, runtime, config)
    return explain_batch_job(runtime, items, config.batch_results_path,
                             job_env(config, runtime), batch.ENCODING)


JOB_KINDS: dict[str, JobKind] = {
    "attack": JobKind("attack", pb.AttackRequest,
                      _perturb_builder(convert_jobs.attack_query, attack_job)),
    "repair": JobKind("repair", pb.RepairRequest,
                      _perturb_builder(convert_jobs.repair_query, repair_job)),
    BATCH_KIND: JobKind(BATCH_KIND, pb.ExplainBatchRequest, _batch_builder),
}


def build_job(
    kind: str, request: Any, config: ServerConfig, registry: ModelRegistry
) -> tuple[ModelRuntime, JobFn]:
    """Validate `request` (a JOB_KINDS[kind].request message) against the served model and
    the configuration, and build its job function. Raises the request's errors (NotFound for
    an unknown model, InvalidArgument, AlreadyExists / FailedPrecondition for save_as)."""
    runtime = registry.get(request.model)
    return runtime, JOB_KINDS[kind].build(request, runtime, config)


def record_builder(config: ServerConfig, registry: ModelRegistry) -> JobBuilder:
    """The JobBuilder of a worker: rebuild a claimed operation's job from its stored request
    (validated again here: this worker's models and --output-bundles are what counts)."""

    def build(record: JobRecord) -> JobFn:
        spec = JOB_KINDS.get(record.kind)
        if spec is None or record.request_type != spec.request.DESCRIPTOR.full_name:
            raise InvalidArgument(
                f"operation {record.name} is a {record.kind!r} job with a "
                f"{record.request_type} request, which this worker cannot run; run a worker "
                "of the pairdots version that accepted it"
            )
        request = spec.request()
        try:
            request.ParseFromString(record.request)
        except DecodeError as exc:
            raise InvalidArgument(
                f"operation {record.name}: the stored request cannot be parsed ({exc})"
            ) from exc
        return build_job(record.kind, request, config, registry)[1]

    return build
