"""Turn what a user sends (DICOM, PNG, JPEG, NIfTI, MHA, NRRD bytes or an array) into 8-bit grey pixels, safely.

One module per format behind :data:`FORMATS`, a ``{kind: Format(sniff, decode)}`` table, as
pydicom keeps one module per pixel decoder: :mod:`.dicom`, :mod:`.raster` (PNG, JPEG),
:mod:`.volume` (NIfTI, MHA, NRRD; SimpleITK in a child process) and :mod:`.array`; beside them
:mod:`.sniff` (magic numbers), :mod:`.render` (windows), :mod:`.quiet` (logs and warnings) and
:mod:`.image` (the typed result).

Every failure leaves as one of the three errors in :mod:`services.imaging.errors`, with a message
that names technical facts only. Limits are checked from headers before any pixel is decoded, and
pydicom's warnings and log records (which can quote header values such as birth dates) are
silenced while a decode runs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np

from services.imaging.errors import IngestError, InvalidImage, LimitExceeded, UnsupportedCodec
from services.imaging.ingest import dicom, raster, volume
from services.imaging.ingest.array import decode_array as _decode_array
from services.imaging.ingest.dicom import DICOM_DECODER_PLUGINS, read_dicom_identity
from services.imaging.ingest.guards import PASS_THROUGH, inflate
from services.imaging.ingest.image import (
    DecodedImage,
    DicomIdentity,
    ImageMetadata,
    InputKind,
    PixelSpacing,
    SpacingSource,
    Window,
)
from services.imaging.ingest.quiet import quiet
from services.imaging.ingest.sniff import (
    GZIP_MAGIC,
    HEAD_BYTES,
    SNIFFERS,
    SUPPORTED_FORMATS,
    may_be_bare_dicom,
    sniff,
    unsupported_format,
)
from services.imaging.limits import IngestLimits

__all__ = [
    "DICOM_DECODER_PLUGINS",
    "FORMATS",
    "HEAD_BYTES",
    "DecodedImage",
    "DicomIdentity",
    "Format",
    "ImageMetadata",
    "InputKind",
    "PixelSpacing",
    "SpacingSource",
    "Window",
    "decode",
    "decode_array",
    "may_be_bare_dicom",
    "read_dicom_identity",
    "sniff",
]


class Decoder(Protocol):
    def __call__(
        self, data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits
    ) -> DecodedImage: ...


class Format(NamedTuple):
    """A supported format: does ``data`` look like it (magic numbers), and its decoder."""

    sniff: Callable[[bytes], bool]
    decode: Decoder


# In sniff()'s order: a new format is a module with a decoder, its magic-number test in sniff.SNIFFERS and a row here.
FORMATS: dict[InputKind, Format] = {
    InputKind.DICOM: Format(SNIFFERS[InputKind.DICOM], dicom.decode_dicom),
    InputKind.PNG: Format(SNIFFERS[InputKind.PNG], raster.decode_png),
    InputKind.JPEG: Format(SNIFFERS[InputKind.JPEG], raster.decode_jpeg),
    InputKind.NIFTI: Format(SNIFFERS[InputKind.NIFTI], volume.decode_nifti),
    InputKind.NRRD: Format(SNIFFERS[InputKind.NRRD], volume.decode_nrrd),
    InputKind.MHA: Format(SNIFFERS[InputKind.MHA], volume.decode_mha),
}


def decode(
    data: bytes,
    *,
    kind: InputKind = InputKind.AUTO,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    limits: IngestLimits,
) -> DecodedImage:
    """Decode and render one frame of an image sent as bytes.

    ``frame`` is 0-based; by default the middle frame (``frames // 2``) of a multi-frame DICOM or
    the middle slice along the third voxel axis of a volume. ``window`` is (center, width) in the
    units after the modality LUT (e.g. HU), applied LINEAR_EXACT; without it the file's VOI LUT,
    then its window, then an automatic window is used.

    Raises InvalidImage, UnsupportedCodec or LimitExceeded, and nothing else.

    >>> image = decode(open("CT_small.dcm", "rb").read(), limits=IngestLimits())  # doctest: +SKIP
    >>> image.info.identity.modality, image.info.pixel_spacing.source  # doctest: +SKIP
    ('CT', <SpacingSource.PIXEL_SPACING: 'pixel_spacing'>)
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidImage(f"expected bytes, got {type(data).__name__}")
    size = len(data) if not isinstance(data, memoryview) else data.nbytes
    if size == 0:
        raise InvalidImage("input is empty")
    if size > limits.max_input_bytes:
        raise LimitExceeded("max_input_bytes", limits.max_input_bytes, size, what="input")
    try:
        kind = InputKind(kind)
    except ValueError:
        raise InvalidImage(f"unknown input kind {str(kind)[:20]!r}") from None
    requested = _requested_window(window)
    _check_frame_argument(frame)
    if kind is InputKind.ARRAY:
        raise InvalidImage("kind ARRAY is for decode_array(), not for bytes")
    return _guarded(lambda: _decode_bytes(bytes(data), kind, frame, requested, limits), limits)


def decode_array(
    array: np.ndarray,
    *,
    frame: int | None = None,
    window: tuple[float, float] | None = None,
    limits: IngestLimits,
) -> DecodedImage:
    """Render an already-decoded array: (H, W), (H, W, 3|4) RGB(A), (N, H, W) or (N, H, W, 3|4).

    Integer arrays other than uint8, and float arrays, get the automatic window unless ``window``
    is given; ``frame`` picks from a stack (default the middle one).
    """
    if not isinstance(array, np.ndarray):
        raise InvalidImage(f"expected a NumPy array, got {type(array).__name__}")
    requested = _requested_window(window)
    _check_frame_argument(frame)
    return _guarded(lambda: _decode_array(array, frame, requested, limits), limits)


def _guarded(work: Callable[[], DecodedImage], limits: IngestLimits) -> DecodedImage:
    """The one place where third-party exceptions become domain errors (without their messages)."""
    try:
        with quiet():
            return work()
    except IngestError:
        raise
    except MemoryError:
        raise LimitExceeded(
            "max_decoded_bytes", limits.max_decoded_bytes, what="decoding ran out of memory; input"
        ) from None
    except RecursionError:
        raise InvalidImage("input is nested too deeply to parse") from None
    except PASS_THROUGH:
        raise
    except BaseException as exc:
        # BaseException: a Rust codec's panic arrives as pyo3's PanicException, not an Exception.
        # The library's message may quote header values, so only its type is kept.
        raise InvalidImage(f"input could not be decoded ({type(exc).__name__})") from None


def _requested_window(window: tuple[float, float] | None) -> Window | None:
    if window is None:
        return None
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError):
        raise InvalidImage("window must be (center, width) numbers") from None
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
        raise InvalidImage("window needs a finite center and a width > 0")
    return Window.from_center_width(center, width, function="LINEAR_EXACT", source="request")


