"""ExplainBatch over RPC: the request's inputs (inline or a file under the server's batch input
root) → validated batch items, the job's encoding (answers in protobuf's JSON mapping,
ExplainBatchResult), and the pages of ListExplainBatchResults read back from the results file.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.rpc import code_pb2

from pairdots.v1 import pairdots_pb2 as pb
from pairdots_server.config import ServerConfig
from pairdots_server.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from pairdots_server.influence.explain import ExplainAnswer
from pairdots_server.influence.runtime import ModelRuntime
from pairdots_server.rpc import convert
from pairdots_server.rpc.job_results import TYPE_PREFIX
from pairdots_server.service.jobs.batch_jobs import (
    KIND,
    BatchEncoding,
    BatchItem,
    BatchSummary,
    results_path,
)
from pairdots_server.service.jobs.store import JobStore
from pairdots_server.storage.inputs import TextInput, read_text_inputs

RESULT_TYPE = TYPE_PREFIX + pb.ExplainBatchResult.DESCRIPTOR.full_name
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def _input_file(
    req: pb.ExplainBatchRequest, rt: ModelRuntime, cfg: ServerConfig
) -> list[TextInput]:
    root = cfg.batch_input_root
    if root is None:
        raise FailedPrecondition(
            "this server reads no input files (it was started without --batch-input-root); "
            "send the inputs inline in ExplainBatchRequest.inputs"
        )
    base = root.resolve()
    path = (base / req.input_path).resolve()
    if not path.is_relative_to(base):
        raise InvalidArgument.for_field(
            "input_path",
            f"{req.input_path[:200]!r} is outside the server's batch input "
            "root; pass a path under it (relative paths are taken relative to it)",
        )
    try:
        return read_text_inputs(
            path,
            text_column=req.text_column or "text",
            label_column=req.label_column,
            id_column=req.id_column,
            label_names=rt.bundle.labels,
            limit=cfg.jobs.max_batch_inputs,
        )
    except NotFound:
        raise NotFound(
            f"input_path {req.input_path[:200]!r} does not exist under the server's batch "
            "input root"
        ) from None


def batch_items(
    req: pb.ExplainBatchRequest, rt: ModelRuntime, cfg: ServerConfig
) -> list[BatchItem]:
    """Validate every input with the Explain rules (one InvalidArgument listing each bad
    field as inputs[i].<field>) and return the items in input order."""
    limit = cfg.jobs.max_batch_inputs
    if bool(req.inputs) == bool(req.input_path):
        raise InvalidArgument.for_field(
            "inputs", "set exactly one of inputs (inline) and input_path (a file on the server)"
        )
    if len(req.inputs) > limit:
        raise InvalidArgument.for_field(
            "inputs", f"{len(req.inputs)} inputs; at most {limit} per batch (split them)"
        )
    if req.input_path:
        inputs = _input_file(req, rt, cfg)
        prefix = "input_path row"
    else:
        inputs = [
            TextInput(i.text, i.gold_label if i.HasField("gold_label") else None, i.id or str(n))
            for n, i in enumerate(req.inputs)
        ]
        prefix = "inputs"
    items: list[BatchItem] = []
    violations: list[FieldViolation] = []
    for n, item in enumerate(inputs):
        one = pb.ExplainRequest(
            model=req.model,
            text=item.text,
            gold_label=item.gold_label,
            examples_per_word=req.examples_per_word,
            top_words=req.top_words if req.HasField("top_words") else None,
        )
        one.saliency.CopyFrom(req.saliency)
        one.influence.CopyFrom(req.influence)
        try:
            query = convert.explain_query(one, cfg.explain)
        except InvalidArgument as exc:
            for fv in exc.violations:
                field = (
                    fv.field
                    if fv.field not in ("text", "gold_label")
                    else f"{prefix}[{n}].{fv.field}"
                )
                violations.append(FieldViolation(field, fv.description))
            if len(violations) >= 20:
                break
            continue
        if item.gold_label is not None and item.gold_label >= len(rt.bundle.labels):
            violations.append(
                FieldViolation(
                    f"{prefix}[{n}].gold_label",
                    f"{item.gold_label} is not a label of the model; "
                    f"valid: 0..{len(rt.bundle.labels) - 1}",
                )
            )
            continue
        items.append(BatchItem(n, item.id, query))
    if violations:
        unique = list({(v.field, v.description): v for v in violations}.values())
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in unique[:5]), violations=unique
        )
    return items


def _answer_json(rt: ModelRuntime, answer: ExplainAnswer) -> dict[str, Any]:
    msg = convert.explain_response(rt, answer)
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _result(s: BatchSummary) -> tuple[str, bytes]:
    result = pb.ExplainBatchResult(
        input_count=s.input_count,
        succeeded_count=s.succeeded,
        failed_count=s.failed,
        results_path=str(s.results_path),
        duration=convert.duration(s.seconds),
        inputs_per_second=(s.input_count / s.seconds) if s.seconds > 0 else 0.0,
    )
    return RESULT_TYPE, result.SerializeToString()


ENCODING = BatchEncoding(answer=_answer_json, result=_result)


def _page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"batch:{offset}".encode()).decode()


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode()).decode()
        kind, _, value = text.partition(":")
        if kind != "batch" or int(value) < 0:
            raise ValueError(text)
        return int(value)
    except (ValueError, UnicodeDecodeError):
        raise InvalidArgument.for_field(
            "page_token",
            "is not a token from a previous ListExplainBatchResults page; "
            "pass next_page_token unchanged, or empty for the first page",
        ) from None


def list_results(
    req: pb.ListExplainBatchResultsRequest, store: JobStore, results_dir: Path
) -> pb.ListExplainBatchResultsResponse:
    """One page of results, read from the operation's JSON-lines file."""
    if not req.operation:
        raise InvalidArgument.for_field("operation", "name the ExplainBatch operation")
    if not 0 <= req.page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument.for_field(
            "page_size",
            f"must be in 0..{MAX_PAGE_SIZE} (0: {DEFAULT_PAGE_SIZE}), got {req.page_size}",
        )
    start = _offset(req.page_token)
    record = store.get(req.operation)  # NotFound for an unknown operation
    if record.kind != KIND:
        raise InvalidArgument.for_field(
            "operation", f"{req.operation} is a {record.kind} operation, not an ExplainBatch"
        )
    size = req.page_size or DEFAULT_PAGE_SIZE
    path = results_path(results_dir, req.operation)
    lines: list[str] = []
    if path.is_file():
        with path.open("r", encoding="utf-8") as f:
            lines = [ln for ln in f if ln.endswith("\n")]  # a half-written last line waits
    page = lines[start : start + size]
    resp = pb.ListExplainBatchResultsResponse(total_size=len(lines), done=record.done)
    for line in page:
        obj = json.loads(line)
        item = pb.ExplainBatchItem(index=int(obj["index"]), id=str(obj.get("id", "")))
        if "response" in obj:
            json_format.ParseDict(obj["response"], item.response)
        else:
            name = str(obj["error"]["code"])  # a google.rpc.Code name
            item.error_code = dict(code_pb2.Code.items()).get(name, code_pb2.UNKNOWN)
            item.error_message = str(obj["error"]["message"])
        resp.items.append(item)
    end = start + len(page)
    if end < len(lines) or not record.done:  # more written, or more to come: go on from here
        resp.next_page_token = _page_token(end)
    return resp
