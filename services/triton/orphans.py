"""Files in /dev/shm left by processes that are gone (killed with SIGKILL), found by the owner's pid in their names."""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts: it may still use its files)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphans(directory: Path, owner: re.Pattern[str]) -> int:
    """Unlink the files of ``directory`` that ``owner`` matches with a pid (its group 1) no longer running."""
    removed = 0
    with contextlib.suppress(OSError):
        for path in directory.iterdir():
            match = owner.match(path.name)
            if match is None or pid_alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
    return removed
