"""The source instance's header, read again from the request's bytes (ingest keeps no patient data).

SEG and SR must copy the source's patient, study and equipment modules (that is correct DICOM), so
the builders need the header that :class:`~services.imaging.ingest.DecodedImage` deliberately does
not keep. It is read here without pixels, on the executor, and never logged: pydicom's and
highdicom's warnings and log records (which can quote values) are silenced while it is in use.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pydicom
from highdicom._standard_utils import is_multiframe_image  # by the IOD; no public name for it in highdicom 0.28
from pydicom.dataset import Dataset

from services.dicom.results.errors import DicomResultError
from services.imaging.ingest.dicom_attrs import uid
from services.imaging.ingest.guards import inflate
from services.imaging.ingest.quiet import quiet
from services.imaging.ingest.sniff import GZIP_MAGIC
from services.imaging.limits import IngestLimits

_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 attributes of the Patient and General Study modules that highdicom copies by name; a source
# without them (allowed of many images, common in secondary captures) gets them empty, as Type 2 allows.
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
_STATE = threading.local()


class _DropWhileBuilding(logging.Filter):
    """Drops highdicom's records on the building thread (they can quote header values); other threads log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_STATE, "active", False)


def _install_filters() -> None:
    names = {"highdicom"} | {n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] == "highdicom"}
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropWhileBuilding) for f in logger.filters):
            logger.addFilter(_DropWhileBuilding())


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """pydicom's and highdicom's warnings and logs off on this thread while a result is built."""
    _install_filters()
    previous = getattr(_STATE, "active", False)
    _STATE.active = True
    try:
        with quiet():
            yield
    finally:
        _STATE.active = previous


@dataclass(frozen=True)
class SourceFrame:
    """The source instance's header (no pixels) and the 0-based frame that was analysed."""

    dataset: Dataset
    frame: int

    @property
    def frames(self) -> int:
        value = self.dataset.get("NumberOfFrames", 1)
        try:
            return max(1, int(value or 1))
        except (TypeError, ValueError):
            return 1

    @property
    def multiframe(self) -> bool:
        """More than one frame in an IOD that has frames (a single-frame IOD stating NumberOfFrames 2 has no
        frame to reference: pydicom's SC_rgb_2frame.dcm)."""
        return self.frames > 1 and is_multiframe_image(self.dataset)

    @property
    def frame_numbers(self) -> list[int] | None:
        """DICOM's 1-based ReferencedFrameNumber for references into a multi-frame source, else None."""
        return [self.frame + 1] if self.multiframe else None

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    def single_frame_view(self) -> Dataset:
        """The header as if the source had only the analysed frame (for sources without a patient coordinate
        system, where highdicom builds one frame only); the builder adds the frame number to its references."""
        view = Dataset()
        view.update(self.dataset)  # a new element dict (copy.copy would share the source's), the same elements
        del view.NumberOfFrames  # a new element, not the shared one changed in place
        view.NumberOfFrames = 1
        if "SharedFunctionalGroupsSequence" not in view:
            # highdicom reads pixel measures from the shared functional groups of any multi-frame IOD, which
            # the classic ones (US and SC multi-frame) do not have: a stand-in without spacing, dropped after the build.
            shared = Dataset()
            shared.PixelMeasuresSequence = [Dataset()]
            view.SharedFunctionalGroupsSequence = [shared]
        return view


_PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as a little-endian data set writes it


def header_bytes(data: bytes) -> bytes:
    """``data`` cut just before its top-level Pixel Data: all that :func:`read_source` reads, a few KiB of a 7 MB image.

    What a routed case keeps for its verified DICOM result until the loop completes, so that the durable hand-off
    on the caller's path writes and fsyncs KiB instead of the whole image. Bytes it cannot cut safely (gzip, the
    deflated or a big-endian transfer syntax, no pixel data, a header that does not read) are returned whole.
    """
    if data[:2] == GZIP_MAGIC:
        return data
    bare = not (len(data) >= 132 and data[128:132] == b"DICM")
    stream = io.BytesIO(data)
    with quiet():
        try:
            dataset = pydicom.dcmread(stream, stop_before_pixels=True, force=bare)
        except Exception:  # ingest read it; whatever this is, keeping everything is the safe answer
            return data
    syntax = str(getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID", ""))
    if syntax in (pydicom.uid.DeflatedExplicitVRLittleEndian, pydicom.uid.ExplicitVRBigEndian):
        return data
    end = stream.tell()
    if data[end : end + 4] != _PIXEL_DATA_TAG_LE:
        return data  # stopped somewhere else (no pixel data, or float pixel data): keep it all
    return data[:end]


def read_source(data: bytes, *, frame: int, limits: IngestLimits) -> SourceFrame:
    """The DICOM header of ``data`` (Part 10, a bare data set, or either gzip-wrapped), checked for what results need.

    Ingest has already decoded these bytes within the limits, so this read is bounded by them too.
    """
    if data[:2] == GZIP_MAGIC:
        data = inflate(data, zlib.MAX_WBITS | 16, limits, what="gzip-compressed input")
    bare = not (len(data) >= 132 and data[128:132] == b"DICM")
    with silenced():
        try:
            dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=bare)
        except Exception as exc:  # ingest read it, so this is unexpected; never quote the library's message
            problem = type(exc).__name__
            raise DicomResultError(f"DICOM results: the source header could not be read ({problem})") from None
        for keyword in _REQUIRED:
            if uid(dataset, keyword) is None:
                raise DicomResultError(f"DICOM results need the source's {keyword}, which is missing or malformed")
        for keyword in ("Rows", "Columns"):
            if not isinstance(dataset.get(keyword), int):
                raise DicomResultError(f"DICOM results need the source's {keyword}")
        for keyword in _TYPE2_COPIED:
            if keyword not in dataset:
                setattr(dataset, keyword, "")  # our own copy of the header; the request's bytes are untouched
    source = SourceFrame(dataset=dataset, frame=frame)
    if not 0 <= frame < source.frames:
        raise DicomResultError(f"DICOM results: frame {frame} is not in the source's {source.frames} frames")
    return source
