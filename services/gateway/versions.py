"""Which version of each role's Triton model answers: the versions file, settings pins, and the gateway's cached view.

The file (``versions.file``, JSON) holds per role the ``serving`` version, the ``candidate`` that shadows it,
and the ``history`` of versions that served before (``medgate models rollback`` goes back one). It is written
whole and renamed into place (:func:`write_versions`), so every gateway worker re-reading it sees the old
state or the new one; the workers re-read it at most every ``reload_interval_s`` and only when it changed.
A pin in settings (``versions.<role>``) wins over the file. Pure: no grpc.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.durable import write_durable

log = logging.getLogger("medgate.gateway.versions")


@dataclass
class RoleVersions:
    serving: str = ""
    candidate: str = ""
    history: list[str] = field(default_factory=list)  # earlier serving versions, the most recent last


class VersionsFileError(ValueError):
    """The versions file cannot be read as one (named in the message; no patient data is ever in it)."""


def _version(value: Any, where: str) -> str:
    text = str(value) if isinstance(value, int | str) else ""
    if text and not (text.isdigit() and int(text) > 0):
        raise VersionsFileError(f"{where} must be a positive version number, not {value!r}")
    if value not in ("", None) and not text:
        raise VersionsFileError(f"{where} must be a positive version number, not {value!r}")
    return text


def read_versions(path: Path) -> dict[str, RoleVersions]:
    """The file's state per role; {} when there is no file yet."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise VersionsFileError(f"versions file {path} cannot be read: {exc}") from None
    if not isinstance(raw, dict):
        raise VersionsFileError(f"versions file {path} must hold an object of roles")
    state: dict[str, RoleVersions] = {}
    for role, entry in raw.items():
        if not isinstance(entry, dict):
            raise VersionsFileError(f"versions file {path}: {role} must be an object")
        history = entry.get("history", [])
        if not isinstance(history, list):
            raise VersionsFileError(f"versions file {path}: {role}.history must be a list")
        state[role] = RoleVersions(
            serving=_version(entry.get("serving", ""), f"{role}.serving"),
            candidate=_version(entry.get("candidate", ""), f"{role}.candidate"),
            history=[_version(v, f"{role}.history") for v in history],
        )
    return state


def write_versions(path: Path, state: dict[str, RoleVersions]) -> None:
    """Write the whole state atomically and durably (:func:`services.durable.write_durable`), so a reader never
    sees half of it and a promotion survives a power cut; readable by other users as ``open()`` makes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({role: asdict(entry) for role, entry in sorted(state.items())}, indent=2) + "\n"
    write_durable(path, data.encode(), temporary_prefix=f".{path.name}.", mode=0o666)


class ServingVersions:
    """The gateway's view: the version each role's calls name, and the candidate to shadow, from pins and the file.

    ``loaded``: the highest version of each role Triton had when the gateway connected (the default).
    A file that cannot be read keeps the last good state (logged once per change), so a bad edit cannot
    take the gateway down or switch versions behind the operator's back.
    """

    def __init__(
        self, path: Path, pins: dict[str, str], *, reload_interval_s: float = 1.0, loaded: dict[str, str] | None = None
    ) -> None:
        self.path = path
        self.pins = dict(pins)
        self.reload_interval_s = reload_interval_s
        self.loaded = dict(loaded or {})
        self._state: dict[str, RoleVersions] = {}
        self._checked = -float("inf")
        self._stamp: tuple[int, int] | None = None
        self._bad_stamp: tuple[int, int] | None = None

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_interval_s:
            return
        self._checked = now
        try:
            stat = self.path.stat()
            stamp: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError:
            return
        if stamp == self._stamp:
            return
        try:
            state = read_versions(self.path)
        except VersionsFileError as exc:
            if stamp != self._bad_stamp:
                log.error("%s; the versions read before stay in use", exc)
                self._bad_stamp = stamp
            return
        if state != self._state:
            log.info(
                "model versions from %s: %s",
                self.path,
                ", ".join(f"{r} serving {e.serving or '-'} candidate {e.candidate or '-'}" for r, e in state.items())
                or "none",
            )
        self._state, self._stamp = state, stamp

    def serving(self, role: str) -> str:
        """The version a call of ``role`` names: the pin, else the file's, else the one loaded at connect ('' = any)."""
        if role in self.pins:
            return self.pins[role]
        self._refresh()
        entry = self._state.get(role)
        if entry is not None and entry.serving:
            return entry.serving
        return self.loaded.get(role, "")

    def candidate(self, role: str) -> str:
        """The version to shadow ``role`` with ('' = none): the file's candidate, when it is not the serving one."""
        self._refresh()
        entry = self._state.get(role)
        if entry is None or not entry.candidate or entry.candidate == self.serving(role):
            return ""
        return entry.candidate
