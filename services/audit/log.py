"""The audit trail's writer: append-only JSON Lines, one file per UTC day, every line on disk before the caller goes on.

Each batch of lines is one ``os.write`` on an ``O_APPEND`` descriptor followed by ``os.fsync``: a
line is never torn by a concurrent writer (several gateway worker processes append to the same
day's file) and is on disk when :meth:`AuditLog.record` returns. Writes run on one dedicated thread,
never on the event loop; lines that arrive while a write is in progress go out together in the next
one (group commit), so a burst of calls costs one fsync rather than one each. Files are 0600 in a
0700 directory. The optional syslog mirror is best effort; the file is the record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

from services.audit.events import Application, AuditEvent, AuditSource, Outcome, application_activity, utc_now
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

    def __init__(self, directory: Path, *, application: str, syslog: str = "", host: str | None = None) -> None:
        self.directory = Path(directory)
        host = host or socket.gethostname()
        self.application = Application(name=application, host=host, pid=os.getpid())
        self.source = AuditSource(site=SITE, host=host)
        self.syslog = SyslogMirror(syslog, hostname=host, app_name=application) if syslog else None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="medgate-audit")
        self._lock = threading.Lock()
        self._pending: list[tuple[AuditEvent, Future[None]]] = []
        self._fd = -1
        self._fd_name = ""
        self._closed = False

    @classmethod
    def from_settings(cls, security: SecuritySettings, *, application: str) -> AuditLog:
        """The audit trail of ``security.audit_dir`` (and ``security.audit_syslog`` when set)."""
        return cls(security.audit_dir, application=application, syslog=security.audit_syslog)

    def line(self, event: AuditEvent) -> bytes:
        """The event as one JSON line (UTF-8, no spaces)."""
        return (json.dumps(event.as_json(self.source), ensure_ascii=False, separators=(",", ":")) + "\n").encode()

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
                lines = [self.line(event) for event, _ in items]
                self._append(name, b"".join(lines))
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
            if self.syslog is not None:
                for (event, _), line in zip(items, lines, strict=True):
                    self.syslog.send(line.rstrip(b"\n"), event.time, failed=event.outcome is not Outcome.SUCCESS)

    def _append(self, name: str, data: bytes) -> None:
        fd = self._open(name)
        written = os.write(fd, data)
        if written != len(data):  # disk full mid-write: the tail of the line is missing, readers skip it
            raise AuditWriteError(f"short write: {written} of {len(data)} bytes")
        os.fsync(fd)

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
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
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
