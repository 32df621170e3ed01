"""Cases bound for the review service, kept on disk until it takes them.

When the gateway cannot reach the review service, an unsure case must not be dropped: its
StartHumanLoop request is written here (atomically, fsynced) and sent again until accepted.
Starting a loop is idempotent by name, so a case sent twice (by two workers, or again after a
timeout that did reach the service) opens one loop. Requests the service refuses for good (an
unknown flow, say) move to ``refused/`` for an operator, never deleted.

An entry holds either a complete request (:func:`unpack` gives it back as it is: what every gateway wrote
before the compact form, and still writes once a delivery has built the complete request) or, in the compact
form :func:`pack` writes on the caller's path, the request without its review images beside the smaller of
what they are made from: the caller's own encoded image (``IMAGE_INPUT``, a serialized ``ImageInput``) or the
8-bit model image's raw pixels (``IMAGE_MODEL``). The gateway's sender rebuilds the images before sending, so
the review service only ever receives complete requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from services.durable import write_durable

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SUFFIX = ".pending"

# A complete entry is a serialized StartHumanLoopRequest, which starts with its name's tag (0x0A): never this.
MAGIC = b"\x89medgate-outbox\x02\n"
IMAGE_INPUT = "input"  # ``data``: a serialized medgate.v1.ImageInput (the caller's encoded file and its options)
IMAGE_MODEL = "model"  # ``data``: the 8-bit model image, row-major uint8 of ``shape``
_LENGTHS = struct.Struct(">II")


@dataclass(frozen=True)
class Kept:
    """What one outbox entry holds: ``request`` (a serialized StartHumanLoopRequest) and, in the compact form,
    what its review images are rebuilt from (``image`` names which; empty for a complete request)."""

    request: bytes
    image: str = ""
    shape: tuple[int, ...] = ()
    data: bytes = b""


def pack(kept: Kept) -> bytes:
    """The compact form of ``kept`` (or its request alone when it is complete), for :meth:`Outbox.put`."""
    if not kept.image:
        return kept.request
    if kept.image not in (IMAGE_INPUT, IMAGE_MODEL):
        raise ValueError(f"unknown outbox image form {kept.image!r}")
    header = json.dumps({"image": kept.image, "shape": list(kept.shape)}).encode()
    return b"".join((MAGIC, _LENGTHS.pack(len(header), len(kept.request)), header, kept.request, kept.data))


def unpack(payload: bytes) -> Kept:
    """An entry as :func:`pack` wrote it; anything without the compact form's mark is a complete request.

    Raises ValueError for a compact entry that is cut short or malformed (never written whole by this module).
    """
    if not payload.startswith(MAGIC):
        return Kept(payload)
    start = len(MAGIC) + _LENGTHS.size
    if len(payload) < start:
        raise ValueError("outbox entry cut short")
    header_size, request_size = _LENGTHS.unpack_from(payload, len(MAGIC))
    if len(payload) < start + header_size + request_size:
        raise ValueError("outbox entry cut short")
    try:
        header = json.loads(payload[start : start + header_size])
        image, shape = str(header["image"]), tuple(int(n) for n in header["shape"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"outbox entry header unreadable ({type(exc).__name__})") from None
    if image not in (IMAGE_INPUT, IMAGE_MODEL):
        raise ValueError(f"unknown outbox image form {image!r}")
    body = start + header_size
    return Kept(payload[body : body + request_size], image, shape, payload[body + request_size :])


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
