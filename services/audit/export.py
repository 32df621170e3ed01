"""The Export event of ``medgate review export-manifest``: who ran it (the local OS user) and which flow and loops left.

The export runs outside any server, so the command records it itself. Fail closed as far as a
command can: the audit file is opened before anything is exported (a trail that cannot be written
stops the export before any case leaves); the event itself is written once the manifest exists,
naming its loops, and if that write fails the command fails loudly.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.audit.events import export_event
from services.audit.log import AuditLog
from services.settings import SecuritySettings

_JOB_PREFIX = "a2i/"


def os_user() -> str:
    """The login name running the command; the numeric uid where there is no name (a container's user)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def manifest_loops(manifest: Path) -> tuple[str, ...]:
    """The human loops an augmented manifest holds: each line's ``<attribute>-metadata`` names ``a2i/<loop>``."""
    loops: list[str] = []
    for line in manifest.read_text().splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        for key, value in entry.items():
            job = value.get("job-name", "") if key.endswith("-metadata") and isinstance(value, dict) else ""
            if isinstance(job, str) and job.startswith(_JOB_PREFIX):
                loops.append(job[len(_JOB_PREFIX) :])
    return tuple(loops)


@dataclass
class Export:
    """Tell it where the manifest went (:meth:`done`); the event is written when the ``with`` block ends."""

    manifest: Path | None = None
    loops: tuple[str, ...] = field(default_factory=tuple)

    def done(self, manifest: Path) -> None:
        self.manifest = manifest
        self.loops = manifest_loops(manifest)


@contextlib.contextmanager
def audited_export(security: SecuritySettings, flow: str) -> Iterator[Export]:
    """Record one Export event for the block: OK with its loops, or the failure's status with none.

    >>> with audited_export(settings.security, "lesion-detection") as export:  # doctest: +SKIP
    ...     export.done(export_manifest(store, flow, out))
    """
    audit = AuditLog.from_settings(security, application="medgate-cli")
    try:
        audit.check()  # before any case leaves: an export that cannot be audited does not start
        export = Export()
        try:
            yield export
        except BaseException as exc:
            status = "CANCELLED" if isinstance(exc, KeyboardInterrupt) else "INTERNAL"
            status = "INVALID_ARGUMENT" if isinstance(exc, ValueError) else status
            with contextlib.suppress(OSError):  # the export's own error is the one to report
                audit.write(export_event(audit.application, os_user=os_user(), flow=flow, loops=(), status=status))
            raise
        audit.write(export_event(audit.application, os_user=os_user(), flow=flow, loops=export.loops))
    finally:
        audit.close()
