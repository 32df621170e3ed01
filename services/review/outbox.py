"""Cases bound for the review service, kept on disk until it takes them.

When the gateway cannot reach the review service, an unsure case must not be dropped: its
StartHumanLoop request is written here (atomically, fsynced) and sent again until accepted.
Starting a loop is idempotent by name, so a case sent twice (by two workers, or again after a
timeout that did reach the service) opens one loop. Requests the service refuses for good (an
unknown flow, say) move to ``refused/`` for an operator, never deleted.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from services.durable import write_durable

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".pending"


class OutboxFull(RuntimeError):
    """The outbox holds ``max_bytes`` already; the case cannot be kept."""


@dataclass(frozen=True)
class Pending:
    name: str
    path: Path


class Outbox:
    """One file per loop name under ``directory``; safe to share between gateway worker processes."""

    def __init__(self, directory: Path, *, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.refused_dir = self.directory / "refused"
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def put(self, name: str, payload: bytes) -> Path:
        """Keep ``payload`` under ``name`` (replacing an older copy); durable when this returns."""
        if not _NAME.match(name):
            raise ValueError(f"outbox name {name!r} is not a plain loop name")
        if self.held_bytes() + len(payload) > self.max_bytes:
            raise OutboxFull(f"review outbox {self.directory} holds its limit of {self.max_bytes} bytes")
        target = self.directory / f"{name}{SUFFIX}"
        write_durable(target, payload, temporary_prefix=".incoming-")
        return target

    def pending(self) -> list[Pending]:
        """Oldest first."""
        entries = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                entries.append((path.stat().st_mtime, Pending(path.name[: -len(SUFFIX)], path)))
        return [entry for _, entry in sorted(entries, key=lambda item: item[0])]

    def read(self, entry: Pending) -> bytes | None:
        """The payload, or None when another worker has sent it meanwhile."""
        try:
            return entry.path.read_bytes()
        except FileNotFoundError:
            return None

    def done(self, entry: Pending) -> None:
        with contextlib.suppress(FileNotFoundError):
            entry.path.unlink()

    def refuse(self, entry: Pending) -> None:
        """Set aside a request the service will never take, for an operator to look at."""
        self.refused_dir.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(entry.path, self.refused_dir / entry.path.name)

    def held_bytes(self) -> int:
        total = 0
        for path in self.directory.glob(f"*{SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total
