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
The schema and its migration, the row mapping and the page tokens are in rows.py.
"""

from __future__ import annotations

import builtins
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairdots_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pairdots_server.service.jobs.rows import (  # noqa: F401 (re-exported)
    ACTIVE,
    CANCELLED_MESSAGE,
    CANCELLED_REASON,
    CODE_ABORTED,
    CODE_CANCELLED,
    COLUMNS,
    DEFAULT_PAGE_SIZE,
    INTERRUPTED_MESSAGE,
    INTERRUPTED_REASON,
    KIND_RE,
    MAX_PAGE_SIZE,
    SCHEMA_VERSION,
    JobRecord,
    JobState,
    decode_token,
    encode_token,
    init_schema,
    row_to_record,
)


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
            init_schema(self._conn, self.path)
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(
                f"job store {self.path!r} cannot be opened as SQLite ({exc}); point the jobs "
                "store path at a new file or delete the damaged one"
            ) from exc

    # -- connection management -------------------------------------------------------------

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
        row = conn.execute(f"SELECT {COLUMNS} FROM operations WHERE name = ?", (name,)).fetchone()
        if row is None:
            shown = name if len(name) <= 100 else name[:100] + f"... ({len(name)} characters)"
            raise NotFound(
                f"operation {shown!r} does not exist (it was never created or was deleted); "
                "list the existing ones with ListOperations"
            )
        return row_to_record(row)

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
        before = decode_token(page_token, kinds_key, states_key) if page_token else None

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
        sql = f"SELECT seq, {COLUMNS} FROM operations"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(size + 1)
        with self._tx() as conn:
            rows = conn.execute(sql, args).fetchall()
        page = rows[:size]
        records = [row_to_record(r[1:]) for r in page]
        next_token = encode_token(page[-1][0], kinds_key, states_key) if len(rows) > size else ""
        return records, next_token

    # -- writes -----------------------------------------------------------------------------

    def create(self, kind: str, request_type: str, request_bytes: bytes) -> JobRecord:
        """Insert a PENDING operation named "operations/<kind>-<uuid4 hex>".

        `kind` must be lowercase `[a-z][a-z0-9_]*` (at most 32 characters): it is used in
        names and in ListOperations filters.
        """
        if not KIND_RE.match(kind):
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
        return self._transition(name, ACTIVE, "metadata_type_url = ?, metadata = ?",
                                (type_url, bytes(data)))

    def succeed(self, name: str, type_url: str, data: bytes) -> JobRecord:
        """→ SUCCEEDED with the result (Operation.response). No-op if already finished."""
        return self._transition(
            name, ACTIVE, "state = ?, result_type_url = ?, result = ?",
            (JobState.SUCCEEDED.value, type_url, bytes(data)),
        )

    def fail(self, name: str, code: int, message: str, reason: str) -> JobRecord:
        """→ FAILED with a google.rpc.Code value, message and ErrorInfo reason.
        No-op if already finished."""
        return self._transition(
            name, ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?",
            (JobState.FAILED.value, int(code), message, reason),
        )

    def interrupt(self, name: str, message: str = INTERRUPTED_MESSAGE) -> JobRecord:
        """→ FAILED with code ABORTED and reason INTERRUPTED (server stopping)."""
        return self.fail(name, CODE_ABORTED, message, INTERRUPTED_REASON)

    def cancel(self, name: str, message: str = CANCELLED_MESSAGE) -> JobRecord:
        """→ CANCELLED with code CANCELLED (AIP-151). No-op if already finished."""
        return self._transition(
            name, ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?",
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
                 time.time(), *ACTIVE),
            )
            return int(cur.rowcount)

    def count_active(self) -> int:
        """How many operations are PENDING or RUNNING."""
        with self._tx() as conn:
            return int(
                conn.execute(
                    "SELECT COUNT(*) FROM operations WHERE state IN (?, ?)", ACTIVE
                ).fetchone()[0]
            )
