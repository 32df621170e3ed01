"""Files written whole or not at all: a temporary file beside the target, fsynced, renamed, the folder fsynced."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a rename into it) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, *, temporary_prefix: str = ".partial-") -> None:
    """``data`` at ``path``, complete or not at all, on disk when this returns.

    The temporary file is named ``temporary_prefix`` + random in ``path``'s folder; a crash can leave one
    behind (never ``path`` half written), for the owner of the folder to clear at start-up.
    """
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)
