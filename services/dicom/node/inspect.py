"""Whether a received object parses, and the few header values routing needs (pure: no network, no files).

The whole data set is parsed (every element converted, sequences walked), so an object that would
fail later fails here, while the sender still waits for its C-STORE answer. A Deflated data set is
inflated with the ingest bound first (pydicom would inflate it without one). Header values are
returned for routing only: callers log UIDs, never these values.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from services.dicom.node.spool import is_uid
from services.imaging.errors import IngestError
from services.imaging.ingest.dicom_codec import DEFLATED, inflate_dicom, scan_file_meta
from services.imaging.ingest.quiet import quiet
from services.imaging.limits import IngestLimits

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_UNDEFINED_LENGTH = 0xFFFFFFFF
_IDENTITY = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class Unreadable(ValueError):
    """The object cannot be parsed (C-STORE 0xC210). The message names the failure, never a value."""


class Mismatch(ValueError):
    """The object parses but its SOP class or instance UID differs from the request's (C-STORE 0xA900)."""


@dataclass(frozen=True)
class Inspected:
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    header: dict[str, str]  # keyword -> value as text, for routing only


def _walk(ds: Dataset) -> None:
    """Convert every raw element (pydicom converts lazily; a bad VR or value raises here, not later).

    pydicom keeps a value that the end of the data cut short (a truncated Pixel Data, say) without a
    word: an element holding fewer bytes than its length says is refused here.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if (
            isinstance(raw, RawDataElement)
            and raw.value is not None
            and raw.length != _UNDEFINED_LENGTH
            and len(raw.value) < raw.length
        ):
            raise Unreadable(f"element {tag} is cut short: the data set is truncated")
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _walk(item)


def _text(value: object) -> str:
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def inspect_part10(
    data: bytes,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    keywords: Iterable[str],
    limits: IngestLimits,
) -> Inspected:
    """Parse a received Part 10 object; :class:`Unreadable` or :class:`Mismatch` when it cannot be kept."""
    with quiet():
        try:
            meta_end, transfer_syntax, span = scan_file_meta(data)
            if transfer_syntax == DEFLATED and span is not None:
                data = inflate_dicom(data, meta_end, span, limits)
        except IngestError as exc:
            raise Unreadable(f"the file meta information or the deflated data set cannot be read ({exc})") from None
        try:
            ds = pydicom.dcmread(io.BytesIO(data))
            _walk(ds)
        except Unreadable:
            raise
        except Exception as exc:  # pydicom raises many types on malformed input; none may leave as is
            raise Unreadable(f"the data set cannot be parsed ({type(exc).__name__})") from None
        if len(ds) == 0:
            raise Unreadable("the data set is empty")
        if "Rows" in ds and not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
            # pydicom drops a Pixel Data element cut short by the end of the data.
            raise Unreadable("the image has no pixel data (the data set may be truncated)")
        found = {keyword: _text(ds.get(keyword, "")).strip() for keyword in _IDENTITY}
        header = {keyword: _text(ds.get(keyword, "")) for keyword in keywords if keyword not in _PIXEL_KEYWORDS}
    missing = [keyword for keyword in _IDENTITY if not is_uid(found[keyword])]
    if missing:  # what a garbled data set looks like once pydicom has read what it could
        raise Unreadable(f"missing or invalid {', '.join(missing)}: the data set is corrupt or incomplete")
    if found["SOPInstanceUID"] != sop_instance_uid or found["SOPClassUID"] != sop_class_uid:
        raise Mismatch("the data set's SOP class or instance UID differs from the C-STORE request's")
    header.update(found)
    return Inspected(
        sop_class_uid=found["SOPClassUID"],
        sop_instance_uid=found["SOPInstanceUID"],
        series_instance_uid=found["SeriesInstanceUID"],
        study_instance_uid=found["StudyInstanceUID"],
        header=header,
    )
