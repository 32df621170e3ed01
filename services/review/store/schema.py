"""The SQLite store's schema: DDL, migration (``PRAGMA user_version``), and rows back to records (both backends)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Protocol

from services.review.flows import ReviewError, TaskType
from services.review.store.model import Decision, Loop, LoopStatus

# One numbering for both backends: version n means the same tables and columns in SQLite and PostgreSQL
# (postgres_schema.py), each reaching it by its own statements.
SCHEMA_VERSION = 3

# Version 1, as first released; later versions are MIGRATIONS applied on top, to new and old files alike,
# so a fresh database and a migrated one are built by the same statements.
SCHEMA = """
CREATE TABLE loops (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,     -- creation order; never reused, so page tokens stay valid
    name TEXT NOT NULL UNIQUE,
    flow TEXT NOT NULL,
    task_type TEXT NOT NULL,
    status TEXT NOT NULL,
    failure_code TEXT,
    failure_reason TEXT,
    input_json TEXT NOT NULL,                  -- canonical JSON (sorted keys)
    input_hash TEXT NOT NULL,
    input_digest TEXT NOT NULL,                -- SHA-256 of flow, input, input hash and images: the idempotency check
    image_names TEXT NOT NULL,                 -- JSON list, in attachment order
    task_count INTEGER NOT NULL CHECK (task_count BETWEEN 1 AND 3),
    task_time_limit_s REAL NOT NULL,
    answers INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    ended_at REAL,
    output_path TEXT                           -- set once output.json is written
);
CREATE INDEX loops_by_queue ON loops (status, flow, seq);
CREATE INDEX loops_by_expiry ON loops (status, expires_at);
CREATE INDEX loops_by_created ON loops (created_at, seq);

CREATE TABLE images (
    loop_seq INTEGER NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (loop_seq, position)
);

CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    loop_seq INTEGER NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    reviewer TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('leased', 'answered', 'released', 'expired', 'cancelled')),
    leased_at REAL NOT NULL,
    lease_expires_at REAL NOT NULL,
    ended_at REAL
);
CREATE INDEX deliveries_by_state ON deliveries (state, lease_expires_at);
CREATE INDEX deliveries_by_loop ON deliveries (loop_seq, reviewer, state);
CREATE INDEX deliveries_by_reviewer ON deliveries (reviewer, state);

CREATE TABLE decisions (
    id TEXT PRIMARY KEY,                       -- the client's decision id
    loop_seq INTEGER NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    reviewer TEXT NOT NULL,
    delivery_id TEXT,
    answer_json TEXT NOT NULL,
    payload_digest TEXT NOT NULL,              -- SHA-256 of loop name, reviewer and answer
    accepted_at REAL NOT NULL,                 -- when the reviewer's lease began (A2I's acceptanceTime)
    submitted_at REAL NOT NULL,
    UNIQUE (loop_seq, reviewer)                -- one answer per reviewer per loop
);
"""

# MIGRATIONS[n] takes a database from version n to n + 1.
MIGRATIONS: dict[int, str] = {
    # The token's issuer and subject of a verified reviewer (then ``reviewer`` is ``issuer#subject``);
    # NULL for decisions made without tokens. A2I's workerMetadata.identityData is built from them.
    1: """
ALTER TABLE decisions ADD COLUMN reviewer_issuer TEXT;
ALTER TABLE decisions ADD COLUMN reviewer_subject TEXT;
""",
    # Verified results as DICOM (services/review/completion.py): NULL for a loop without a DICOM source;
    # 'pending' from the start of one that has it until its verified result is handed to the DICOM node
    # ('handed-over'), or cannot be built from it ('failed', 'skipped'); dicom_note says which object or why.
    2: """
ALTER TABLE loops ADD COLUMN dicom_state TEXT;
ALTER TABLE loops ADD COLUMN dicom_note TEXT;
CREATE INDEX loops_dicom_pending ON loops (seq) WHERE dicom_state = 'pending';
""",
}


def migrate(conn: sqlite3.Connection, label: str) -> None:
    """Create the schema in an empty database, or bring an older one up to date; refuse a newer one."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if not 0 <= version < SCHEMA_VERSION:
        raise ReviewError(f"{label}: schema version {version}, this code knows {SCHEMA_VERSION}")
    steps = [SCHEMA] if version == 0 else []
    steps += [MIGRATIONS[n] for n in range(max(version, 1), SCHEMA_VERSION)]
    try:
        # One script in one transaction: a crash leaves the old version or the new one, never a mix.
        conn.executescript(f"BEGIN IMMEDIATE;{';'.join(steps)};PRAGMA user_version={SCHEMA_VERSION};COMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


class Row(Protocol):
    """A result row by column name: sqlite3.Row, or psycopg's dict rows."""

    def __getitem__(self, key: str, /) -> Any: ...


def row_loop(row: Row) -> Loop:
    """A ``loops`` row as a record."""
    return Loop(
        name=row["name"],
        flow=row["flow"],
        task_type=TaskType(row["task_type"]),
        status=LoopStatus(row["status"]),
        input_content=json.loads(row["input_json"]),
        input_hash=row["input_hash"],
        image_names=tuple(json.loads(row["image_names"])),
        task_count=row["task_count"],
        answers=row["answers"],
        task_time_limit_s=row["task_time_limit_s"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        ended_at=row["ended_at"],
        failure_code=row["failure_code"],
        failure_reason=row["failure_reason"],
        output_path=row["output_path"],
        dicom_state=_column(row, "dicom_state"),
        dicom_note=_column(row, "dicom_note"),
    )


def _column(row: Row, name: str) -> Any:
    """A column a query may not select (one written before schema 3's columns existed): None then."""
    try:
        return row[name]
    except (IndexError, KeyError):
        return None


def row_decision(row: Row, loop_name: str, status: LoopStatus, *, replayed: bool = False) -> Decision:
    return Decision(
        decision_id=row["id"],
        loop_name=loop_name,
        reviewer_id=row["reviewer"],
        delivery_id=row["delivery_id"],
        answer=json.loads(row["answer_json"]),
        accepted_at=row["accepted_at"],
        submitted_at=row["submitted_at"],
        loop_status=status,
        replayed=replayed,
        issuer=row["reviewer_issuer"],
        subject=row["reviewer_subject"],
    )
