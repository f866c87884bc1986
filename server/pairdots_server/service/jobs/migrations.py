"""Schema migrations of the job store, for SQLite and PostgreSQL, applied when a store opens.

Every database has a table `schema_migrations(version, description, applied_at)`: one row
per migration applied. Opening a store applies, in one transaction, every migration newer
than the highest recorded version and records it; a database recording a version newer than
this code knows is refused (FailedPrecondition: run a newer pairdots). On PostgreSQL the
transaction first takes an advisory lock, so replicas and workers starting together migrate
once. SQLite also keeps `PRAGMA user_version` = the latest version (what schema-1 servers
read to refuse a newer file); a schema-1 file (user_version 1, no migrations table) is
recorded as at version 1 and migrated from there.

Versions:
  1  operations (one row per operation) and request_ids (AIP-155 idempotency keys)
  2  leases: operations.owner (who runs or holds the job) and operations.lease_until (Unix
     seconds; a row whose lease passed is marked interrupted by any replica or worker)
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from pairdots_server.errors import FailedPrecondition

#: advisory lock key of the migration transaction on PostgreSQL (any constant)
_PG_LOCK_KEY = 0x7061697264


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    sqlite: tuple[str, ...]
    postgresql: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "operations and request ids",
        sqlite=(
            """CREATE TABLE IF NOT EXISTS operations (
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
                error_reason      TEXT)""",
            "CREATE INDEX IF NOT EXISTS operations_kind_seq ON operations (kind, seq)",
            "CREATE INDEX IF NOT EXISTS operations_state_seq ON operations (state, seq)",
            """CREATE TABLE IF NOT EXISTS request_ids (
                request_id  TEXT PRIMARY KEY,
                name        TEXT NOT NULL,
                fingerprint TEXT NOT NULL)""",
        ),
        postgresql=(
            """CREATE TABLE IF NOT EXISTS operations (
                seq               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                name              TEXT NOT NULL UNIQUE,
                kind              TEXT NOT NULL,
                state             TEXT NOT NULL,
                created_at        DOUBLE PRECISION NOT NULL,
                updated_at        DOUBLE PRECISION NOT NULL,
                request_type      TEXT NOT NULL,
                request           BYTEA NOT NULL,
                metadata_type_url TEXT,
                metadata          BYTEA,
                result_type_url   TEXT,
                result            BYTEA,
                error_code        INTEGER,
                error_message     TEXT,
                error_reason      TEXT)""",
            "CREATE INDEX IF NOT EXISTS operations_kind_seq ON operations (kind, seq)",
            "CREATE INDEX IF NOT EXISTS operations_state_seq ON operations (state, seq)",
            """CREATE TABLE IF NOT EXISTS request_ids (
                request_id  TEXT PRIMARY KEY,
                name        TEXT NOT NULL,
                fingerprint TEXT NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "leases: owner and lease_until",
        sqlite=(
            "ALTER TABLE operations ADD COLUMN owner TEXT",
            "ALTER TABLE operations ADD COLUMN lease_until REAL",
            "CREATE INDEX IF NOT EXISTS operations_state_lease ON operations (state, lease_until)",
        ),
        postgresql=(
            "ALTER TABLE operations ADD COLUMN IF NOT EXISTS owner TEXT",
            "ALTER TABLE operations ADD COLUMN IF NOT EXISTS lease_until DOUBLE PRECISION",
            "CREATE INDEX IF NOT EXISTS operations_state_lease ON operations (state, lease_until)",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version

_MIGRATIONS_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at  {real} NOT NULL)"""


def _too_new(label: str, version: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"job store {label!r} has schema version {version}, newer than this server "
        f"understands ({SCHEMA_VERSION}); run a newer pairdots or use another jobs store"
    )


def _pending(current: int) -> list[Migration]:
    return [m for m in MIGRATIONS if m.version > current]


def migrate_sqlite(conn: sqlite3.Connection, label: str) -> int:
    """Set the pragmas and bring an SQLite store to SCHEMA_VERSION; returns how many
    migrations were applied."""
    conn.execute("PRAGMA busy_timeout = 10000")
    if label != ":memory:":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("BEGIN IMMEDIATE")
    try:
        user_version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if user_version > SCHEMA_VERSION:
            raise _too_new(label, user_version)
        conn.execute(_MIGRATIONS_TABLE.format(real="REAL"))
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        current = int(row[0]) if row[0] is not None else 0
        if current == 0 and user_version >= 1:  # a schema-1 file from before this table
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (1, MIGRATIONS[0].description + " (found)", time.time()),
            )
            current = 1
        if current > SCHEMA_VERSION:
            raise _too_new(label, current)
        todo = _pending(current)
        for m in todo:
            for stmt in m.sqlite:
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (?, ?, ?)",
                (m.version, m.description, time.time()),
            )
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return len(todo)


def migrate_postgres(conn: Any, label: str) -> int:
    """Bring a PostgreSQL store to SCHEMA_VERSION under an advisory lock (one migrator at a
    time); returns how many migrations were applied. `conn` is an autocommit psycopg
    connection."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK_KEY,))
        conn.execute(_MIGRATIONS_TABLE.format(real="DOUBLE PRECISION"))
        row = conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
        current = int(row[0]) if row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise _too_new(label, current)
        todo = _pending(current)
        for m in todo:
            for stmt in m.postgresql:
                conn.execute(stmt)
            conn.execute(
                "INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                (m.version, m.description, time.time()),
            )
    return len(todo)


def applied_versions(tx: Any) -> list[int]:
    """The versions recorded in schema_migrations (ascending), through a store transaction."""
    return [
        int(r[0])
        for r in tx.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    ]
