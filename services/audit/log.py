"""The audit trail's writer: append-only JSON Lines, one file per UTC day, every line on disk before the caller goes on.

Each batch of lines is one ``os.write`` on an ``O_APPEND`` descriptor followed by ``os.fsync``: a
line is never torn by a concurrent writer (several gateway worker processes append to the same
day's file) and is on disk when :meth:`AuditLog.record` returns. Writes run on one dedicated thread,
never on the event loop; lines that arrive while a write is in progress go out together in the next
one (group commit), so a burst of calls costs one fsync rather than one each. Files are 0600 in a
0700 directory. The optional syslog mirror is best effort; the file is the record.

Every line is hash-chained to the one before it (``chain.py``: SHA-256, or HMAC-SHA256 under
``security.audit_hmac_key_file``). The link is computed under an exclusive ``flock`` on the file,
from the file's actual last line, so writers in several processes (and several logs in one process:
the lock belongs to each log's own open file, never shared across a fork) keep one chain; a writer
reads the tail only when someone else wrote since its own last write (same inode and size: the link
it computed then is still the last). A restart continues from the last line on disk; a torn last
line (a crash mid-write) is ended with a newline and followed by an Audit Recording Started /
``DATA_LOSS`` event that starts the chain again and pins the torn bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

from services.audit.chain import AuditKeyError, Digest, Link, after, last_lines, load_key, seal
from services.audit.events import (
    Application,
    AuditEvent,
    AuditSource,
    Outcome,
    application_activity,
    audit_restarted,
    utc_now,
)
from services.audit.syslog import SyslogMirror
from services.settings import SecuritySettings

log = logging.getLogger("medgate.audit")

SITE = "medgate"
FILE_MODE = 0o600
DIR_MODE = 0o700


class AuditWriteError(OSError):
    """The event could not be made durable: the caller must not release the data it is about."""


def day_file(event: AuditEvent) -> str:
    """``audit-YYYYMMDD.jsonl`` of the event's UTC day."""
    return f"audit-{event.time.astimezone(UTC):%Y%m%d}.jsonl"


