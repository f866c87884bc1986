"""The row ↔ JobRecord mapping, the job states and the page tokens of ListOperations
(store.py runs the queries; the schema and its migrations are in migrations.py)."""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass
from typing import Any

from pairdots_server.errors import Code, InvalidArgument
from pairdots_server.service.jobs.migrations import SCHEMA_VERSION  # noqa: F401 (re-exported)

#: google.rpc.Code values (errors.Code: ints, no gRPC import).
CODE_CANCELLED = Code.CANCELLED
CODE_ABORTED = Code.ABORTED

INTERRUPTED_REASON = "INTERRUPTED"
INTERRUPTED_MESSAGE = "the server stopped while this job ran; submit it again"
#: the message of a job whose lease passed: {owner} stopped renewing it at {expired}
LEASE_EXPIRED_MESSAGE = (
    "the process running this job ({owner}) stopped renewing its lease (expired {expired}, "
    "{lease:.0f} s after its last heartbeat): it was killed or lost the job store; submit it "
    "again"
)
CANCELLED_REASON = "CANCELLED"
CANCELLED_MESSAGE = "cancelled by the caller (CancelOperation)"

KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_TOKEN_PREFIX = "v1"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


class JobState(str, enum.Enum):
    """Lifecycle state of one operation."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def done(self) -> bool:
        """True for the terminal states (Operation.done)."""
        return self in _TERMINAL


_TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
ACTIVE = (JobState.PENDING.value, JobState.RUNNING.value)


@dataclass(frozen=True)
class JobRecord:
    """A snapshot of one operation row. Timestamps are Unix seconds (time.time())."""

    name: str
    kind: str
    state: JobState
    created_at: float
    updated_at: float
    request_type: str
    request: bytes
    metadata_type_url: str | None = None
    metadata: bytes | None = None
    result_type_url: str | None = None
    result: bytes | None = None
    error_code: int | None = None
    error_message: str | None = None
    error_reason: str | None = None
    #: who runs the job (a runner or worker id) or holds it queued; None: queued for any worker
    owner: str | None = None
    #: Unix seconds until which `owner` holds the job; None: no lease (queued or finished)
    lease_until: float | None = None

    @property
    def done(self) -> bool:
        """True once the operation reached SUCCEEDED, FAILED or CANCELLED."""
        return self.state.done


COLUMNS = (
    "name, kind, state, created_at, updated_at, request_type, request, metadata_type_url, "
    "metadata, result_type_url, result, error_code, error_message, error_reason, owner, lease_until"
)

def row_to_record(row: tuple[Any, ...]) -> JobRecord:
    (name, kind, state, created, updated, req_type, req, md_url, md, res_url, res, code, msg,
     reason, owner, lease_until) = tuple(row)
    return JobRecord(
        name=name,
        kind=kind,
        state=JobState(state),
        created_at=created,
        updated_at=updated,
        request_type=req_type,
        request=bytes(req),
        metadata_type_url=md_url,
        metadata=None if md is None else bytes(md),
        result_type_url=res_url,
        result=None if res is None else bytes(res),
        error_code=code,
        error_message=msg,
        error_reason=reason,
        owner=owner,
        lease_until=lease_until,
    )


def encode_token(before_seq: int, kinds: str, states: str) -> str:
    raw = f"{_TOKEN_PREFIX}|{before_seq}|{kinds}|{states}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_token(token: str, kinds: str, states: str) -> int:
    """Return the `seq` bound encoded in `token`; InvalidArgument if malformed or if it was
    issued for a different filter (AIP-158)."""
    bad = InvalidArgument.for_field(
        "page_token",
        "not a token this server issued for this filter; pass the next_page_token of the "
        "previous ListOperations response unchanged, with the same filter, or leave it empty",
    )
    try:
        padded = token + "=" * (-len(token) % 4)
        prefix, seq_s, tok_kinds, tok_states = (
            base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8").split("|")
        )
        seq = int(seq_s)
    except (ValueError, UnicodeError, binascii.Error):
        raise bad from None
    if prefix != _TOKEN_PREFIX or seq < 0 or tok_kinds != kinds or tok_states != states:
        raise bad
    return seq