def _check_frame_argument(frame: int | None) -> None:
    if frame is not None and (isinstance(frame, bool) or not isinstance(frame, int | np.integer)):
        raise InvalidImage("frame must be an integer")


def _decode_bytes(
    data: bytes, kind: InputKind, frame: int | None, window: Window | None, limits: IngestLimits
) -> DecodedImage:
    sniffed = sniff(data)
    if sniffed is None and data.startswith(GZIP_MAGIC):
        # .nii.gz is how NIfTI travels; gzip-wrapped DICOM gets the same bounded inflate.
        data = inflate(data, zlib.MAX_WBITS | 16, limits, what="gzip-compressed input")
        sniffed = sniff(data)
    if sniffed is None:
        other = unsupported_format(data)
        if other is not None and kind is InputKind.AUTO:
            raise UnsupportedCodec(f"{other} input is not supported; send {SUPPORTED_FORMATS}")
        if kind is InputKind.DICOM or (kind is InputKind.AUTO and may_be_bare_dicom(data)):
            return dicom.decode_dicom(data, frame=frame, window=window, limits=limits, bare=True)
        if kind is InputKind.AUTO:
            raise InvalidImage(f"unrecognised input: not {SUPPORTED_FORMATS}")
        raise InvalidImage(f"input declared as {kind.name} does not look like {kind.name}")
    if kind is not InputKind.AUTO and kind is not sniffed:
        raise InvalidImage(f"input declared as {kind.name} looks like {sniffed.name}")
    return FORMATS[sniffed].decode(data, frame=frame, window=window, limits=limits)
