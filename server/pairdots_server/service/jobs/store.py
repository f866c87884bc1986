"""Durable record of long-running operations (google.longrunning.Operation), kept in SQLite.

One row per operation. The store knows nothing about gRPC or about the payload protos: the
request, the progress metadata and the result are opaque bytes with their type name / type
URL, so the RPC layer can wrap them in `google.protobuf.Any` unchanged.

State machine (terminal states are sticky: the first terminal transition wins)::

    PENDING ──set_running──▶ RUNNING ──succeed──▶ SUCCEEDED
       │                        │
       └────────cancel / fail───┴──▶ CANCELLED / FAILED

A job left PENDING or RUNNING by a process that stopped is turned into FAILED with
reason "INTERRUPTED" by `mark_interrupted_on_startup()` (call it once when the server starts,
before any runner submits). The store is meant for a single serving process per file; several
readers (e.g. a CLI listing jobs) are fine thanks to WAL mode.

Thread safety: one connection shared under a lock; every method is a short transaction.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import enum
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pairdots_server.errors import (
    AlreadyExists,
    Code,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)

SCHEMA_VERSION = 1

#: google.rpc.Code values (errors.Code: ints, no gRPC import).
CODE_CANCELLED = Code.CANCELLED
CODE_ABORTED = Code.ABORTED

INTERRUPTED_REASON = "INTERRUPTED"
INTERRUPTED_MESSAGE = "the server stopped while this job ran; submit it again"
CANCELLED_REASON = "CANCELLED"
CANCELLED_MESSAGE = "cancelled by the caller (CancelOperation)"

_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
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
_ACTIVE = (JobState.PENDING.value, JobState.RUNNING.value)


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

    @property
    def done(self) -> bool:
        """True once the operation reached SUCCEEDED, FAILED or CANCELLED."""
        return self.state.done


_COLUMNS = (
    "name, kind, state, created_at, updated_at, request_type, request, metadata_type_url, "
    "metadata, result_type_url, result, error_code, error_message, error_reason"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operations (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    name              TEXT NOT NULL UNIQUE,
    kind              TEXT NOT NULL,
    state             TEXT NOT NULL,
    created_at        REAL NOT NULL,
    updated_at        REAL NOT NULL,
    request_type      TEXT NOT NULL,
    request           BLOB NOT NULL,
    metadata_type_url TEXT,
    metadata          BLOB,
    result_type_url   TEXT,
    result            BLOB,
    error_code        INTEGER,
    error_message     TEXT,
    error_reason      TEXT
);
CREATE INDEX IF NOT EXISTS operations_kind_seq ON operations (kind, seq);
CREATE INDEX IF NOT EXISTS operations_state_seq ON operations (state, seq);
"""


_REQUEST_IDS_SCHEMA = """
CREATE TABLE IF NOT EXISTS request_ids (
    request_id  TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    fingerprint TEXT NOT NULL
)
"""


def _row_to_record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
    (name, kind, state, created, updated, req_type, req, md_url, md, res_url, res, code, msg,
     reason) = tuple(row)
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
    )


def _encode_token(before_seq: int, kinds: str, states: str) -> str:
    raw = f"{_TOKEN_PREFIX}|{before_seq}|{kinds}|{states}".encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _decode_token(token: str, kinds: str, states: str) -> int:
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


