"""The two databases a JobStore can live in: an embedded SQLite file (the default) or a shared
PostgreSQL server (`postgresql://…`, every serving replica and worker on one database).

A Backend hides what differs between them — how to connect, how one transaction is opened
and serialised, the parameter style, row locks — so store.py writes each query once, with
`?` placeholders (PostgreSQL's `%s` is substituted here; no query contains a literal `?` or
`%`). Schema migrations are applied when the backend opens (migrations.py).

Isolation: SQLite runs every transaction as BEGIN IMMEDIATE (one writer at a time for the
whole file, across processes). PostgreSQL runs READ COMMITTED transactions; a
read-then-update takes the row with `SELECT … FOR UPDATE` (`Backend.for_update`), and a
worker claims the oldest queued job with `FOR UPDATE SKIP LOCKED` (`Backend.skip_locked`), so
two workers never claim the same job and never wait on each other.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from pairdots_server.errors import FailedPrecondition

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(spec: str | Path) -> bool:
    """True for a `postgresql://` / `postgres://` connection URL (libpq syntax)."""
    return isinstance(spec, str) and spec.startswith(POSTGRES_SCHEMES)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def redact(url: str) -> str:
    """A connection URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else url


class Cursor(Protocol):
    """What store.py uses of a DB-API cursor."""

    rowcount: int

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Tx:
    """One open transaction: `execute(sql, args)` with `?` placeholders."""

    def __init__(self, conn: Any, paramstyle_pct: bool) -> None:
        self._conn = conn
        self._pct = paramstyle_pct

    def execute(self, sql: str, args: Sequence[object] = ()) -> Cursor:
        if self._pct:
            sql = sql.replace("?", "%s")
        return self._conn.execute(sql, tuple(args))  # type: ignore[no-any-return]


class Backend:
    """A connection shared under a lock (every store method is one short transaction)."""

    kind: str = ""
    #: appended to a SELECT of one row that the transaction then updates
    for_update: str = ""
    #: appended to the claim query's SELECT (skip rows another worker is claiming)
    skip_locked: str = ""
    #: True when several processes (replicas, workers) share the store by design
    shared: bool = False

    def __init__(self, label: str) -> None:
        self.label = label
        self._lock = threading.RLock()
        self._closed = False

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise FailedPrecondition("the job store is closed; the server is shutting down")

    def is_integrity_error(self, exc: BaseException) -> bool:
        """True when `exc` is a unique-constraint violation."""
        raise NotImplementedError


class SqliteBackend(Backend):
    """An embedded SQLite file (WAL mode) or ":memory:"."""

    kind = "sqlite"

    def __init__(self, path: str | Path) -> None:
        from pairdots_server.service.jobs.migrations import migrate_sqlite

        super().__init__(str(path))
        if self.label != ":memory:":
            Path(self.label).parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(
                self.label, check_same_thread=False, isolation_level=None, timeout=10.0
            )
            migrate_sqlite(self._conn, self.label)
        except sqlite3.DatabaseError as exc:
            raise FailedPrecondition(
                f"job store {self.label!r} cannot be opened as SQLite ({exc}); point the jobs "
                "store path at a new file or delete the damaged one"
            ) from exc

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            self._check_open()
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield Tx(self._conn, paramstyle_pct=False)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._conn.close()

    def is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)


class PostgresBackend(Backend):
    """A PostgreSQL database shared by every replica and worker (psycopg 3, the `postgres`
    extra). A broken connection (server restart, network) is reopened on the next call."""

    kind = "postgresql"
    for_update = " FOR UPDATE"
    skip_locked = " FOR UPDATE SKIP LOCKED"
    shared = True

    def __init__(self, url: str, connect_timeout_s: int = 10) -> None:
        super().__init__(redact(url))
        try:
            import psycopg
        except ImportError as exc:
            raise FailedPrecondition(
                "--jobs-db is a PostgreSQL URL but the driver is not installed; install it "
                "with `pip install 'pairdots[postgres]'` (psycopg 3)"
            ) from exc
        self._psycopg = psycopg
        self._url = url
        self._timeout = connect_timeout_s
        self._conn: Any = None
        from pairdots_server.service.jobs.migrations import migrate_postgres

        with self._lock:
            migrate_postgres(self._connection(), self.label)

    def _connection(self) -> Any:
        if self._conn is None or self._conn.closed or self._conn.broken:
            try:
                self._conn = self._psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=self._timeout,
                    application_name="pairdots",
                )
            except self._psycopg.Error as exc:
                raise FailedPrecondition(
                    f"cannot connect to the job store {self.label}: {_one_line(exc)}; check "
                    "--jobs-db (host, port, database, user, password) and that PostgreSQL is up"
                ) from exc
        return self._conn

    @contextmanager
    def tx(self) -> Iterator[Tx]:
        with self._lock:
            self._check_open()
            conn = self._connection()
            try:
                with conn.transaction():
                    yield Tx(conn, paramstyle_pct=True)
            except self._psycopg.OperationalError as exc:
                raise FailedPrecondition(
                    f"the job store {self.label} is unreachable ({_one_line(exc)}); the "
                    "call can be retried once PostgreSQL is back"
                ) from exc

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if self._conn is not None:
                    self._conn.close()

    def is_integrity_error(self, exc: BaseException) -> bool:
        return isinstance(exc, self._psycopg.errors.UniqueViolation)


def open_backend(spec: str | Path) -> Backend:
    """PostgresBackend for a postgresql:// URL, else SqliteBackend for a path."""
    if is_postgres_url(spec):
        return PostgresBackend(str(spec))
    return SqliteBackend(spec)
