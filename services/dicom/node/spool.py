"""The node's durable state: received instances, built results and their deliveries (files and a SQLite ledger).

Folders (settings ``dicom.*``)::

    store_dir/<SOPInstanceUID>.dcm            received, routed, waiting for its series' quiet period
    outbox_dir/ledger.sqlite3                 instances, results, deliveries (WAL, synchronous=FULL)
    outbox_dir/results/<SOPInstanceUID>.dcm   a built SEG or SR until every destination has it
    outbox_dir/refused/<destination>/         results a destination refused for good (.dcm + .json), for an operator
    quarantine_dir/                           received objects that could not be parsed, or that the gateway
                                              refused (.dcm + .json with the reason: status codes and UIDs only)

Every file is written to a temporary name, fsynced and renamed, and the ledger row that makes it
count is committed after the file is on disk. Commit points:

- an instance is received once its file and ``instances`` row exist (the C-STORE answer waits for both);
- an instance is analysed once its ``results`` rows and one ``deliveries`` row per destination are
  committed, in one transaction with the instance's state ``done``; result files written before a
  crash and never committed are removed at start-up, and an instance is never analysed twice;
- a result is delivered to a destination once its row says ``sent``; the row is committed right
  after the peer's success answer. Only a crash between that answer and the commit sends it again,
  with the same SOP Instance UID, which an archive stores once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.durable import write_durable

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_SAFE = re.compile(r"[^A-Za-z0-9._@-]+")

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    request TEXT NOT NULL,           -- what to run, as JSON (kept: the rules may change meanwhile)
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    state TEXT NOT NULL,             -- waiting | done | failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_waiting ON instances (state, series_instance_uid);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    source_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS results_source ON results (source_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    result_uid TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,             -- pending | sent | refused
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,
    error TEXT NOT NULL DEFAULT '',
    done_at REAL,
    PRIMARY KEY (result_uid, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
"""


def is_uid(value: str) -> bool:
    return 0 < len(value) <= 64 and bool(_UID.match(value))


def safe_name(text: str) -> str:
    """A folder or file name made of ``text`` (destination keys, AE titles)."""
    return _SAFE.sub("_", text).strip("._") or "unnamed"


@dataclass(frozen=True)
class Instance:
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    route: str
    request: dict[str, Any]
    calling_ae: str
    received_at: float
    state: str = "waiting"
    attempts: int = 0


@dataclass(frozen=True)
class Result:
    sop_instance_uid: str
    kind: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    data: bytes


@dataclass(frozen=True)
class Delivery:
    result_uid: str
    destination: str
    attempts: int
    kind: str
    source_uid: str


