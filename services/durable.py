"""Files written whole or not at all: a temporary file beside the target, fsynced, renamed, the folder fsynced."""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` (a rename into it) survive a power cut."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes, *, temporary_prefix: str = ".partial-", mode: int | None = None) -> None:
    """``data`` at ``path``, complete or not at all, on disk when this returns.

    The temporary file is named ``temporary_prefix`` + random in ``path``'s folder; a crash can leave one
    behind (never ``path`` half written), for the owner of the folder to clear at start-up.
    ``mode``: None keeps mkstemp's 0600 (spooled patient data); a number is created less the umask, as
    ``open()`` does (0o666 for files other users or tools read).
    """
    if mode is None:
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix)
    else:
        temporary = str(path.with_name(f"{temporary_prefix}{uuid.uuid4().hex}"))
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
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