class AuditLog:
    """Append-only audit files under ``directory``; ``await record(event)`` returns once the line is fsynced.

    >>> audit = AuditLog(Path("var/audit"), application="medgate-gateway")  # doctest: +SKIP
    >>> await audit.record(application_activity(audit.application, start=True))  # doctest: +SKIP
    """

    def __init__(
        self, directory: Path, *, application: str, syslog: str = "", host: str | None = None, key: bytes | None = None
    ) -> None:
        self.directory = Path(directory)
        self.digest = Digest(key)
        host = host or socket.gethostname()
        self.application = Application(name=application, host=host, pid=os.getpid())
        self.source = AuditSource(site=SITE, host=host)
        self.syslog = SyslogMirror(syslog, hostname=host, app_name=application) if syslog else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="medgate-audit")
        self._lock = threading.Lock()
        self._pending: list[tuple[AuditEvent, Future[None]]] = []
        self._fd = -1
        self._fd_name = ""
        self._next: tuple[str, int, int, Link] | None = None  # (file, inode, size) after our last write; the next link
        self._closed = False

    @classmethod
    def from_settings(cls, security: SecuritySettings, *, application: str) -> AuditLog:
        """The audit trail of ``security.audit_dir`` (``audit_syslog``, ``audit_hmac_key_file`` when set).

        A key file that cannot be used raises :class:`AuditWriteError`: a server that cannot chain does not start.
        """
        key = None
        if security.audit_hmac_key_file:
            try:
                key = load_key(Path(security.audit_hmac_key_file))
            except AuditKeyError as exc:
                raise AuditWriteError(f"security.audit_hmac_key_file: {exc}") from None
        return cls(security.audit_dir, application=application, syslog=security.audit_syslog, key=key)

    def body(self, event: AuditEvent) -> bytes:
        """The event as one JSON object (UTF-8, no spaces, no newline), before it is chained."""
        return json.dumps(event.as_json(self.source), ensure_ascii=False, separators=(",", ":")).encode()

    def submit(self, event: AuditEvent) -> Future[None]:
        """Queue ``event``; the future is done once it is fsynced (or holds the :class:`AuditWriteError`)."""
        done: Future[None] = Future()
        with self._lock:
            if self._closed:
                done.set_exception(AuditWriteError("the audit log is closed"))
                return done
            self._pending.append((event, done))
        try:
            self._executor.submit(self._drain)
        except RuntimeError as exc:  # the executor was shut down under us
            done.set_exception(AuditWriteError(f"the audit log is closed: {exc}"))
        return done

    async def record(self, event: AuditEvent) -> None:
        """Write ``event`` durably, off the event loop; raises :class:`AuditWriteError` if it could not be."""
        await asyncio.wrap_future(self.submit(event))

    def check(self) -> None:
        """Open today's file now (directory and modes included); raises :class:`AuditWriteError` if it cannot be."""
        name = f"audit-{utc_now():%Y%m%d}.jsonl"
        try:
            self._executor.submit(self._open, name).result()
        except OSError as exc:
            log.critical("AUDIT TRAIL UNAVAILABLE: %s (%s: %s)", self.directory, type(exc).__name__, exc)
            raise AuditWriteError(f"the audit trail in {self.directory} cannot be written: {exc}") from exc

    async def application_started(self) -> None:
        """Application Start; raises if it cannot be written (a server that cannot audit must not serve)."""
        await self.record(application_activity(self.application, start=True))

    async def application_stopped(self) -> None:
        """Application Stop, then :meth:`close`; a failure is logged (the service is going away regardless)."""
        with contextlib.suppress(AuditWriteError):
            await self.record(application_activity(self.application, start=False))
        self.close()

    def write(self, event: AuditEvent) -> None:
        """Blocking :meth:`record`, for command-line tools without an event loop."""
        self.submit(event).result()

    def close(self) -> None:
        """Write what is queued, then release the file (later events are refused)."""
        with self._lock:
            self._closed = True
        self._executor.shutdown(wait=True)
        self._drain()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.syslog is not None:
            self.syslog.close()

    # Everything below runs on the audit thread (or in close(), after that thread is gone).

    def _drain(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        by_day: dict[str, list[tuple[AuditEvent, Future[None]]]] = {}
        for item in batch:
            by_day.setdefault(day_file(item[0]), []).append(item)
        for name, items in by_day.items():
            try:
                written = self._append(name, [event for event, _ in items])
            except Exception as exc:
                log.critical(
                    "AUDIT WRITE FAILED: %d event(s) not recorded in %s (%s: %s)",
                    len(items), self.directory / name, type(exc).__name__, exc,
                )  # fmt: skip
                failure = exc if isinstance(exc, AuditWriteError) else AuditWriteError(f"{type(exc).__name__}: {exc}")
                for _, done in items:
                    done.set_exception(failure)
                continue
            for _, done in items:
                done.set_result(None)
            if self.syslog is not None:  # chained lines: the collector's copy can be checked against the file
                for event, line in written:
                    self.syslog.send(line.rstrip(b"\n"), event.time, failed=event.outcome is not Outcome.SUCCESS)

    def _append(self, name: str, events: list[AuditEvent]) -> list[tuple[AuditEvent, bytes]]:
        """Chain ``events`` onto the file's last line and write them in one ``write``, under the file's lock."""
        bodies = [self.body(event) for event in events]  # outside the lock: the JSON is most of the work
        fd = self._open(name)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            info = os.fstat(fd)
            mine = self._next
            if mine is not None and mine[:3] == (name, info.st_ino, info.st_size):
                link = mine[3]  # nobody wrote since we did: our last line is the last line
            else:
                before, tail = last_lines(fd, info.st_size)
                link = after(tail, name, self.digest, before)
            torn = link.torn
            if torn:  # a write cut short before ours: say so in the trail, chained after the torn bytes
                log.critical(
                    "AUDIT FILE %s ENDED IN A TORN RECORD; recorded and chained after it", self.directory / name
                )
                restart = audit_restarted(self.application)
                events, bodies = [restart, *events], [self.body(restart), *bodies]
            lines = []
            for body in bodies:
                line, link = seal(body, link, self.digest)
                lines.append(line)
            data = (b"\n" if torn else b"") + b"".join(lines)  # the torn line ends; ours start on a line of their own
            written = os.write(fd, data)
            if written != len(data):  # disk full mid-write: a torn line, which the next write records
                self._next = None
                raise AuditWriteError(f"short write: {written} of {len(data)} bytes")
            self._next = (name, info.st_ino, info.st_size + len(data), link)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.fsync(fd)  # after the lock: the next writer reads our line from the page cache either way
        return list(zip(events, lines, strict=True))

    def _open(self, name: str) -> int:
        if self._fd >= 0 and self._fd_name == name:
            if os.fstat(self._fd).st_nlink > 0:
                return self._fd
            # Someone removed the file under us: lines written to it now would be lost with the inode.
            log.critical("AUDIT FILE REMOVED: %s; starting it again", self.directory / name)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._ensure_directory()
        path = self.directory / name
        created = not path.exists()
        # Read as well as appended to: the chain's next link is computed from the file's last line.
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            if os.fstat(fd).st_mode & 0o777 != FILE_MODE:
                os.fchmod(fd, FILE_MODE)
            if created:  # the new name must survive a crash as well as the lines in it
                _fsync_directory(self.directory)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._fd_name = fd, name
        return fd

    def _ensure_directory(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if self.directory.stat().st_mode & 0o777 != DIR_MODE:
            os.chmod(self.directory, DIR_MODE)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
