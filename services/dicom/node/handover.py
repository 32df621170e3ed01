"""Objects built elsewhere, sent on by the node like its own results: a drop folder in the node's outbox.

The review service's verified results (``services.dicom.results.build_verified_results``, when a human
loop completes) are the first user: it calls :func:`hand_over` with the built objects, and the node
picks each file up (at its next scheduler pass), records one delivery per destination in its ledger
and removes the file. Each file is written whole or not at all (temporary name, fsync, rename), and the
ledger is keyed by SOP Instance UID and destination, so handing the same object over twice sends it once.
No pynetdicom here: the caller may be another process on the same host that only shares the folder.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import pydicom

from services.dicom.node.spool import is_uid, write_durable
from services.imaging.ingest.quiet import quiet

INBOX = "inbox"


class PartTen(Protocol):
    """What :func:`hand_over` needs of an object (``services.dicom.results.DicomResult`` has it)."""

    @property
    def data(self) -> bytes: ...

    @property
    def sop_instance_uid(self) -> str: ...


def inbox_dir(outbox_dir: Path) -> Path:
    return Path(outbox_dir) / INBOX


def hand_over(objects: Iterable[PartTen], outbox_dir: Path) -> list[Path]:
    """Put each Part 10 object in the node's inbox under ``outbox_dir`` (``dicom.outbox_dir``); durable on return."""
    folder = inbox_dir(outbox_dir)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item in objects:
        if not is_uid(item.sop_instance_uid):
            raise ValueError("a handed-over object needs its SOP Instance UID")
        target = folder / f"{item.sop_instance_uid}.dcm"
        write_durable(target, item.data)
        written.append(target)
    return written


def read_identity(data: bytes) -> dict[str, str]:
    """SOP class and instance, series and study UIDs and the Modality of a Part 10 object (header only)."""
    with quiet():
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    found = {
        keyword: str(ds.get(keyword, "")).strip()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality")
    }
    if not all(is_uid(found[k]) for k in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")):
        raise ValueError("the object lacks its UIDs")
    return found
