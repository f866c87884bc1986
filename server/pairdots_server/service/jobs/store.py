"""Durable record of long-running operations (google.longrunning.Operation), kept in SQLite
(embedded, the default) or PostgreSQL (shared by serving replicas and workers; backends.py).

One row per operation. The store knows nothing about gRPC or about the payload protos: the
request, the progress metadata and the result are opaque bytes with their type name / type
URL, so the RPC layer can wrap them in `google.protobuf.Any` unchanged.

State machine (terminal states are sticky: the first terminal transition wins)::

    PENDING ──set_running / claim──▶ RUNNING ──succeed──▶ SUCCEEDED
       │                               │
       └──────────cancel / fail / lease expired──┴──▶ CANCELLED / FAILED

Leases (schema 2): a row held by a process has `owner` (its runner or worker id) and
`lease_until` (Unix seconds). The holder renews the lease every few seconds (`renew`); any
replica or worker calls `expire_leases()` periodically, which turns an active row whose lease
passed into FAILED, code ABORTED, reason INTERRUPTED, with a message naming the owner and when
its lease ran out. Such a job is marked, not re-queued: a job that killed its worker (out of
memory, say) would kill the next one too, and a half-run retrain may have written files; the
client sees the interruption and decides. A PENDING row with no owner is queued for any
`pairdots worker` (`claim`, oldest first). Clocks of the processes sharing a store are assumed
to agree to well within a lease (NTP).

`mark_interrupted_on_startup()` turns every PENDING/RUNNING row into FAILED/INTERRUPTED: only
for an embedded store that one serving process runs jobs from (call it once at start, before
any runner submits); shared stores rely on leases instead.

Thread safety: one connection shared under a lock; every method is a short transaction.
The schema and its migrations are in migrations.py, the row mapping and the page tokens in
rows.py.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pairdots_server.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from pairdots_server.service.jobs.backends import Backend, Tx, open_backend
from pairdots_server.service.jobs.migrations import applied_versions
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
    LEASE_EXPIRED_MESSAGE,
    MAX_PAGE_SIZE,
    SCHEMA_VERSION,
    JobRecord,
    JobState,
    decode_token,
    encode_token,
    row_to_record,
)


class JobStore:
    """Table of operations in SQLite or PostgreSQL.

    `path` is a file path (its parent directory is created), ":memory:" for tests, or a
    `postgresql://user:password@host:port/database` URL (libpq syntax; needs the `postgres`
    extra). Raises FailedPrecondition when the file is not a pairdots job store, the database
    cannot be reached, or the store was written by a newer schema version.
    """

    def __init__(self, path: str | Path) -> None:
        self._db: Backend = open_backend(path)
        self.path = self._db.label  # a PostgreSQL URL without its password

    @property
    def backend(self) -> str:
        """"sqlite" or "postgresql"."""
        return self._db.kind

    @property
    def shared(self) -> bool:
        """True when other processes (replicas, workers) may use the same store."""
        return self._db.shared

    # -- connection management -------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[Tx]:
        """One transaction (serialised within this process)."""
        with self._db.tx() as tx:
            yield tx

    def close(self) -> None:
        """Close the connection (idempotent). Later calls raise FailedPrecondition."""
        self._db.close()

    def schema_versions(self) -> builtins.list[int]:
        """The migrations applied to this store (ascending)."""
        with self._tx() as tx:
            return applied_versions(tx)

    # -- reads ------------------------------------------------------------------------------

    def _get(self, tx: Tx, name: str, lock: bool = False) -> JobRecord:
        lock_sql = self._db.for_update if lock else ""
        row = tx.execute(f"SELECT {COLUMNS} FROM operations WHERE name = ?{lock_sql}",
                         (name,)).fetchone()
        if row is None:
            shown = name if len(name) <= 100 else name[:100] + f"... ({len(name)} characters)"
            raise NotFound(
                f"operation {shown!r} does not exist (it was never created or was deleted); "
                "list the existing ones with ListOperations"
            )
        return row_to_record(row)

    def get(self, name: str) -> JobRecord:
        """The current record of `name`; NotFound if there is none."""
        with self._tx() as tx:
            return self._get(tx, name)

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
        with self._tx() as tx:
            rows = tx.execute(sql, args).fetchall()
        page = rows[:size]
        records = [row_to_record(r[1:]) for r in page]
        next_token = encode_token(page[-1][0], kinds_key, states_key) if len(rows) > size else ""
        return records, next_token

    # -- writes -----------------------------------------------------------------------------

    def create(self, kind: str, request_type: str, request_bytes: bytes, *,
               metadata: tuple[str, bytes] | None = None, owner: str | None = None,
               lease_s: float | None = None) -> JobRecord:
        """Insert a PENDING operation named "operations/<kind>-<uuid4 hex>".

        `kind` must be lowercase `[a-z][a-z0-9_]*` (at most 32 characters): it is used in
        names and in ListOperations filters. `metadata` (type URL, bytes) is its initial
        progress; `owner` with `lease_s` holds it for that runner (an unowned PENDING row is
        queued for any worker).
        """
        record, _ = self.create_once(kind, request_type, request_bytes, metadata=metadata,
                                     owner=owner, lease_s=lease_s)
        return record

    def create_once(self, kind: str, request_type: str, request_bytes: bytes, *,
                    metadata: tuple[str, bytes] | None = None, request_id: str = "",
                    fingerprint: str = "", owner: str | None = None,
                    lease_s: float | None = None) -> tuple[JobRecord, bool]:
        """`create` and, with a `request_id` (AIP-155), remember it in the same transaction.
        Returns (record, created): when the key already names an operation (created by any
        process sharing the store, even concurrently) that one is returned with False.
        AlreadyExists when the key was used for a different request (`fingerprint`)."""
        if not KIND_RE.match(kind):
            raise InvalidArgument.for_field(
                "kind", f"{kind!r} is not a job kind; use lowercase letters, digits and '_'"
            )
        if request_id:
            existing = self.find_request(request_id, fingerprint)
            if existing is not None:
                return existing, False
        name = f"operations/{kind}-{uuid.uuid4().hex}"
        now = time.time()
        md_url, md = metadata if metadata is not None else (None, None)
        lease = None if owner is None or lease_s is None else now + lease_s
        try:
            with self._tx() as tx:
                tx.execute(
                    "INSERT INTO operations (name, kind, state, created_at, updated_at, "
                    "request_type, request, metadata_type_url, metadata, owner, lease_until) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, kind, JobState.PENDING.value, now, now, request_type,
                     bytes(request_bytes), md_url, None if md is None else bytes(md), owner,
                     lease),
                )
                if request_id:
                    tx.execute("INSERT INTO request_ids (request_id, name, fingerprint) "
                               "VALUES (?, ?, ?)", (request_id, name, fingerprint))
                return self._get(tx, name), True
        except Exception as exc:
            if not (request_id and self._db.is_integrity_error(exc)):
                raise
        # another process created the operation for this key between our check and insert
        existing = self.find_request(request_id, fingerprint)
        if existing is None:  # pragma: no cover (its operation was deleted meanwhile)
            raise FailedPrecondition(
                f"request_id {request_id[:128]!r} is being used concurrently; retry the call")
        return existing, False

    def find_request(self, request_id: str, fingerprint: str) -> JobRecord | None:
        """The operation created for `request_id` (AIP-155), or None when there is none (never
        used, or its operation was deleted). AlreadyExists when the key was used for a
        different request (another `fingerprint`)."""
        with self._tx() as tx:
            row = tx.execute("SELECT name, fingerprint FROM request_ids WHERE request_id = ?",
                             (request_id,)).fetchone()
            if row is None:
                return None
            name, seen = row
            try:
                record = self._get(tx, name)
            except NotFound:
                tx.execute("DELETE FROM request_ids WHERE request_id = ?", (request_id,))
                return None
        if seen != fingerprint:
            raise AlreadyExists(
                f"request_id {request_id[:128]!r} was already used for a different request "
                f"(operation {name}); use a new request_id for a new request",
                reason="REQUEST_ID_REUSED")
        return record

    def remember_request(self, request_id: str, fingerprint: str, name: str) -> None:
        """Record that `request_id` created operation `name`."""
        with self._tx() as tx:
            tx.execute("INSERT INTO request_ids (request_id, name, fingerprint) VALUES (?, ?, ?) "
                       "ON CONFLICT (request_id) DO UPDATE SET name = excluded.name, "
                       "fingerprint = excluded.fingerprint", (request_id, name, fingerprint))

    def _transition(
        self, name: str, allowed_from: Collection[str], assignments: str, args: tuple[Any, ...]
    ) -> JobRecord:
        """Apply `assignments` if the row is in one of `allowed_from`; return the row after."""
        with self._tx() as tx:
            current = self._get(tx, name, lock=True)
            if current.state.value in allowed_from:
                tx.execute(
                    f"UPDATE operations SET {assignments}, updated_at = ? WHERE name = ?",
                    (*args, time.time(), name),
                )
                return self._get(tx, name)
            return current

    def set_running(self, name: str, owner: str | None = None,
                    lease_s: float | None = None) -> JobRecord:
        """PENDING → RUNNING (held by `owner` for `lease_s` seconds when given). Returns the
        record after; if it was cancelled (or claimed by a worker) meanwhile, the returned
        state is not RUNNING or its owner is another: the caller must not start the work."""
        if owner is None:
            return self._transition(name, (JobState.PENDING.value,), "state = ?",
                                    (JobState.RUNNING.value,))
        lease = None if lease_s is None else time.time() + lease_s
        with self._tx() as tx:
            current = self._get(tx, name, lock=True)
            if current.state is JobState.PENDING and current.owner in (None, owner):
                tx.execute("UPDATE operations SET state = ?, owner = ?, lease_until = ?, "
                           "updated_at = ? WHERE name = ?",
                           (JobState.RUNNING.value, owner, lease, time.time(), name))
                return self._get(tx, name)
            return current

    def claim(self, owner: str, lease_s: float, kinds: Collection[str] | None = None
              ) -> JobRecord | None:
        """The oldest PENDING operation queued for any worker (no owner), of one of `kinds`
        when given, turned RUNNING and held by `owner` for `lease_s` seconds; None when there
        is none. Two claimers never get the same operation (SQLite: one writer at a time;
        PostgreSQL: FOR UPDATE SKIP LOCKED)."""
        where = "state = ? AND owner IS NULL"
        args: builtins.list[object] = [JobState.PENDING.value]
        if kinds is not None:
            kinds = sorted(kinds)
            if not kinds:
                return None
            where += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        with self._tx() as tx:
            row = tx.execute(f"SELECT name FROM operations WHERE {where} ORDER BY seq LIMIT 1"
                             f"{self._db.skip_locked}", args).fetchone()
            if row is None:
                return None
            now = time.time()
            tx.execute("UPDATE operations SET state = ?, owner = ?, lease_until = ?, "
                       "updated_at = ? WHERE name = ?",
                       (JobState.RUNNING.value, owner, now + lease_s, now, row[0]))
            return self._get(tx, row[0])

    def renew(self, names: Collection[str], owner: str, lease_s: float
              ) -> dict[str, JobRecord | None]:
        """Extend `owner`'s lease on each of `names` that is still active and held by it, to
        now + `lease_s`. Returns every name's record after (None: deleted), so the holder sees
        a cancellation made by another process, or a lease it lost (the record is done or
        held by someone else: stop the work)."""
        out: dict[str, JobRecord | None] = {}
        if not names:
            return out
        now = time.time()
        with self._tx() as tx:
            for name in names:
                tx.execute(
                    "UPDATE operations SET lease_until = ? WHERE name = ? AND owner = ? AND "
                    "state IN (?, ?)", (now + lease_s, name, owner, *ACTIVE))
                try:
                    out[name] = self._get(tx, name)
                except NotFound:
                    out[name] = None
        return out

    def expire_leases(self, now: float | None = None) -> builtins.list[str]:
        """Mark every active operation whose lease passed as FAILED, code ABORTED, reason
        INTERRUPTED, with LEASE_EXPIRED_MESSAGE (its owner and when). Returns their names."""
        now = time.time() if now is None else now
        with self._tx() as tx:
            rows = tx.execute(
                f"SELECT name, owner, lease_until, updated_at FROM operations WHERE state IN "
                f"(?, ?) AND lease_until IS NOT NULL AND lease_until < ?{self._db.for_update}",
                (*ACTIVE, now)).fetchall()
            for name, owner, lease_until, _updated in rows:
                expired = datetime.fromtimestamp(lease_until, timezone.utc)
                message = LEASE_EXPIRED_MESSAGE.format(
                    owner=owner, expired=expired.strftime("%Y-%m-%d %H:%M:%S UTC"),
                    lease=max(0.0, lease_until - _updated))
                tx.execute(
                    "UPDATE operations SET state = ?, error_code = ?, error_message = ?, "
                    "error_reason = ?, lease_until = NULL, updated_at = ? WHERE name = ?",
                    (JobState.FAILED.value, CODE_ABORTED, message, INTERRUPTED_REASON, now, name))
        return [r[0] for r in rows]

    def update_metadata(self, name: str, type_url: str, data: bytes) -> JobRecord:
        """Replace the progress metadata (Operation.metadata) of an unfinished operation;
        a finished one is left unchanged."""
        return self._transition(name, ACTIVE, "metadata_type_url = ?, metadata = ?",
                                (type_url, bytes(data)))

    def succeed(self, name: str, type_url: str, data: bytes) -> JobRecord:
        """→ SUCCEEDED with the result (Operation.response). No-op if already finished."""
        return self._transition(
            name, ACTIVE, "state = ?, result_type_url = ?, result = ?, lease_until = NULL",
            (JobState.SUCCEEDED.value, type_url, bytes(data)),
        )

    def fail(self, name: str, code: int, message: str, reason: str) -> JobRecord:
        """→ FAILED with a google.rpc.Code value, message and ErrorInfo reason.
        No-op if already finished."""
        return self._transition(
            name, ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?, "
            "lease_until = NULL", (JobState.FAILED.value, int(code), message, reason),
        )

    def interrupt(self, name: str, message: str = INTERRUPTED_MESSAGE) -> JobRecord:
        """→ FAILED with code ABORTED and reason INTERRUPTED (server stopping)."""
        return self.fail(name, CODE_ABORTED, message, INTERRUPTED_REASON)

    def cancel(self, name: str, message: str = CANCELLED_MESSAGE) -> JobRecord:
        """→ CANCELLED with code CANCELLED (AIP-151). No-op if already finished. The process
        running it sees the cancellation at its next lease renewal."""
        return self._transition(
            name, ACTIVE, "state = ?, error_code = ?, error_message = ?, error_reason = ?, "
            "lease_until = NULL",
            (JobState.CANCELLED.value, CODE_CANCELLED, message, CANCELLED_REASON),
        )

    def delete(self, name: str) -> None:
        """Remove a finished operation. NotFound if unknown; FailedPrecondition if unfinished
        (deleting does not cancel: cancel it first)."""
        with self._tx() as tx:
            current = self._get(tx, name)
            if not current.done:
                raise FailedPrecondition(
                    f"operation {name!r} is still {current.state.value}; cancel it first "
                    "(CancelOperation) and delete it once it is done"
                )
            tx.execute("DELETE FROM operations WHERE name = ?", (name,))

    def mark_interrupted_on_startup(self) -> int:
        """Turn every PENDING/RUNNING row (left by a previous process) into FAILED with code
        ABORTED, reason INTERRUPTED. Returns how many rows changed."""
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE operations SET state = ?, error_code = ?, error_message = ?, "
                "error_reason = ?, lease_until = NULL, updated_at = ? WHERE state IN (?, ?)",
                (JobState.FAILED.value, CODE_ABORTED, INTERRUPTED_MESSAGE, INTERRUPTED_REASON,
                 time.time(), *ACTIVE),
            )
            return int(cur.rowcount)

    def count_active(self) -> int:
        """How many operations are PENDING or RUNNING."""
        with self._tx() as tx:
            return int(
                tx.execute(
                    "SELECT COUNT(*) FROM operations WHERE state IN (?, ?)", ACTIVE
                ).fetchone()[0]
            )
