"""The PostgreSQL store's schema: DDL and versioned migrations recorded in a ``schema_version`` table."""

from __future__ import annotations

import time
from typing import Any

from services.review.flows import ReviewError
from services.review.store.schema import SCHEMA_VERSION

# Version 1, the same tables and columns as SQLite's version 1; later versions are MIGRATIONS applied on top,
# so a fresh database and one migrated from any earlier version are built by the same statements.
SCHEMA = """
CREATE TABLE loops (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- creation order; never reused, so page tokens stay valid
    name TEXT NOT NULL UNIQUE,
    flow TEXT NOT NULL,
    task_type TEXT NOT NULL,
    status TEXT NOT NULL,
    failure_code TEXT,
    failure_reason TEXT,
    input_json TEXT NOT NULL,                  -- canonical JSON (sorted keys), kept as text: digests are of this text
    input_hash TEXT NOT NULL,
    input_digest TEXT NOT NULL,                -- SHA-256 of flow, input, input hash and images: the idempotency check
    image_names TEXT NOT NULL,                 -- JSON list, in attachment order
    task_count INTEGER NOT NULL CHECK (task_count BETWEEN 1 AND 3),
    task_time_limit_s DOUBLE PRECISION NOT NULL,
    answers INTEGER NOT NULL DEFAULT 0,
    created_at DOUBLE PRECISION NOT NULL,      -- epoch seconds, as SQLite: the store's clock, not the database's
    expires_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION,
    output_path TEXT
);
-- The queue: open loops of a flow in creation order (what lease scans under FOR UPDATE SKIP LOCKED).
CREATE INDEX loops_queue ON loops (flow, seq) WHERE status = 'InProgress';
CREATE INDEX loops_open_expiry ON loops (expires_at) WHERE status = 'InProgress';
CREATE INDEX loops_by_status ON loops (status, flow, seq);
CREATE INDEX loops_by_created ON loops (created_at, seq);
CREATE INDEX loops_pending_output ON loops (seq) WHERE status = 'Completed' AND output_path IS NULL;

CREATE TABLE images (
    loop_seq BIGINT NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    name TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (loop_seq, position)
);

CREATE TABLE deliveries (
    id TEXT PRIMARY KEY,
    loop_seq BIGINT NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    reviewer TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('leased', 'answered', 'released', 'expired', 'cancelled')),
    leased_at DOUBLE PRECISION NOT NULL,
    lease_expires_at DOUBLE PRECISION NOT NULL,
    ended_at DOUBLE PRECISION
);
CREATE INDEX deliveries_open_expiry ON deliveries (lease_expires_at) WHERE state = 'leased';
CREATE INDEX deliveries_by_loop ON deliveries (loop_seq, reviewer, state);
CREATE INDEX deliveries_by_reviewer ON deliveries (reviewer, state);
-- A reviewer never holds two leases on one loop, whichever replica leased them.
CREATE UNIQUE INDEX deliveries_one_open_lease ON deliveries (loop_seq, reviewer) WHERE state = 'leased';

CREATE TABLE decisions (
    id TEXT PRIMARY KEY,                       -- the client's decision id
    loop_seq BIGINT NOT NULL REFERENCES loops (seq) ON DELETE CASCADE,
    reviewer TEXT NOT NULL,
    delivery_id TEXT,
    answer_json TEXT NOT NULL,
    payload_digest TEXT NOT NULL,              -- SHA-256 of loop name, reviewer and answer
    accepted_at DOUBLE PRECISION NOT NULL,     -- when the reviewer's lease began (A2I's acceptanceTime)
    submitted_at DOUBLE PRECISION NOT NULL,
    UNIQUE (loop_seq, reviewer)                -- one answer per reviewer per loop
);
"""

# MIGRATIONS[n] takes a database from version n to n + 1 (the same change as SQLite's MIGRATIONS[n]).
MIGRATIONS: dict[int, tuple[str, str]] = {
    1: (
        "decisions keep the token's issuer and subject of a verified reviewer",
        "ALTER TABLE decisions ADD COLUMN reviewer_issuer TEXT, ADD COLUMN reviewer_subject TEXT",
    ),
    2: (
        "loops keep the state of their verified DICOM result",
        "ALTER TABLE loops ADD COLUMN dicom_state TEXT, ADD COLUMN dicom_note TEXT;"
        " CREATE INDEX loops_dicom_pending ON loops (seq) WHERE dicom_state = 'pending'",
    ),
}
BASE_DESCRIPTION = "loops, images, deliveries, decisions"

VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at DOUBLE PRECISION NOT NULL,
    description TEXT NOT NULL
)
"""

# pg_advisory_xact_lock key: replicas that start together migrate one after the other, never at once.
MIGRATION_LOCK = 0x6D656467_61746501  # "medgate" + 1


def migrate(conn: Any, label: str, *, target: int = SCHEMA_VERSION) -> int:
    """Create the schema in an empty database or bring an older one up to ``target``; refuse a newer one.

    ``conn`` is a psycopg connection in autocommit mode. One transaction (PostgreSQL's DDL is
    transactional): a crash leaves the old version or the new one, never a mix. Returns the version
    found before migrating.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(VERSION_TABLE)
        row = conn.execute("SELECT COALESCE(MAX(version), 0) AS version FROM schema_version").fetchone()
        version = int(row["version"])
        if version == target:
            return version
        if not 0 <= version < target:
            raise ReviewError(f"{label}: schema version {version}, this code knows {target}")
        steps: list[tuple[int, str, str]] = [(1, BASE_DESCRIPTION, SCHEMA)] if version == 0 else []
        steps += [(n + 1, *MIGRATIONS[n]) for n in range(max(version, 1), target)]
        for new_version, description, statements in steps:
            conn.execute(statements)
            conn.execute(
                "INSERT INTO schema_version (version, applied_at, description) VALUES (%s, %s, %s)",
                (new_version, time.time(), description),
            )
        return version


if set(MIGRATIONS) != set(range(1, SCHEMA_VERSION)):  # pragma: no cover - a developer's mistake, caught at import
    raise ImportError("postgres_schema.MIGRATIONS must take every version below SCHEMA_VERSION one step up")
