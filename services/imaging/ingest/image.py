"""What ingest returns: the rendered frame and a typed, non-identifying record of what it came from."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np


class InputKind(StrEnum):
    """What the bytes are; AUTO sniffs them (magic numbers), any other value must match the bytes."""

    AUTO = "auto"
    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"
    NIFTI = "nifti"
    MHA = "mha"
    NRRD = "nrrd"
    ARRAY = "array"


@dataclass(frozen=True)
class Window:
    """The grey mapping that produced ``pixels_u8``: ``low`` renders black, ``high`` white.

    ``center``/``width`` are in DICOM's terms for ``function`` (LINEAR, LINEAR_EXACT, SIGMOID, or
    LUT for a VOI LUT); ``source`` says where it came from: ``request``, ``dicom`` (the file's
    window), ``voi_lut``, ``auto`` (percentiles 0.5/99.5, padding excluded) or ``full_range``.
    The display polarity is applied after this mapping: inverted for MONOCHROME1, or wherever the
    Presentation LUT Shape is INVERSE (``dicom_render.inverts``).
    """

    center: float
    width: float
    low: float
    high: float
    function: str
    source: str

    @classmethod
    def from_center_width(cls, center: float, width: float, *, function: str, source: str) -> Window:
        if function == "LINEAR":
            # PS3.3 C.11.2.1.2.1: the output reaches 0 at c - 0.5 - (w-1)/2 and 255 at c - 0.5 + (w-1)/2.
            low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        else:
            low, high = center - width / 2, center + width / 2
        return cls(float(center), float(width), float(low), float(high), function, source)

    @classmethod
    def from_range(cls, low: float, high: float, *, source: str) -> Window:
        return cls((low + high) / 2, high - low, float(low), float(high), "LINEAR_EXACT", source)


class SpacingSource(StrEnum):
    """The attribute a pixel spacing was read from, in the order DICOM readers prefer them.

    PIXEL_MEASURES: Pixel Measures Sequence of an enhanced multi-frame object (per-frame, else
    shared functional groups); PIXEL_SPACING: the top-level PixelSpacing (0028,0030), spacing in
    the patient; IMAGER_PIXEL_SPACING: (0018,1164), at the detector of a projection radiograph
    (not corrected for magnification); VOLUME_HEADER: the spacing in a NIfTI/MHA/NRRD header.
    """

    PIXEL_MEASURES = "pixel_measures"
    PIXEL_SPACING = "pixel_spacing"
    IMAGER_PIXEL_SPACING = "imager_pixel_spacing"
    VOLUME_HEADER = "volume_header"


@dataclass(frozen=True)
class PixelSpacing:
    """Physical distance between pixel centres in mm: ``row_mm`` between rows (vertical),
    ``column_mm`` between columns (horizontal), as DICOM's PixelSpacing orders them."""

    row_mm: float
    column_mm: float
    source: SpacingSource


@dataclass(frozen=True)
class DicomIdentity:
    """Which DICOM instance an image is: the SOP and the series/study/frame-of-reference UIDs it
    belongs to, and its modality. No patient attribute (name, ID, dates, accession) belongs here.

    Each value is kept only when it looks like what it is (a UID of digits and dots, at most 64
    characters; a code string); an absent or malformed one is ``""``, as in proto3.
    """

    modality: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    study_instance_uid: str = ""
    frame_of_reference_uid: str = ""


@dataclass(frozen=True)
class ImageMetadata:
    """What was read, as typed fields; technical attributes only, never a patient's name, ID or date.

    ``transfer_syntax`` is the syntax's name (for other inputs the format, e.g. ``PNG``);
    ``transfer_syntax_uid`` is set for DICOM only. ``frame`` is the 0-based frame (or volume
    slice) that was rendered, ``window`` how. ``identity`` is empty for anything but DICOM;
    ``pixel_spacing`` is None when the input does not state one.
    """

    kind: InputKind
    rows: int
    columns: int
    frames: int
    frame: int
    photometric_interpretation: str
    transfer_syntax: str
    window: Window
    transfer_syntax_uid: str = ""
    identity: DicomIdentity = DicomIdentity()
    pixel_spacing: PixelSpacing | None = None


@dataclass(frozen=True)
class DecodedImage:
    """One rendered frame and what it came from; nothing in it identifies the patient.

    ``pixels_u8`` is (H, W) uint8 grey for the models (colour converted with BT.601 luma).
    ``source`` is that frame after the modality LUT (e.g. Hounsfield units), or its RGB pixels for
    colour input. ``info`` is the typed record of the input (UIDs, spacing, geometry, window).
    """

    pixels_u8: np.ndarray
    source: np.ndarray
    info: ImageMetadata

    # Shorthands for the fields every caller reads.
    @property
    def kind(self) -> InputKind:
        return self.info.kind

    @property
    def width(self) -> int:
        return self.info.columns

    @property
    def height(self) -> int:
        return self.info.rows

    @property
    def frames(self) -> int:
        return self.info.frames

    @property
    def frame(self) -> int:
        return self.info.frame

    @property
    def photometric(self) -> str:
        return self.info.photometric_interpretation

    @property
    def transfer_syntax(self) -> str:
        return self.info.transfer_syntax

    @property
    def window_used(self) -> Window:
        return self.info.window
