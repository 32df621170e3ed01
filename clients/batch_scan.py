"""``medgate batch``, finding files: recognised by content, keyed for resume, grouped by study and series.

DICOM is recognised by its preamble or, without one, by a data set that parses and holds UIDs;
PNG and JPEG by magic number, through ingest's own :func:`~services.imaging.ingest.sniff`. The
grouping UIDs come from the header alone (:func:`~services.imaging.ingest.read_dicom_identity`).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.imaging.ingest import HEAD_BYTES, DicomIdentity, InputKind, may_be_bare_dicom, read_dicom_identity, sniff

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Local failures get names in the spirit of the gRPC codes the gateway uses for its own.
UNREADABLE = "UNREADABLE"
NOT_AN_IMAGE = "INVALID_ARGUMENT"
# What the gateway takes and the batch sends (volumes are left to single calls).
_SENT = {InputKind.DICOM: "DICOM", InputKind.PNG: "PNG", InputKind.JPEG: "JPEG"}


@dataclass(frozen=True)
class Item:
    """One input file: how it was recognised, its stable key, its group and where its outputs go."""

    path: Path
    name: str  # relative to the batch root, POSIX separators: what reports show
    kind: str  # "DICOM", "PNG" or "JPEG"
    key: str  # request_id and resume key
    study: str
    series: str
    output: str  # output stem relative to OUT, POSIX separators
    error: tuple[str, str] | None = None  # (code, message) when the file failed before sending


@dataclass
class Discovery:
    items: list[Item]
    duplicates: list[tuple[Item, Item]]  # (duplicate, the first file with the same key)
    ignored: int  # files that are neither DICOM, PNG nor JPEG (folder scans only)


def _sniff_kind(head: bytes) -> str | None:
    """DICOM, PNG or JPEG from the first bytes; "BARE?" when it may be a DICOM data set without preamble."""
    kind = sniff(head)
    if kind is None and may_be_bare_dicom(head):
        return "BARE?"
    return _SENT.get(kind) if kind is not None else None


def _safe(text: str, limit: int = 96) -> str:
    cleaned = _SAFE_NAME.sub("_", text).strip("._") or "_"
    return cleaned[:limit]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(inputs: Sequence[Path], out: Path) -> Iterator[tuple[Path, bool]]:
    """(file, named explicitly) once each, in a stable order; OUT and hidden entries are skipped in folder scans."""
    out_resolved = out.resolve()
    named = {p.resolve() for p in inputs if not p.is_dir()}
    seen: set[Path] = set()

    def once(path: Path) -> Iterator[tuple[Path, bool]]:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield path, resolved in named

    for given in inputs:
        if not given.is_dir():
            yield from once(given)
            continue
        for folder, dirs, files in os.walk(given):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != out_resolved)
            for name in sorted(files):
                if not name.startswith("."):
                    yield from once(here / name)


def batch_root(inputs: Sequence[Path]) -> Path:
    """The folder that reported paths are relative to: the common parent of every input."""
    resolved = [p.resolve() for p in inputs]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    return common.parent if len(resolved) == 1 and not resolved[0].is_dir() else common


def discover(inputs: Sequence[Path], out: Path) -> Discovery:
    """Recognise and group every file under ``inputs`` by content, in a stable order."""
    root = batch_root(inputs)
    items: list[Item] = []
    first_by_key: dict[str, Item] = {}
    duplicates: list[tuple[Item, Item]] = []
    ignored = 0
    for path, explicit in _walk(inputs, out):
        absolute = path.resolve()
        try:
            name = absolute.relative_to(root).as_posix()
        except ValueError:
            name = absolute.as_posix().lstrip("/")
        folder = Path(name).parent.as_posix()
        pseudo_study = f"folder:{root.name}" + ("" if folder == "." else f"/{folder}")
        fallback_output = f"files/{name}"
        item: Item | None = None
        failure = (NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file")
        try:
            with absolute.open("rb") as handle:
                head = handle.read(HEAD_BYTES)
            kind = _sniff_kind(head)
            identity: DicomIdentity | None = None
            if kind in ("DICOM", "BARE?"):
                identity = read_dicom_identity(absolute, bare=kind == "BARE?")
                if kind == "BARE?":
                    kind = "DICOM" if identity is not None else None
            if kind is None:
                if not explicit:
                    ignored += 1
                    continue
            else:
                identity = identity or DicomIdentity()
                sop, study, series = (
                    identity.sop_instance_uid,
                    identity.study_instance_uid,
                    identity.series_instance_uid,
                )
                key = f"sop:{sop}" if sop else f"sha256:{_sha256(absolute)}"
                if kind == "DICOM" and sop and study:
                    output = f"{_safe(study)}/{_safe(series or 'no-series')}/{_safe(sop)}"
                    item = Item(path, name, kind, key, study, series, output)
                else:
                    item = Item(path, name, kind, key, study or pseudo_study, series, fallback_output)
        except OSError as exc:
            failure = (UNREADABLE, f"could not read the file ({type(exc).__name__})")
        if item is None:
            item = Item(path, name, "?", f"path:{name}", pseudo_study, "", fallback_output, failure)
        if item.key in first_by_key:
            duplicates.append((item, first_by_key[item.key]))
            continue
        first_by_key[item.key] = item
        items.append(item)
    return Discovery(items, duplicates, ignored)