class Spool:
    """Files and ledger; every method is safe to call from any thread (one connection under one lock)."""

    def __init__(self, store_dir: Path, outbox_dir: Path, quarantine_dir: Path) -> None:
        self.store_dir = Path(store_dir)
        self.outbox_dir = Path(outbox_dir)
        self.results_dir = self.outbox_dir / "results"
        self.refused_dir = self.outbox_dir / "refused"
        self.quarantine_dir = Path(quarantine_dir)
        for directory in (self.store_dir, self.results_dir, self.refused_dir, self.quarantine_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.outbox_dir / "ledger.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # Received instances -------------------------------------------------------------------------

    def instance_path(self, sop_instance_uid: str) -> Path:
        return self.store_dir / f"{sop_instance_uid}.dcm"

    def result_path(self, sop_instance_uid: str) -> Path:
        return self.results_dir / f"{sop_instance_uid}.dcm"

    def state_of(self, sop_instance_uid: str) -> str | None:
        rows = self._query("SELECT state FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return str(rows[0][0]) if rows else None

    def receive(self, instance: Instance, data: bytes) -> bool:
        """Keep a routed instance; False (nothing kept) when it was analysed already or is in quarantine."""
        if self.state_of(instance.sop_instance_uid) in {"done", "failed"}:
            return False
        write_durable(self.instance_path(instance.sop_instance_uid), data)
        with self._transaction() as db:
            # Sent again while waiting: the newer copy replaces it and the series' quiet period starts over.
            db.execute(
                "INSERT INTO instances (sop_instance_uid, series_instance_uid, study_instance_uid, sop_class_uid,"
                " route, request, calling_ae, received_at, state) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'waiting')"
                " ON CONFLICT (sop_instance_uid) DO UPDATE SET series_instance_uid = excluded.series_instance_uid,"
                " study_instance_uid = excluded.study_instance_uid, sop_class_uid = excluded.sop_class_uid,"
                " route = excluded.route, request = excluded.request, calling_ae = excluded.calling_ae,"
                " received_at = excluded.received_at WHERE instances.state = 'waiting'",
                (
                    instance.sop_instance_uid,
                    instance.series_instance_uid,
                    instance.study_instance_uid,
                    instance.sop_class_uid,
                    instance.route,
                    json.dumps(instance.request, sort_keys=True),
                    instance.calling_ae,
                    instance.received_at,
                ),
            )
        return True

    def due_instances(self, *, now: float, quiet_period_s: float, exclude: set[str]) -> list[Instance]:
        """Waiting instances whose series has been quiet for ``quiet_period_s`` and whose retry time has come."""
        rows = self._query(
            "SELECT i.sop_instance_uid, i.series_instance_uid, i.study_instance_uid, i.sop_class_uid, i.route,"
            " i.request, i.calling_ae, i.received_at, i.state, i.attempts FROM instances i"
            " JOIN (SELECT series_instance_uid, MAX(received_at) AS last FROM instances WHERE state = 'waiting'"
            "       GROUP BY series_instance_uid) s ON s.series_instance_uid = i.series_instance_uid"
            " WHERE i.state = 'waiting' AND i.next_at <= ? AND s.last <= ?"
            " ORDER BY i.series_instance_uid, i.received_at",
            (now, now - quiet_period_s),
        )
        return [
            Instance(
                sop_instance_uid=r[0],
                series_instance_uid=r[1],
                study_instance_uid=r[2],
                sop_class_uid=r[3],
                route=r[4],
                request=json.loads(r[5]),
                calling_ae=r[6],
                received_at=r[7],
                state=r[8],
                attempts=r[9],
            )
            for r in rows
            if r[0] not in exclude
        ]

    def waiting_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM instances WHERE state = 'waiting'")[0][0])

    def analysed(self, source_uid: str, results: Sequence[Result], destinations: Sequence[str]) -> None:
        """Commit an instance's results and one pending delivery per destination, then drop the received file."""
        self.enqueue(source_uid, results, destinations, instance_done=True)
        with contextlib.suppress(FileNotFoundError):
            self.instance_path(source_uid).unlink()

    def enqueue(
        self, source_uid: str, results: Sequence[Result], destinations: Sequence[str], *, instance_done: bool = False
    ) -> None:
        """Commit results and one pending delivery per destination (again for a known result: nothing changes)."""
        if not all(is_uid(result.sop_instance_uid) for result in results):
            raise ValueError("a result's SOP Instance UID is not a UID")
        known = {
            row[0]
            for result in results
            for row in self._query(
                "SELECT sop_instance_uid FROM results WHERE sop_instance_uid = ?", (result.sop_instance_uid,)
            )
        }
        results = [result for result in results if result.sop_instance_uid not in known]
        for result in results:
            write_durable(self.result_path(result.sop_instance_uid), result.data)
        now = time.time()
        with self._transaction() as db:
            for result in results:
                db.execute(
                    "INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        result.sop_instance_uid,
                        source_uid,
                        result.kind,
                        result.sop_class_uid,
                        result.series_instance_uid,
                        result.study_instance_uid,
                        now,
                    ),
                )
                for destination in destinations:
                    db.execute(
                        "INSERT OR IGNORE INTO deliveries (result_uid, destination, state, next_at)"
                        " VALUES (?, ?, 'pending', ?)",
                        (result.sop_instance_uid, destination, now),
                    )
            if instance_done:
                db.execute("UPDATE instances SET state = 'done', error = '' WHERE sop_instance_uid = ?", (source_uid,))

    def retry_instance(self, source_uid: str, *, attempts: int, next_at: float, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE instances SET attempts = ?, next_at = ?, error = ? WHERE sop_instance_uid = ?",
                (attempts, next_at, error, source_uid),
            )

    def fail_instance(self, source_uid: str, reason: dict[str, Any]) -> Path:
        """Move a received instance the gateway will not analyse into quarantine, with its reason."""
        source = self.instance_path(source_uid)
        base = self._quarantine_name(source_uid)
        with contextlib.suppress(FileNotFoundError):
            os.replace(source, f"{base}.dcm")
        write_durable(Path(f"{base}.json"), json.dumps(reason, indent=2, sort_keys=True).encode())
        with self._transaction() as db:
            db.execute(
                "UPDATE instances SET state = 'failed', error = ? WHERE sop_instance_uid = ?",
                (str(reason.get("reason", "")), source_uid),
            )
        return Path(f"{base}.dcm")

    def quarantine(self, data: bytes, reason: dict[str, Any], *, uid: str = "") -> Path:
        """Keep a received object that was refused (it cannot be parsed, say) with its reason beside it."""
        base = self._quarantine_name(uid if is_uid(uid) else "")
        write_durable(Path(f"{base}.dcm"), data)
        write_durable(Path(f"{base}.json"), json.dumps(reason, indent=2, sort_keys=True).encode())
        return Path(f"{base}.dcm")

    def _quarantine_name(self, uid: str) -> str:
        """A fresh base name (no suffix: UIDs are full of dots) for a quarantined object and its reason."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return str(self.quarantine_dir / f"{stamp}-{uid or 'unknown'}-{uuid.uuid4().hex[:8]}")

    # Deliveries ---------------------------------------------------------------------------------

    def due_deliveries(self, *, now: float, destinations: Sequence[str]) -> list[Delivery]:
        if not destinations:
            return []
        marks = ",".join("?" for _ in destinations)
        rows = self._query(
            "SELECT d.result_uid, d.destination, d.attempts, r.kind, r.source_uid FROM deliveries d"
            " JOIN results r ON r.sop_instance_uid = d.result_uid"
            f" WHERE d.state = 'pending' AND d.next_at <= ? AND d.destination IN ({marks})"
            " ORDER BY d.next_at, r.created_at",
            (now, *destinations),
        )
        return [Delivery(*row) for row in rows]

    def next_delivery_at(self, destinations: Sequence[str]) -> float | None:
        if not destinations:
            return None
        marks = ",".join("?" for _ in destinations)
        rows = self._query(
            f"SELECT MIN(next_at) FROM deliveries WHERE state = 'pending' AND destination IN ({marks})",
            tuple(destinations),
        )
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    def sent(self, delivery: Delivery) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'sent', attempts = attempts + 1, error = '', done_at = ?"
                " WHERE result_uid = ? AND destination = ? AND state = 'pending'",
                (time.time(), delivery.result_uid, delivery.destination),
            )
        self._drop_if_delivered(delivery.result_uid)

    def retry_delivery(self, delivery: Delivery, *, next_at: float, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET attempts = attempts + 1, next_at = ?, error = ?"
                " WHERE result_uid = ? AND destination = ? AND state = 'pending'",
                (next_at, error, delivery.result_uid, delivery.destination),
            )

    def refuse(self, delivery: Delivery, *, error: str) -> Path:
        """A destination refused this result for good (or too often): a copy goes to refused/ for an operator."""
        folder = self.refused_dir / safe_name(delivery.destination)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{delivery.result_uid}.dcm"
        source = self.result_path(delivery.result_uid)
        with contextlib.suppress(FileNotFoundError):
            write_durable(target, source.read_bytes())
        reason = {
            "destination": delivery.destination,
            "result_sop_instance_uid": delivery.result_uid,
            "source_sop_instance_uid": delivery.source_uid,
            "kind": delivery.kind,
            "attempts": delivery.attempts + 1,
            "error": error,
            "refused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_durable(folder / f"{delivery.result_uid}.json", json.dumps(reason, indent=2, sort_keys=True).encode())
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET state = 'refused', attempts = attempts + 1, error = ?, done_at = ?"
                " WHERE result_uid = ? AND destination = ? AND state = 'pending'",
                (error, time.time(), delivery.result_uid, delivery.destination),
            )
        self._drop_if_delivered(delivery.result_uid)
        return target

    def _drop_if_delivered(self, result_uid: str) -> None:
        rows = self._query("SELECT COUNT(*) FROM deliveries WHERE result_uid = ? AND state = 'pending'", (result_uid,))
        if rows[0][0] == 0:
            with contextlib.suppress(FileNotFoundError):
                self.result_path(result_uid).unlink()

    # Start-up and inspection --------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """Tidy what a crash left: result files never committed, received files of analysed instances."""
        known = {row[0] for row in self._query("SELECT sop_instance_uid FROM results")}
        delivered = {
            row[0]
            for row in self._query(
                "SELECT result_uid FROM deliveries GROUP BY result_uid HAVING SUM(state = 'pending') = 0"
            )
        }
        orphans = 0
        for path in self.results_dir.glob("*.dcm"):
            # Kept: results with deliveries pending, and results made while no destination was configured.
            if path.stem not in known or path.stem in delivered:
                path.unlink()
                orphans += 1
        for path in self.results_dir.glob(".partial-*"):
            path.unlink()
        for path in self.store_dir.glob(".partial-*"):
            path.unlink()
        finished = 0
        for (uid,) in self._query("SELECT sop_instance_uid FROM instances WHERE state IN ('done', 'failed')"):
            path = self.instance_path(uid)
            if path.exists():
                path.unlink()
                finished += 1
        missing = 0
        for (uid,) in self._query("SELECT sop_instance_uid FROM instances WHERE state = 'waiting'"):
            if not self.instance_path(uid).exists():  # cannot happen unless removed by hand: say so, do not retry
                with self._transaction() as db:
                    db.execute(
                        "UPDATE instances SET state = 'failed', error = 'file missing' WHERE sop_instance_uid = ?",
                        (uid,),
                    )
                missing += 1
        return {"orphan_results": orphans, "finished_inputs": finished, "missing_inputs": missing}

    def counts(self) -> dict[str, int]:
        """Instances by state and deliveries by state (``instances_waiting``, ``deliveries_sent``, ...)."""
        found: dict[str, int] = {}
        for state, count in self._query("SELECT state, COUNT(*) FROM instances GROUP BY state"):
            found[f"instances_{state}"] = int(count)
        for state, count in self._query("SELECT state, COUNT(*) FROM deliveries GROUP BY state"):
            found[f"deliveries_{state}"] = int(count)
        return found

    def pending_by_destination(self) -> dict[str, int]:
        rows = self._query("SELECT destination, COUNT(*) FROM deliveries WHERE state = 'pending' GROUP BY destination")
        return {str(a): int(b) for a, b in rows}

    def deliveries_of(self, destination: str) -> list[tuple[str, str, int]]:
        """(result UID, state, attempts) of every delivery to ``destination``."""
        rows = self._query(
            "SELECT result_uid, state, attempts FROM deliveries WHERE destination = ? ORDER BY result_uid",
            (destination,),
        )
        return [(str(a), str(b), int(c)) for a, b, c in rows]

    def results_of(self, source_uid: str) -> list[tuple[str, str]]:
        """(result UID, kind) of the results built for one received instance."""
        rows = self._query("SELECT sop_instance_uid, kind FROM results WHERE source_uid = ?", (source_uid,))
        return [(str(a), str(b)) for a, b in rows]
