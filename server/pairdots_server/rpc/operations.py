"""The standard google.longrunning.Operations service over the JobStore / JobRunner.

Conversion (JobRecord → google.longrunning.Operation):
  name     = record.name ("operations/<kind>-<hex>")
  metadata = Any(type_url=record.metadata_type_url, value=record.metadata): a JobMetadata
             from creation on (stage "queued"); an interrupted operation's says stage
             "interrupted" with update_time = when that was recorded
  done     = state in {SUCCEEDED, FAILED, CANCELLED}
  response = Any(type_url=record.result_type_url, value=record.result) when SUCCEEDED
  error    = google.rpc.Status(code, message,
             details=[ErrorInfo(reason, domain="pairdots.dev", metadata={"operation": name})])
             when FAILED or CANCELLED (code 1, AIP-151)

ListOperations `filter` grammar (AIP-160 subset)::

    filter := "" | term { "AND" term }
    term   := key "=" value          (spaces around "=" allowed; value may be "quoted")
    key    := "kind"   value: a job kind, e.g. attack, repair
            | "state"  value: PENDING | RUNNING | SUCCEEDED | FAILED | CANCELLED (any case)
            | "done"   value: true | false

Each key at most once; anything else is INVALID_ARGUMENT. `page_size` 0 means 50, larger than
500 is clamped to 500. `page_token` must come from the previous response with the same filter.

WaitOperation waits up to `timeout` (unset: 60 s; at most 60 s, and never past the RPC's own
deadline) without blocking the event loop, then returns the latest state, done or not.
CancelOperation on a finished operation is a successful no-op (AIP-151). DeleteOperation only
removes finished operations (FAILED_PRECONDITION otherwise: cancel first).
Store reads are short SQLite / PostgreSQL transactions and run on the event loop thread. With
a shared store (PostgreSQL) every replica answers for every operation: the poll of
WaitOperation sees changes written by the workers and the other replicas.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, NoReturn

import grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import any_pb2, empty_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server import errors
from pairdots_server.rpc.status import DOMAIN, to_status
from pairdots_server.service.jobs.runner import Code, JobService
from pairdots_server.service.jobs.store import INTERRUPTED_REASON, JobRecord, JobState, JobStore

JOB_METADATA_TYPE = "type.googleapis.com/" + pb.JobMetadata.DESCRIPTOR.full_name

DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 60.0
_DEADLINE_MARGIN_S = 0.2
_POLL_S = 1.0

_TERM_RE = re.compile(r'^\s*(\w+)\s*=\s*(?:"([^"]*)"|([A-Za-z0-9_]+))\s*$')
_AND_RE = re.compile(r"\s+AND\s+")
_PARENTS = ("", "operations", "operations/")
MAX_NAME_CHARS = 256  # operation names are "operations/<kind>-<hex>", far shorter
MAX_FILTER_CHARS = 1024


def _clip(text: str, limit: int = 80) -> str:
    """User input as echoed in an error message: never more than `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def check_name(name: str) -> str:
    """An operation name from a request: empty → INVALID_ARGUMENT; a name no operation can
    have (too long, not under operations/) → NOT_FOUND without echoing it whole."""
    if not name:
        raise errors.InvalidArgument.for_field(
            "name", "required: the operation's name ('operations/...') as Attack or Repair "
            "returned it")
    if len(name) > MAX_NAME_CHARS or not name.startswith("operations/"):
        raise errors.NotFound(
            f"operation {_clip(name)!r} does not exist: operation names look like "
            "'operations/attack-<hex>'; list them with ListOperations")
    return name


def _error_info(reason: str, name: str | None = None) -> any_pb2.Any:
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN)
    if name:
        info.metadata["operation"] = name
    packed = any_pb2.Any()
    packed.Pack(info)
    return packed


def _interrupted_metadata(record: JobRecord) -> bytes | None:
    """JobMetadata of an interrupted operation: stage "interrupted", update_time = when the
    interruption was recorded (not the last progress report before the crash)."""
    if record.metadata_type_url != JOB_METADATA_TYPE or record.metadata is None:
        return record.metadata
    meta = pb.JobMetadata()
    try:
        meta.ParseFromString(record.metadata)
    except Exception:  # noqa: BLE001 (not ours to fix; show what was stored)
        return record.metadata
    meta.stage = "interrupted"
    meta.update_time.FromNanoseconds(int(record.updated_at * 1e9))
    return meta.SerializeToString()


def record_to_operation(record: JobRecord) -> operations_pb2.Operation:
    """Convert a stored record to the wire Operation (see the module docstring)."""
    op = operations_pb2.Operation(name=record.name, done=record.done)
    if record.metadata_type_url is not None and record.metadata is not None:
        op.metadata.type_url = record.metadata_type_url
        op.metadata.value = (_interrupted_metadata(record)
                             if record.error_reason == INTERRUPTED_REASON else record.metadata)
    if record.state is JobState.SUCCEEDED:
        op.response.type_url = record.result_type_url or ""
        op.response.value = record.result or b""
    elif record.state in (JobState.FAILED, JobState.CANCELLED):
        op.error.code = record.error_code if record.error_code is not None else Code.INTERNAL
        op.error.message = record.error_message or ""
        op.error.details.append(_error_info(record.error_reason or "UNKNOWN", record.name))
    return op


def parse_filter(text: str) -> tuple[str | None, set[JobState] | None]:
    """Parse a ListOperations filter into (kind, states); see the grammar above.
    `states` None means any state; an empty set means nothing matches."""
    kind: str | None = None
    states: set[JobState] | None = None
    seen: set[str] = set()
    if not text.strip():
        return kind, states
    if len(text) > MAX_FILTER_CHARS:
        raise errors.InvalidArgument.for_field(
            "filter", f"is {len(text)} characters; at most {MAX_FILTER_CHARS} are accepted "
            "(filter on kind, state or done)")
    allowed_states = ", ".join(s.value for s in JobState)
    for term in _AND_RE.split(text.strip()):
        m = _TERM_RE.match(term)
        if m is None:
            raise errors.InvalidArgument.for_field(
                "filter", f"cannot parse {_clip(term)!r}; write key=value terms joined by AND, e.g. "
                "'kind=attack AND state=RUNNING' (keys: kind, state, done)")
        key, value = m.group(1), m.group(2) if m.group(2) is not None else m.group(3)
        key = _clip(key)
        if key in seen:
            raise errors.InvalidArgument.for_field("filter", f"{key} given twice; use it once")
        seen.add(key)
        if key == "kind":
            kind = value
        elif key == "state":
            try:
                wanted = {JobState(value.upper())}
            except ValueError:
                raise errors.InvalidArgument.for_field(
                    "filter", f"state {_clip(value)!r} is unknown; use one of {allowed_states}") from None
            states = wanted if states is None else states & wanted
        elif key == "done":
            if value.lower() not in ("true", "false"):
                raise errors.InvalidArgument.for_field(
                    "filter", f"done={_clip(value)!r}; use done=true or done=false")
            flag = value.lower() == "true"
            wanted = {s for s in JobState if s.done == flag}
            states = wanted if states is None else states & wanted
        else:
            raise errors.InvalidArgument.for_field(
                "filter", f"unknown key {key!r}; filter on kind, state or done")
    return kind, states


async def abort_with_error(context: grpc.aio.ServicerContext[Any, Any],
                           exc: errors.PairdotsError) -> NoReturn:
    """Abort the RPC with the status code of `exc` (the one table, errors.CODES), its message,
    and a google.rpc.Status in the `grpc-status-details-bin` trailer (ErrorInfo; BadRequest /
    RetryInfo when present): the same status the ErrorInterceptor gives (rpc/status.py)."""
    await context.abort_with_status(rpc_status.to_status(to_status(exc)))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


class OperationsServicer(operations_pb2_grpc.OperationsServicer):  # type: ignore[misc]
    """Async implementation of google.longrunning.Operations for grpc.aio servers."""

    def __init__(self, store: JobStore, runner: JobService, *, default_wait_s: float = DEFAULT_WAIT_S,
                 max_wait_s: float = MAX_WAIT_S, poll_s: float = _POLL_S) -> None:
        if not 0 < default_wait_s <= max_wait_s:
            raise errors.InvalidArgument.for_field(
                "default_wait_s", f"is {default_wait_s}; it must be > 0 and <= max_wait_s "
                f"({max_wait_s})")
        self._store = store
        self._runner = runner
        self._default_wait_s = default_wait_s
        self._max_wait_s = max_wait_s
        self._poll_s = poll_s

    async def GetOperation(self, request: operations_pb2.GetOperationRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> operations_pb2.Operation:
        try:
            return record_to_operation(self._store.get(check_name(request.name)))
        except errors.PairdotsError as exc:
            await abort_with_error(context, exc)

    async def ListOperations(
        self, request: operations_pb2.ListOperationsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> operations_pb2.ListOperationsResponse:
        try:
            if request.name not in _PARENTS:
                raise errors.InvalidArgument.for_field(
                    "name", f"{_clip(request.name)!r} is not a collection here; leave it empty or "
                    "use 'operations'")
            kind, states = parse_filter(request.filter)
            if states is not None and not states:
                return operations_pb2.ListOperationsResponse()
            records, token = self._store.list(
                kind_filter=kind, state_filter=states, page_size=request.page_size,
                page_token=request.page_token)
        except errors.PairdotsError as exc:
            await abort_with_error(context, exc)
        return operations_pb2.ListOperationsResponse(
            operations=[record_to_operation(r) for r in records], next_page_token=token)

    async def DeleteOperation(self, request: operations_pb2.DeleteOperationRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        try:
            self._store.delete(check_name(request.name))
        except errors.PairdotsError as exc:
            await abort_with_error(context, exc)
        return empty_pb2.Empty()

    async def CancelOperation(self, request: operations_pb2.CancelOperationRequest,
                              context: grpc.aio.ServicerContext[Any, Any]) -> empty_pb2.Empty:
        try:
            self._runner.cancel(check_name(request.name))
        except errors.PairdotsError as exc:
            await abort_with_error(context, exc)
        return empty_pb2.Empty()

    async def WaitOperation(self, request: operations_pb2.WaitOperationRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> operations_pb2.Operation:
        try:
            return await self._wait(request, context)
        except errors.PairdotsError as exc:
            await abort_with_error(context, exc)

    async def _wait(self, request: operations_pb2.WaitOperationRequest,
                    context: grpc.aio.ServicerContext[Any, Any]) -> operations_pb2.Operation:
        if request.HasField("timeout"):
            timeout = request.timeout.ToNanoseconds() / 1e9
            if timeout < 0:
                raise errors.InvalidArgument.for_field("timeout", "must not be negative")
            timeout = min(timeout, self._max_wait_s)
        else:
            timeout = self._default_wait_s
        rpc_left = context.time_remaining()
        if rpc_left is not None:
            timeout = max(0.0, min(timeout, rpc_left - _DEADLINE_MARGIN_S))

        loop = asyncio.get_running_loop()
        changed = asyncio.Event()
        name = check_name(request.name)

        def on_change(changed_name: str) -> None:  # called from worker threads
            if changed_name == name:
                loop.call_soon_threadsafe(changed.set)

        self._runner.add_listener(on_change)
        try:
            deadline = loop.time() + timeout
            while True:
                changed.clear()
                record = self._store.get(name)
                remaining = deadline - loop.time()
                if record.done or remaining <= 0:
                    return record_to_operation(record)
                try:  # the poll also catches changes made outside this runner
                    await asyncio.wait_for(changed.wait(), min(remaining, self._poll_s))
                except asyncio.TimeoutError:
                    pass
        finally:
            self._runner.remove_listener(on_change)


def add_operations_servicer(server: grpc.aio.Server, store: JobStore,
                            runner: JobService) -> OperationsServicer:
    """Register the Operations service on `server`; returns the servicer."""
    servicer = OperationsServicer(store, runner)
    operations_pb2_grpc.add_OperationsServicer_to_server(servicer, server)
    return servicer