class JobStore:
    """SQLite-backed table of operations.

    `path` is a file path (its parent directory is created) or ":memory:" for tests.
    Raises FailedPrecondition when the file is not a pairdots job store or was written by a
    newer schema version.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._closed = False
        try:
            self._conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(
                f"job store {self.path!r} cannot be opened as SQLite ({exc}); point the jobs "
                "store path at a new file or delete the damaged one"
            ) from exc

    # -- connection management -------------------------------------------------------------

    def _init_schema(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA busy_timeout = 10000")
        if self.path != ":memory:":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(
                f"job store {self.path!r} has schema version {version}, newer than this server "
                f"understands ({SCHEMA_VERSION}); run a newer pairdots or use another jobs path"
            )
        if version < SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            for stmt in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        # AIP-155 idempotency keys (an additive table: older servers ignore it)
        conn.execute(_REQUEST_IDS_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """Serialise access and run the body as one IMMEDIATE transaction."""
        with self._lock:
            if self._closed:
                raise FailedPrecondition("the job store is closed; the server is shutting down")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        """Close the connection (idempotent). Later calls raise FailedPrecondition."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    # -- reads ------------------------------------------------------------------------------

    @staticmethod
    def _get(conn: sqlite3.Connection, name: str) -> JobRecord:
        row = conn.execute(f"SELECT {_COLUMNS} FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            shown = name if len(name) <= 100 else name[:100] + f"... ({len(name)} characters)"
            raise NotFound(
                f"operation {shown!r} does not exist (it was never created or was deleted); "
                "list the existing ones with ListOperations"
            )
        return _row_to_record(row)

    def get(self, name: str) -> JobRecord:
        """The current record of `name`; NotFound if there is none."""
        with self._tx() as conn:
            return self._get(conn, name)

    def list(
        self,
        kind_filter: str | None = None,
        state_filter: JobState | Collection[JobState] | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[builtins.list[JobRecord], str]:
        """One page of operations, newest first, and the token of the next page ("" at the end).

        Order is by creation (an autoincrement sequence), so pages stay stable while new jobs
        are created. `state_filter` is one state or a set of states. `page_size` 0 means
        DEFAULT_PAGE_SIZE; larger than MAX_PAGE_SIZE is clamped; negative is InvalidArgument.
        """
        if page_size < 0:
            raise InvalidArgument.for_field("page_size", "must be >= 0 (0 means the default, 50)")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        if isinstance(state_filter, JobState):
            states: builtins.list[JobState] = [state_filter]
        else:
            states = sorted(set(state_filter or ()), key=lambda s: s.value)
        kinds_key = kind_filter or ""
        states_key = ",".join(s.value for s in states)
        before = _decode_token(page_token, kinds_key, states_key) if page_token else None

        where: builtins.list[str] = []
        args: builtins.list[object] = []
        if kind_filter is not None:
            where.append("kind = ?")
            args.append(kind_filter)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if before is not None:
            where.append("seq < ?")
            args.append(before)
        sql = f"SELECT seq, {_COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(size + 1)
        with self._tx() as conn:
            rows = conn.execute(sql, args).fetchall()
        page = rows[:size]
        records = [_row_to_record(r[1:]) for r in page]
        next_token = _encode_token(page[-1][0], kinds_key, states_key) if len(rows) > size else ""
        return records, next_token

    # -- writes -----------------------------------------------------------------------------

    def create(self, kind: str, request_type: str, request_bytes: bytes) -> JobRecord:
        """Insert a PENDING operation named "operations/<kind>-<uuid4 hex>".

        `kind` must be lowercase `[a-z][a-z0-9_]*` (at most 32 characters): it is used in
        names and in ListOperations filters.
        """
        if not _KIND_RE.match(kind):
            raise InvalidArgument.for_field(
                "kind", f"{kind!r} is not a job kind; use lowercase letters, digits and '_'"
            )
        name = f"operations/{kind}-{uuid.uuid4().hex}"
        now = time.time()
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO operations (name, kind, state, created_at, updated_at, "
                "request_type, request) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, kind, JobState.PENDING.value, now, now, request_type, bytes(request_bytes)),
            )
            return self._get(conn, name)

    def find_request(self, request_id: str, fingerprint: str) -> JobRecord | None:
        """The operation created for `request_id` (AIP-155), or None when there is none (never
        used, or its operation was deleted). AlreadyExists when the key was used for a
        different request (another `fingerprint`)."""
        with self._tx() as conn:
            row = conn.execute("SELECT name, fingerprint FROM request_ids WHERE request_id = ?",
                               (request_id,)).fetchone()
            if row is None:
                return None
            name, seen = row
            try:
                record = self._get(conn, name)
            except NotFound:
                conn.execute("DELETE FROM request_ids WHERE request_id = ?", (request_id,))
                return None
        if seen != fingerprint:
            raise AlreadyExists(
                f"request_id {request_id[:128]!r} was already used for a different request "
                f"(operation {name}); use a new request_id for a new request",
                reason="REQUEST_ID_REUSED")
        return record

    def remember_request(self, request_id: str, fingerprint: str, name: str) -> None:
        """Record that `request_id` created operation `name`."""
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO request_ids (request_id, name, fingerprint) "
                         "VALUES (?, ?, ?)", (request_id, name, fingerprint))

    def _transition(
        self, name: str, allowed_from: Collection[str], assignments: str, args: tuple[Any, ...]
    ) -> JobRecord:
        """Apply `assignments` if the row is in one of `allowed_from`; return the row after."""
        with self._tx() as conn:
            current = self._get(conn, name)
            if current.state.value in allowed_from:
                conn.execute(
                    f"UPDATE operations SET {assignments}, updated_at = ? WHERE name = ?",
                    (*args, time.time(), name),
                )
                return self._get(conn, name)
            return current

    def set_running(self, name: str) -> JobRecord:
        """PENDING → RUNNING. Returns the record after; if it was cancelled meanwhile, the
        returned state is not RUNNING and the caller must not start the work."""
        return self._transition(name, (JobState.PENDING.value,), "state = ?",
                                (JobState.RUNNING.value,))

    def update_metadata(self, name: str, type_url: str, data: bytes) -> JobRecord:
        """Replace the progress metadata (Operation.metadata) of an unfinished operation;
        a finished one is left unchanged."""
        return self._transition(name, _ACTIVE, "metadata_type_url = ?, metadata = ?",
                                (type_url, bytes(data)))

    def succeed(self, name: str, type_url: str, data: bytes) -> JobRecord:
        """→ SUCCEEDED with the result (Operation.response). No-op if already finished."""
        return self._transition(
            name, _ACTIVE, "state = ?, result_type_url = ?, result = ?",
            (JobState.SUCCEEDED.value, type_url, bytes(data)),
        )

    def fail(self, name: str, code: int, message: str, reason: str) -> JobRecord:
        """→ FAILED with a google.rpc.Code value, message and ErrorInfo reason.
        No-op if already finished."""
        return self._transition(
            name, _ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?",
            (JobState.FAILED.value, int(code), message, reason),
        )

    def interrupt(self, name: str, message: str = INTERRUPTED_MESSAGE) -> JobRecord:
        """→ FAILED with code ABORTED and reason INTERRUPTED (server stopping)."""
        return self.fail(name, CODE_ABORTED, message, INTERRUPTED_REASON)

    def cancel(self, name: str, message: str = CANCELLED_MESSAGE) -> JobRecord:
        """→ CANCELLED with code CANCELLED (AIP-151). No-op if already finished."""
        return self._transition(
            name, _ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?",
            (JobState.CANCELLED.value, CODE_CANCELLED, message, CANCELLED_REASON),
        )

    def delete(self, name: str) -> None:
        """Remove a finished operation. NotFound if unknown; FailedPrecondition if unfinished
        (deleting does not cancel: cancel it first)."""
        with self._tx() as conn:
            current = self._get(conn, name)
            if not current.done:
                raise FailedPrecondition(
                    f"operation {name!r} is still {current.state.value}; cancel it first "
                    "(CancelOperation) and delete it once it is done"
                )
            conn.execute("DELETE FROM operations WHERE name = ?", (name,))

    def mark_interrupted_on_startup(self) -> int:
        """Turn every PENDING/RUNNING row (left by a previous process) into FAILED with code
        ABORTED, reason INTERRUPTED. Returns how many rows changed."""
        with self._tx() as conn:
            cur = conn.execute(
                "UPDATE operations SET state = ?, error_code = ?, error_message = ?, "
                "error_reason = ?, updated_at = ? WHERE state IN (?, ?)",
                (JobState.FAILED.value, CODE_ABORTED, INTERRUPTED_MESSAGE, INTERRUPTED_REASON,
                 time.time(), *_ACTIVE),
            )
            return int(cur.rowcount)

    def count_active(self) -> int:
        """How many operations are PENDING or RUNNING."""
        with self._tx() as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM operations WHERE state IN (?, ?)", _ACTIVE
                ).fetchone()[0]
            )
