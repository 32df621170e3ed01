"""Turn what a user sends (DICOM, PNG, JPEG, NIfTI, MHA, NRRD bytes or an array) into 8-bit grey pixels, safely.

Every failure leaves as one of the three errors in :mod:`services.imaging.errors`, with a message
that names technical facts only. Limits are checked from headers before any pixel is decoded, and
pydicom's warnings and log records (which can quote header values such as birth dates) are
silenced while a decode runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.imaging.errors import IngestError, InvalidImage, LimitExceeded, UnsupportedCodec
from services.imaging.limits import IngestLimits

__all__ = ["DICOM_DECODER_PLUGINS", "DecodedImage", "InputKind", "Window", "decode", "decode_array"]


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
    MONOCHROME1 images are inverted after this mapping.
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


@dataclass(frozen=True)
class DecodedImage:
    """One rendered frame and what it came from; nothing in it identifies the patient.

    ``pixels_u8`` is (H, W) uint8 grey for the models (colour converted with BT.601 luma).
    ``source`` is that frame after the modality LUT (e.g. Hounsfield units), or its RGB pixels for
    colour input. ``uids`` holds the DICOM study/series/instance UIDs the batch client groups by.
    """

    pixels_u8: np.ndarray
    source: np.ndarray
    kind: InputKind
    width: int
    height: int
    frames: int
    frame: int
    photometric: str
    transfer_syntax: str
    window_used: Window
    metadata: dict[str, Any] = field(default_factory=dict)
    uids: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Public entry points


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


def _guarded(work: Any, limits: IngestLimits) -> DecodedImage:
    """The one place where third-party exceptions become domain errors (without their messages)."""
    try:
        with _quiet():
            result: DecodedImage = work()
            return result
    except IngestError:
        raise
    except MemoryError:
        raise LimitExceeded(
            "max_decoded_bytes", limits.max_decoded_bytes, what="decoding ran out of memory; input"
        ) from None
    except RecursionError:
        raise InvalidImage("input is nested too deeply to parse") from None
    except _PASS_THROUGH:
        raise
    except BaseException as exc:
        # BaseException: a Rust codec's panic arrives as pyo3's PanicException, not an Exception.
        # The library's message may quote header values, so only its type is kept.
        raise InvalidImage(f"input could not be decoded ({type(exc).__name__})") from None


_PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)


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


# ---------------------------------------------------------------------------------------------
# Keeping header values out of logs and warnings

_QUIET_STATE = threading.local()
_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_catcher: warnings.catch_warnings[None] | None = None
_QUIET_LOGGER_PREFIXES = ("pydicom", "pylibjpeg", "openjpeg", "libjpeg", "rle", "gdcm", "SimpleITK")


class _DropWhileDecoding(logging.Filter):
    """Drops records emitted by the decoding thread; a thread-local flag keeps other threads' logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_QUIET_STATE, "active", False)


def _install_log_filter() -> None:
    """Logger filters only see records logged on that very logger, so each known logger gets one."""
    names = set(_QUIET_LOGGER_PREFIXES) | {
        "pydicom.pixels.decoders.base",
        "pydicom.pixels.encoders.base",
        "pydicom.pixels.utils",
        "pylibjpeg.utils",
        "pylibjpeg.tools.jpegio",
    }
    names |= {name for name in list(logging.Logger.manager.loggerDict) if name.split(".")[0] in _QUIET_LOGGER_PREFIXES}
    for name in sorted(names):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, _DropWhileDecoding) for existing in logger.filters):
            logger.addFilter(_DropWhileDecoding())


_install_log_filter()

with contextlib.suppress(Exception):  # GDCM's C++ trace can print dataset content to stderr.
    import gdcm

    gdcm.Trace.WarningOff()
    gdcm.Trace.ErrorOff()
    gdcm.Trace.DebugOff()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings process-wide and pydicom's logs in this thread while any decode runs.

    ``warnings.catch_warnings`` swaps global state and is not thread-safe on its own; a counter
    under a lock enters it for the first concurrent decode and leaves it after the last one.
    """
    global _quiet_depth, _quiet_catcher
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            _install_log_filter()  # cheap; covers loggers that libraries created lazily since
            catcher = warnings.catch_warnings()
            catcher.__enter__()
            warnings.simplefilter("ignore")
            _quiet_catcher = catcher
        _quiet_depth += 1
    previous = getattr(_QUIET_STATE, "active", False)
    _QUIET_STATE.active = True
    try:
        yield
    finally:
        _QUIET_STATE.active = previous
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _quiet_catcher is not None:
                _quiet_catcher.__exit__(None, None, None)
                _quiet_catcher = None


# ---------------------------------------------------------------------------------------------
# Sniffing

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_GZIP_MAGIC = b"\x1f\x8b"
_METAIO_KEYS = (
    b"ObjectType",
    b"ObjectSubType",
    b"NDims",
    b"Comment",
    b"DimSize",
    b"TransformType",
    b"BinaryData",
    b"CompressedData",
    b"ElementType",
    b"ElementSpacing",
    b"HeaderSize",
)
_UNSUPPORTED_MAGIC = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"PK\x03\x04", "ZIP"),
    (b"BZh", "bzip2"),
    (b"%PDF-", "PDF"),
)
_SUPPORTED_FORMATS = "DICOM, PNG, JPEG, NIfTI, MHA or NRRD"


def _sniff(data: bytes) -> InputKind | None:
    if len(data) >= 132 and data[128:132] == b"DICM":
        return InputKind.DICOM
    if data.startswith(_PNG_MAGIC):
        return InputKind.PNG
    if data.startswith(b"\xff\xd8\xff"):
        return InputKind.JPEG
    if _nifti_version(data):
        return InputKind.NIFTI
    if data.startswith(b"NRRD000"):
        return InputKind.NRRD
    if data.lstrip()[:32].startswith(_METAIO_KEYS):
        return InputKind.MHA
    return None


def _unsupported_format(data: bytes) -> str | None:
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _may_be_bare_dicom(data: bytes) -> bool:
    """A DICOM data set without preamble starts with a group 0002 or 0008 tag (either byte order)."""
    if len(data) < 8:
        return False
    return struct.unpack_from("<H", data)[0] in (0x0002, 0x0008) or struct.unpack_from(">H", data)[0] == 0x0008


def _decode_bytes(
    data: bytes, kind: InputKind, frame: int | None, window: Window | None, limits: IngestLimits
) -> DecodedImage:
    sniffed = _sniff(data)
    if sniffed is None and data.startswith(_GZIP_MAGIC):
        # .nii.gz is how NIfTI travels; gzip-wrapped DICOM gets the same bounded inflate.
        data = _inflate(data, zlib.MAX_WBITS | 16, limits, what="gzip-compressed input")
        sniffed = _sniff(data)
    if sniffed is None:
        other = _unsupported_format(data)
        if other is not None and kind is InputKind.AUTO:
            raise UnsupportedCodec(f"{other} input is not supported; send {_SUPPORTED_FORMATS}")
        if kind is InputKind.DICOM or (kind is InputKind.AUTO and _may_be_bare_dicom(data)):
            return _decode_dicom(data, frame=frame, window=window, limits=limits, bare=True)
        if kind is InputKind.AUTO:
            raise InvalidImage(f"unrecognised input: not {_SUPPORTED_FORMATS}")
        raise InvalidImage(f"input declared as {kind.name} does not look like {kind.name}")
    if kind is not InputKind.AUTO and kind is not sniffed:
        raise InvalidImage(f"input declared as {kind.name} looks like {sniffed.name}")
    if sniffed is InputKind.DICOM:
        return _decode_dicom(data, frame=frame, window=window, limits=limits, bare=False)
    if sniffed is InputKind.PNG:
        return _decode_png(data, window=window, limits=limits)
    if sniffed is InputKind.JPEG:
        return _decode_jpeg(data, window=window, limits=limits)
    return _decode_volume(data, sniffed, frame=frame, window=window, limits=limits)


def _inflate(data: bytes, wbits: int, limits: IngestLimits, *, what: str) -> bytes:
    """Inflate with a bound: stop at max_inflated_bytes instead of trusting the stream."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limits.max_inflated_bytes + 1)
    except zlib.error:
        raise InvalidImage(f"{what} is corrupt (deflate stream error)") from None
    if len(out) > limits.max_inflated_bytes or inflater.unconsumed_tail:
        raise LimitExceeded("max_inflated_bytes", limits.max_inflated_bytes, what=what)
    if not inflater.eof:
        raise InvalidImage(f"{what} is truncated (deflate stream ends early)")
    return out


def _check_size(
    height: int,
    width: int,
    frames: int,
    samples: int,
    bytes_per_sample: int,
    limits: IngestLimits,
    *,
    what: str,
    decoded_frames: int = 1,
) -> None:
    """The limits every format shares, from header values, before anything is allocated.

    ``decoded_frames`` is how many frames the decoder will hold at once (DICOM: one; volumes: all).
    """
    if height < 1 or width < 1 or frames < 1 or samples < 1:
        raise InvalidImage(f"{what} has no pixels ({width}x{height}, {frames} frames, {samples} samples)")
    if max(height, width) > limits.max_dimension_pixels:
        raise LimitExceeded(
            "max_dimension_pixels", limits.max_dimension_pixels, max(height, width), what=f"{what} of {width}x{height}"
        )
    if frames > limits.max_frames:
        raise LimitExceeded("max_frames", limits.max_frames, frames, what=f"{what} with {frames} frames")
    pixels = height * width * frames
    if pixels > limits.max_pixels:
        raise LimitExceeded("max_pixels", limits.max_pixels, pixels, what=f"{what} of {width}x{height}x{frames}")
    decoded = height * width * samples * bytes_per_sample * decoded_frames
    if decoded > limits.max_decoded_bytes:
        raise LimitExceeded("max_decoded_bytes", limits.max_decoded_bytes, decoded, what=f"{what} of {width}x{height}")


def _choose_frame(frame: int | None, frames: int) -> int:
    if frame is None:
        return frames // 2
    if not 0 <= frame < frames:
        raise InvalidImage(f"frame {frame} is out of range: the image has {frames} frame(s)")
    return int(frame)


# ---------------------------------------------------------------------------------------------
# DICOM

_DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CS_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PALETTE = "PALETTE COLOR"
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# pydicom decoder plugins we let near untrusted data, in order. GDCM is left out: on a fuzzed
# JPEG it threw a C++ exception through SWIG and aborted the whole process (std::terminate);
# pylibjpeg decodes every compressed file of pydicom's and pydicom-data's corpus without it.
DICOM_DECODER_PLUGINS = ("pylibjpeg", "pydicom", "pillow")


def _scan_file_meta(data: bytes) -> tuple[int, str | None, tuple[int, int] | None]:
    """Walk group 0002 ourselves so a Deflated data set is never inflated without a bound.

    Returns (end of the meta group, transfer syntax UID, (offset, length) of its value).
    """
    pos, size = 132, len(data)
    ts: str | None = None
    span: tuple[int, int] | None = None
    while pos + 8 <= size:
        group, element = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            break
        vr = data[pos + 4 : pos + 6]
        if not (vr.isalpha() and vr.isupper()):
            return pos, None, None  # implicit-VR meta (non-conformant): leave it to pydicom
        if vr in _LONG_VRS:
            if pos + 12 > size:
                raise InvalidImage("DICOM file meta information is truncated")
            length = struct.unpack_from("<I", data, pos + 8)[0]
            value_at = pos + 12
        else:
            length = struct.unpack_from("<H", data, pos + 6)[0]
            value_at = pos + 8
        end = value_at + length
        if length == 0xFFFFFFFF or end > size:
            raise InvalidImage("DICOM file meta information is truncated or malformed")
        if element == 0x0010:
            ts = data[value_at:end].rstrip(b"\x00 ").decode("ascii", "replace")
            span = (value_at, length)
        pos = end
    return pos, ts, span


def _inflate_dicom(data: bytes, meta_end: int, span: tuple[int, int], limits: IngestLimits) -> bytes:
    """Inflate a Deflated data set with a bound and relabel it Explicit VR Little Endian.

    pydicom would call zlib.decompress on it unbounded; the new UID is NUL-padded into the old
    value's length so the meta group's lengths stay valid (UI values may carry trailing NULs).
    """
    value_at, length = span
    replacement = str(ExplicitVRLittleEndian).encode().ljust(length, b"\x00")
    if len(replacement) != length:
        raise InvalidImage("DICOM transfer syntax UID is malformed")
    body = _inflate(data[meta_end:], -zlib.MAX_WBITS, limits, what="deflated DICOM data set")
    return data[:value_at] + replacement + data[value_at + length : meta_end] + body


def _decode_dicom(
    data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits, bare: bool
) -> DecodedImage:
    original_ts: str | None = None
    if not bare:
        meta_end, original_ts, span = _scan_file_meta(data)
        if original_ts == _DEFLATED and span is not None:
            data = _inflate_dicom(data, meta_end, span, limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bare)
    except Exception as exc:
        raise InvalidImage(f"DICOM data set could not be parsed ({type(exc).__name__})") from None

    pixel_keyword = next((kw for kw in _PIXEL_KEYWORDS if kw in ds), None)
    if pixel_keyword is None:
        if bare and "SOPClassUID" not in ds:
            raise InvalidImage(f"unrecognised input: not {_SUPPORTED_FORMATS}")
        if len(ds) == 0:
            raise InvalidImage("DICOM data set is empty or unreadable (the file may be truncated)")
        if "Rows" in ds and "Columns" in ds:
            # pydicom drops a Pixel Data element cut short by the end of the file.
            raise InvalidImage("DICOM image has no usable pixel data (the file may be truncated)")
        raise InvalidImage(f"DICOM object has no pixel data{_sop_class_note(ds)}")

    rows = _int_attr(ds, "Rows")
    columns = _int_attr(ds, "Columns")
    bits_allocated = _int_attr(ds, "BitsAllocated")
    bits_stored = _int_attr(ds, "BitsStored", bits_allocated)
    pixel_representation = _int_attr(ds, "PixelRepresentation", 0)
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1
    photometric = _photometric(ds)
    if bits_allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(f"DICOM bit depth is invalid (BitsAllocated {bits_allocated}, BitsStored {bits_stored})")
    if pixel_representation not in (0, 1):
        raise InvalidImage(f"DICOM PixelRepresentation {pixel_representation} is invalid")
    expected_samples = 3 if photometric in _COLOUR else 1
    if samples != expected_samples:
        raise InvalidImage(f"DICOM SamplesPerPixel {samples} does not fit {photometric}")
    _check_size(rows, columns, frames, samples, max(1, bits_allocated // 8), limits, what="DICOM image")
    index = _choose_frame(frame, frames)

    ts = _transfer_syntax(ds, bare=bare)
    label = _ts_label(ts)
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError:
        raise UnsupportedCodec(f"transfer syntax {label} is not supported") from None
    plugins = () if decoder.is_native else tuple(p for p in DICOM_DECODER_PLUGINS if p in decoder.available_plugins)
    if not (decoder.is_native or plugins):
        raise UnsupportedCodec(f"transfer syntax {label} has no decoder installed")
    if not decoder.is_native:
        _check_codestream(ds, index=index, frames=frames, rows=rows, columns=columns, label=label, limits=limits)
    array, properties = _decode_frame(decoder, ds, index=index, plugins=plugins, label=label)
    array = _native_order(array)
    if array.shape[:2] != (rows, columns):
        raise InvalidImage(f"DICOM pixel data decoded to {array.shape[:2]}, expected {(rows, columns)}")
    decoded_photometric = str(properties.get("photometric_interpretation", photometric))

    source, pixels, used = _render_dicom(
        array,
        ds,
        index=index,
        photometric=photometric,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        window=window,
    )
    metadata, uids = _dicom_metadata(ds, index)
    metadata.update(
        rows=rows,
        columns=columns,
        number_of_frames=frames,
        samples_per_pixel=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        photometric_interpretation=photometric,
        decoded_photometric_interpretation=decoded_photometric,
        transfer_syntax_uid=original_ts or ts,
    )
    return DecodedImage(
        pixels_u8=pixels,
        source=source,
        kind=InputKind.DICOM,
        width=columns,
        height=rows,
        frames=frames,
        frame=index,
        photometric=photometric,
        transfer_syntax=UID(original_ts).name if original_ts == _DEFLATED else _ts_name(ts),
        window_used=used,
        metadata=metadata,
        uids=uids,
    )


def _render_dicom(
    array: np.ndarray,
    ds: Dataset,
    *,
    index: int,
    photometric: str,
    bits_allocated: int,
    bits_stored: int,
    pixel_representation: int,
    window: Window | None,
) -> tuple[np.ndarray, np.ndarray, Window]:
    """(source, pixels_u8, window used): palette/colour to luma, or the grey pipeline of PS3.4 N.2.

    Grey: modality LUT or rescale, then the requested window, else the file's VOI LUT, else its
    window, else the automatic one; MONOCHROME1 is inverted in the same pass.
    """
    padding: np.ndarray | None = None
    if photometric == _PALETTE:
        try:
            _palette_to_little_endian(ds)
            colour = _native_order(apply_color_lut(array, ds))
        except Exception as exc:
            raise InvalidImage(f"DICOM palette colour lookup table is malformed ({type(exc).__name__})") from None
        source = colour
        # Some writers put 8-bit entries in a 16-bit table; render those on 0..255 as viewers do.
        full = 255.0 if colour.dtype == np.uint8 or int(colour.max(initial=0)) <= 255 else 65535.0
        grey = _luma(colour)
    elif array.ndim == 3:
        source = array
        grey, full = _luma(array), float(2**bits_stored - 1)
    else:
        full = 0.0
        padding = _padding_mask(array, ds)
        source = _modality(array, ds, index)
        grey = source

    invert = photometric == "MONOCHROME1"
    if window is not None:
        used, pixels = window, _render(grey, window, invert=invert)
    elif full:
        used = Window.from_range(0.0, full, source="full_range")
        pixels = _render(grey, used)
    else:
        lut = _voi_lut(ds, pixel_representation)
        if lut is not None:
            used, pixels = _apply_voi_lut(source, *lut, invert=invert)
        else:
            dicom_window = _dicom_window(ds, index)
            if dicom_window is not None:
                used = dicom_window
            elif bits_allocated == 1:
                used = Window.from_range(0.0, 1.0, source="full_range")
            else:
                used = _auto_window(source, padding)
            pixels = _render(source, used, invert=invert)

    return source, pixels, used


def _decode_frame(
    decoder: Any, ds: Dataset, *, index: int, plugins: tuple[str, ...], label: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """One frame through each allowed plugin in turn (YBR becomes RGB, pydicom's default)."""
    failures: list[str] = []
    for plugin in plugins or ("",):
        try:
            array, properties = decoder.as_array(ds, index=index, decoding_plugin=plugin)
            return array, dict(properties)
        except _PASS_THROUGH:
            raise
        except BaseException as exc:  # incl. pyo3's PanicException from the Rust RLE decoder
            failures.append(type(exc).__name__)
    raise InvalidImage(f"DICOM pixel data could not be decoded ({label}; {', '.join(failures)})")


def _get(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None; value conversion errors become None, never a leak."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword)
    except Exception:
        raise InvalidImage(f"DICOM attribute {keyword} is malformed") from None
    if value is None or value == "":
        if default is None:
            raise InvalidImage(f"DICOM attribute {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidImage(f"DICOM attribute {keyword} is not an integer") from None


def _float_value(value: Any) -> float | None:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _cs(ds: Dataset, keyword: str) -> str | None:
    """A code string attribute, only when it looks like one (so free text never leaks)."""
    value = _get(ds, keyword)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if _CS_RE.match(value) else None


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if not isinstance(value, str):
        return None
    value = value.strip("\x00 ")
    return value if len(value) <= 64 and _UID_RE.match(value) else None


def _photometric(ds: Dataset) -> str:
    value = _get(ds, "PhotometricInterpretation")
    if not isinstance(value, str) or not value.strip():
        raise InvalidImage("DICOM attribute PhotometricInterpretation is missing")
    value = value.strip()
    if value in _MONOCHROME or value in _COLOUR or value == _PALETTE:
        return value
    if _CS_RE.match(value):
        raise UnsupportedCodec(f"photometric interpretation {value} is not supported")
    raise InvalidImage("DICOM attribute PhotometricInterpretation is malformed")


def _sop_class_note(ds: Dataset) -> str:
    sop = _uid(ds, "SOPClassUID")
    if sop is None:
        return ""
    name = UID(sop).name
    return f" (SOP class {name})" if name != sop else f" (SOP class {sop})"


def _transfer_syntax(ds: Dataset, *, bare: bool) -> str:
    """The data set's transfer syntax; for files without meta, the encoding pydicom read."""
    meta = getattr(ds, "file_meta", None)
    ts = _uid(meta, "TransferSyntaxUID") if meta is not None else None
    if ts is not None:
        return ts
    if meta is not None and "TransferSyntaxUID" in meta:
        raise InvalidImage("DICOM transfer syntax UID is malformed")
    element = ds.data_element("PixelData") if "PixelData" in ds else None
    if element is not None and getattr(element, "is_undefined_length", False):
        raise InvalidImage("DICOM compressed pixel data has no transfer syntax")
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        raise InvalidImage("DICOM transfer syntax is missing")
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    return str(ts)


def _ts_name(ts: str) -> str:
    name = UID(ts).name
    return name if name else ts


def _ts_label(ts: str) -> str:
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


def _native_order(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder not in ("=", "|"):
        return array.astype(array.dtype.newbyteorder("="))
    return array


_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _jpeg_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(marker, precision, height, width, components) from the first SOF; None if there is none."""
    pos, size = 2, len(data)
    while pos + 4 <= size:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xDA, 0xD9):
            return None
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if marker in _SOF_MARKERS and pos + 10 <= size:
            precision, height, width, components = struct.unpack_from(">BHHB", data, pos + 4)
            return marker, precision, height, width, components
        pos += 2 + length
    return None


def _j2k_header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG 2000 SIZ segment (bare or inside a JP2 box)."""
    at = data.find(b"\xff\x4f\xff\x51", 0, 65536)
    if at < 0 or at + 42 > len(data):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, at + 8)
    components = struct.unpack_from(">H", data, at + 40)[0]
    return ysiz - yosiz, xsiz - xosiz, components


def _check_jp2_boxes(data: bytes) -> None:
    """pydicom 3.0's JP2 box walk loops forever on a box of length 0 (and crawls on tiny ones)."""
    if not data.startswith(b"\x00\x00\x00\x0cjP  \r\n\x87\n"):
        return
    offset, boxes = 12, 0
    while offset + 8 <= len(data):
        length = int.from_bytes(data[offset : offset + 4], "big")
        if data[offset + 4 : offset + 8] == b"jp2c":
            return
        boxes += 1
        if length < 8 or boxes > 64:
            raise InvalidImage("JPEG 2000 JP2 header is malformed (box lengths)")
        offset += length
    raise InvalidImage("JPEG 2000 JP2 header has no codestream box")


def _check_codestream(
    ds: Dataset, *, index: int, frames: int, rows: int, columns: int, label: str, limits: IngestLimits
) -> None:
    """Codecs allocate from their own header, so that header must agree with Rows/Columns first."""
    try:
        encoded = pydicom.encaps.get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception as exc:
        raise InvalidImage(f"DICOM encapsulated pixel data is malformed ({label}; {type(exc).__name__})") from None
    _check_jp2_boxes(encoded)
    if encoded[:2] == b"\xff\xd8":
        header = _jpeg_header(encoded)
        size = (header[2], header[3], header[4]) if header else None
    else:
        size = _j2k_header(encoded)
    if size is None:
        return  # RLE and anything we cannot parse: the decoder sizes its output from the DICOM header
    height, width, components = size
    if height and (height, width) != (rows, columns):
        raise InvalidImage(f"{label} codestream is {width}x{height} but the DICOM header says {columns}x{rows}")
    _check_size(height or rows, width, 1, max(1, components), 2, limits, what=f"{label} codestream")


def _palette_to_little_endian(ds: Dataset) -> None:
    """pydicom 3.0 reads non-segmented OW palette tables as little endian whatever the syntax."""
    if ds.original_encoding[1] is not False:
        return
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        element = ds.data_element(keyword) if keyword in ds else None
        if element is not None and element.VR == "OW" and isinstance(element.value, bytes):
            element.value = np.frombuffer(element.value, dtype=">u2").astype("<u2").tobytes()


def _functional(ds: Dataset, index: int, sequence: str) -> list[Dataset]:
    """Items of a functional group macro for this frame: per-frame first, then shared."""
    found: list[Dataset] = []
    for groups_keyword, at in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = _get(ds, groups_keyword)
        if groups and len(groups) > at:
            items = _get(groups[at], sequence)
            if items:
                found.append(items[0])
    return found


def _modality(stored: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Modality LUT or rescale (incl. enhanced multi-frame's Pixel Value Transformation)."""
    sequence = _get(ds, "ModalityLUTSequence")
    if sequence:
        lut = _lut(sequence[0], ds, signed=stored.dtype.kind == "i")
        if lut is not None:
            table, first = lut
            indices = np.clip(stored.astype(np.int64) - first, 0, len(table) - 1)
            return table.astype(np.int32)[indices]
    slope, intercept = 1.0, 0.0
    for item in [*_functional(ds, index, "PixelValueTransformationSequence"), ds]:
        if "RescaleSlope" in item or "RescaleIntercept" in item:
            slope_value = _float_value(_get(item, "RescaleSlope"))
            intercept_value = _float_value(_get(item, "RescaleIntercept"))
            if slope_value is None or slope_value == 0 or (intercept_value is None and "RescaleIntercept" in item):
                raise InvalidImage("DICOM RescaleSlope/RescaleIntercept are not usable numbers")
            slope, intercept = slope_value, intercept_value or 0.0
            break
    if slope == 1.0 and intercept == 0.0:
        return stored
    if (
        stored.dtype.kind in "iu"
        and stored.dtype.itemsize <= 2
        and slope.is_integer()
        and intercept.is_integer()
        and abs(slope) <= 2**14
        and abs(intercept) <= 2**30
    ):
        return stored.astype(np.int32) * int(slope) + int(intercept)
    rescaled = stored.astype(np.float64 if stored.dtype.itemsize > 2 else np.float32)
    np.multiply(rescaled, slope, out=rescaled)
    np.add(rescaled, intercept, out=rescaled)
    return rescaled


def _lut(item: Dataset, ds: Dataset, *, signed: bool) -> tuple[np.ndarray, int] | None:
    """(table, first mapped value) of a Modality/VOI LUT item; None if it is malformed."""
    descriptor = _get(item, "LUTDescriptor")
    data = _get(item, "LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    if signed and first >= 2**15:
        first -= 2**16  # first-mapped value stored as US although the pixels are signed
    if isinstance(data, bytes):
        little = bool(ds.original_encoding[1]) if ds.original_encoding[1] is not None else True
        table = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2").astype(np.uint16)
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.int64)
        if table.size and (table.min() < 0 or table.max() > 65535):
            return None
        table = table.astype(np.uint16)
    if table.size < entries or entries < 1:
        return None
    return table[:entries], first


def _voi_lut(ds: Dataset, pixel_representation: int) -> tuple[np.ndarray, int, int] | None:
    """The first VOI LUT Sequence item as (table, first mapped, bits per entry), or None."""
    sequence = _get(ds, "VOILUTSequence")
    if not sequence:
        return None
    lut = _lut(sequence[0], ds, signed=pixel_representation == 1)
    descriptor = _get(sequence[0], "LUTDescriptor")
    if lut is None or descriptor is None:
        return None
    bits = int(descriptor[2])
    if not 8 <= bits <= 16:
        return None
    table, first = lut
    return table, first, bits


def _apply_voi_lut(
    source: np.ndarray, table: np.ndarray, first: int, bits: int, *, invert: bool
) -> tuple[Window, np.ndarray]:
    # The LUT's output spans 0 .. 2**bits - 1 (PS3.3 C.11.2.1.1); map that range to 0..255 first.
    table_u8 = np.clip(np.rint(table.astype(np.float64) * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    if invert:
        table_u8 = 255 - table_u8
    values = np.rint(source).astype(np.int64) if source.dtype.kind == "f" else source.astype(np.int64)
    pixels = table_u8[np.clip(values - first, 0, len(table) - 1)]
    entries = len(table)
    used = Window(first + entries / 2, float(entries), float(first), float(first + entries - 1), "LUT", "voi_lut")
    return used, pixels


def _dicom_window(ds: Dataset, index: int) -> Window | None:
    for item in [*_functional(ds, index, "FrameVOILUTSequence"), ds]:
        if "WindowCenter" not in item or "WindowWidth" not in item:
            continue
        center = _float_value(_get(item, "WindowCenter"))
        width = _float_value(_get(item, "WindowWidth"))
        if center is None or width is None or width <= 0:
            return None
        function = _cs(item, "VOILUTFunction") or "LINEAR"
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or (function == "LINEAR" and width < 1):
            function = "LINEAR_EXACT"
        return Window.from_center_width(center, width, function=function, source="dicom")
    return None


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels equal to (or between) Pixel Padding Value and Range Limit, excluded from the auto window."""
    pad = _get(ds, "PixelPaddingValue")
    if not isinstance(pad, int):
        return None
    limit = _get(ds, "PixelPaddingRangeLimit")
    if isinstance(limit, int):
        low, high = min(pad, limit), max(pad, limit)
        return (stored >= low) & (stored <= high)
    return stored == pad


def _dicom_metadata(ds: Dataset, index: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Technical, non-identifying attributes only; values that do not look technical are dropped."""
    metadata: dict[str, Any] = {}
    sop_class = _uid(ds, "SOPClassUID")
    for key, value in (
        ("modality", _cs(ds, "Modality")),
        ("sop_class_uid", sop_class),
        ("sop_class", UID(sop_class).name if sop_class else None),
        ("view_position", _cs(ds, "ViewPosition")),
        ("image_laterality", _cs(ds, "ImageLaterality")),
        ("lossy_image_compression", _cs(ds, "LossyImageCompression")),
    ):
        if value:
            metadata[key] = value
    spacing = None
    for item in [*_functional(ds, index, "PixelMeasuresSequence"), ds]:
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            value = _get(item, keyword)
            if value is not None and len(value) == 2:
                numbers = [_float_value(v) for v in value]
                if all(n is not None and n > 0 for n in numbers):
                    spacing = numbers
                    break
        if spacing:
            break
    if spacing:
        metadata["pixel_spacing_mm"] = spacing
    for keyword, key in (("RescaleSlope", "rescale_slope"), ("RescaleIntercept", "rescale_intercept")):
        number = _float_value(_get(ds, keyword))
        if number is not None:
            metadata[key] = number
    uids = {
        key: value
        for key, value in (
            ("study_instance_uid", _uid(ds, "StudyInstanceUID")),
            ("series_instance_uid", _uid(ds, "SeriesInstanceUID")),
            ("sop_instance_uid", _uid(ds, "SOPInstanceUID")),
            ("sop_class_uid", sop_class),
        )
        if value
    }
    return metadata, uids


# ---------------------------------------------------------------------------------------------
# PNG and JPEG (OpenCV)

_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}  # as OpenCV returns them (palette may gain alpha)
_PNG_PHOTOMETRIC = {0: "MONOCHROME2", 2: "RGB", 3: _PALETTE, 4: "MONOCHROME2", 6: "RGB"}


def _decode_png(data: bytes, *, window: Window | None, limits: IngestLimits) -> DecodedImage:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidImage("PNG has no IHDR header")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise InvalidImage(f"PNG IHDR is invalid (bit depth {depth}, colour type {colour})")
    _check_size(height, width, 1, _PNG_CHANNELS[colour], 2 if depth == 16 else 1, limits, what="PNG image")
    image = _cv2_decode(data, "PNG")
    metadata = {"format": "PNG", "bit_depth": depth, "colour_type": colour}
    return _finish_raster(image, InputKind.PNG, "PNG", _PNG_PHOTOMETRIC[colour], window, metadata)


def _decode_jpeg(data: bytes, *, window: Window | None, limits: IngestLimits) -> DecodedImage:
    header = _jpeg_header(data)
    if header is None:
        raise InvalidImage("JPEG has no frame header (SOF)")
    marker, precision, height, width, components = header
    if height == 0:
        raise UnsupportedCodec("JPEG with the height in a DNL marker is not supported")
    _check_size(height, width, 1, max(1, components), 2 if precision > 8 else 1, limits, what="JPEG image")
    process = f"SOF{marker - 0xC0}" if marker != 0xF7 else "JPEG-LS"
    try:
        image = _cv2_decode(data, "JPEG")
    except InvalidImage:
        if marker not in (0xC0, 0xC1, 0xC2) or precision != 8:
            raise UnsupportedCodec(f"JPEG {process} with {precision}-bit samples is not supported") from None
        raise
    photometric = {1: "MONOCHROME2", 3: "RGB", 4: "CMYK"}.get(components, "RGB")
    metadata = {"format": "JPEG", "jpeg_process": process, "bit_depth": precision, "components": components}
    return _finish_raster(image, InputKind.JPEG, f"JPEG ({process})", photometric, window, metadata)


def _cv2_decode(data: bytes, name: str) -> np.ndarray:
    # IMREAD_UNCHANGED keeps 16 bit and ignores EXIF orientation: masks map back onto the stored grid.
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise InvalidImage(f"{name} data could not be decoded")
    return image


def _finish_raster(
    image: np.ndarray,
    kind: InputKind,
    transfer_syntax: str,
    photometric: str,
    window: Window | None,
    metadata: dict[str, Any],
) -> DecodedImage:
    """Shared by PNG and JPEG: OpenCV's BGR(A) to RGB source and grey pixels (alpha is dropped)."""
    if image.ndim == 3:
        bgr = np.ascontiguousarray(image[:, :, :3])
        source = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    else:
        source = grey = image
    if window is not None:
        used = window
    elif grey.dtype == np.uint8:
        used = Window.from_range(0.0, 255.0, source="full_range")
    else:
        used = _auto_window(grey, None)
    height, width = grey.shape[:2]
    return DecodedImage(
        pixels_u8=_render(grey, used),
        source=source,
        kind=kind,
        width=width,
        height=height,
        frames=1,
        frame=0,
        photometric=photometric,
        transfer_syntax=transfer_syntax,
        window_used=used,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------
# Volumes (SimpleITK)

_ITK_IO = {
    InputKind.NIFTI: ("NiftiImageIO", ".nii"),
    InputKind.MHA: ("MetaImageIO", ".mha"),
    InputKind.NRRD: ("NrrdImageIO", ".nrrd"),
}


def _nifti_version(data: bytes) -> int:
    if (
        len(data) >= 348
        and data[344:347] in (b"n+1", b"ni1")
        and struct.unpack_from("<i", data)[0] in (348, 0x5C010000)
    ):
        return 1
    if len(data) >= 540 and data[4:7] in (b"n+2", b"ni2") and struct.unpack_from("<i", data)[0] in (540, 0x1C020000):
        return 2
    return 0


def _check_volume_header(data: bytes, kind: InputKind) -> None:
    """Refuse what would make ITK open other files: detached data in MHA/NRRD, NIfTI .hdr/.img pairs."""
    if kind is InputKind.NIFTI:
        if data[344:347] == b"ni1" or data[4:7] == b"ni2":
            raise UnsupportedCodec("NIfTI header/image pairs (.hdr/.img) are not supported; send one .nii")
        return
    head = data[:65536]
    if kind is InputKind.NRRD:
        text = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        for line in text.splitlines()[1:]:
            key = line.split(b":", 1)[0].strip().lower()
            if key in (b"data file", b"datafile"):
                raise InvalidImage("NRRD with a detached data file is refused; send an attached .nrrd")
        return
    for line in head.splitlines():
        key, _, value = line.partition(b"=")
        if key.strip() == b"ElementDataFile":
            if value.strip() != b"LOCAL":
                raise InvalidImage("MetaImage must hold its data (ElementDataFile = LOCAL); detached data is refused")
            return
    raise InvalidImage("MetaImage header has no ElementDataFile = LOCAL")


# SimpleITK runs in a child process: fuzzed NIfTI headers made ITK 5.4 corrupt the heap ("double
# free"), which in the gateway would take every in-flight request down. The child reports the
# header, waits for our limit check, then reads and saves the one slice as .npy.
_ITK_CHILD = r"""
import json, sys
import numpy as np
import SimpleITK as sitk
sitk.ProcessObject.SetGlobalWarningDisplay(False)
path, io_name, out = sys.argv[1:4]
reader = sitk.ImageFileReader()
reader.SetImageIO(io_name)
reader.SetFileName(path)
try:
    reader.ReadImageInformation()
except RuntimeError:
    print(json.dumps({"error": "header"}), flush=True)
    sys.exit(0)
size = [int(n) for n in reader.GetSize()]
print(json.dumps({
    "size": size,
    "components": int(reader.GetNumberOfComponents()),
    "pixel_type": sitk.GetPixelIDValueAsString(reader.GetPixelID()),
    "spacing": [float(s) for s in reader.GetSpacing()],
}), flush=True)
command = sys.stdin.readline().split()
if len(command) != 2 or command[0] != "read":
    sys.exit(0)
try:
    image = reader.Execute()  # whole image: ITK's streamed slice read of vector NIfTI corrupts the heap
except RuntimeError:
    print(json.dumps({"error": "pixels"}), flush=True)
    sys.exit(0)
view = sitk.GetArrayViewFromImage(image)  # axes: [..., z, y, x] (+ components)
for _ in range(len(size) - 3):
    view = view[0]  # a 4-D series: its first volume
np.save(out, np.array(view[int(command[1])] if len(size) >= 3 else view), allow_pickle=False)
print(json.dumps({"saved": True}), flush=True)
"""


def _decode_volume(
    data: bytes, kind: InputKind, *, frame: int | None, window: Window | None, limits: IngestLimits
) -> DecodedImage:
    _check_volume_header(data, kind)
    io_name, suffix = _ITK_IO[kind]
    with tempfile.TemporaryDirectory(prefix="medgate-ingest-") as folder:
        path, out = Path(folder) / f"input{suffix}", Path(folder) / "slice.npy"
        path.write_bytes(data)
        command = [sys.executable, "-I", "-c", _ITK_CHILD, str(path), io_name, str(out)]
        child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=folder
        )
        timer = threading.Timer(limits.max_volume_read_seconds, child.kill)
        timer.start()
        try:
            info = _child_message(child, kind, stage="header")
            size = [int(n) for n in info["size"]]
            components = int(info["components"])
            type_name = str(info["pixel_type"])
            if len(size) < 2:
                raise InvalidImage(f"{kind.name} image has {len(size)} dimension(s); need at least 2")
            width, height = size[0], size[1]
            slices = size[2] if len(size) >= 3 else 1
            others = math.prod(size[3:])
            _check_size(
                height,
                width,
                slices * others,
                components,
                _itk_component_bytes(type_name),
                limits,
                what=f"{kind.name} image",
                decoded_frames=slices * others,
            )
            index = _choose_frame(frame, slices)
            assert child.stdin is not None
            child.stdin.write(f"read {index}\n".encode())
            child.stdin.flush()
            _child_message(child, kind, stage="pixel data")
            array = _native_order(np.load(out, allow_pickle=False))
        finally:
            timer.cancel()
            child.kill()
            child.wait()
    expected = (height, width, components) if components > 1 else (height, width)
    if array.shape != expected:
        raise InvalidImage(f"{kind.name} slice has shape {array.shape}, expected {expected}")
    if components > 1:
        source = array
        grey = _luma(array[..., :3]) if components >= 3 else array[..., 0]
        photometric = "RGB" if components >= 3 else "MONOCHROME2"
    else:
        source = grey = array
        photometric = "MONOCHROME2"
    used = window or (
        Window.from_range(0.0, 255.0, source="full_range") if grey.dtype == np.uint8 else _auto_window(grey, None)
    )
    spacing = [float(s) for s in info.get("spacing", [])]
    return DecodedImage(
        pixels_u8=_render(grey, used),
        source=source,
        kind=kind,
        width=width,
        height=height,
        frames=slices,
        frame=index,
        photometric=photometric,
        transfer_syntax=kind.name,
        window_used=used,
        metadata={"format": kind.name, "size": size, "spacing_mm": spacing, "pixel_type": type_name},
    )


def _child_message(child: subprocess.Popen[bytes], kind: InputKind, *, stage: str) -> dict[str, Any]:
    """The child's next JSON line; a crash, a kill by the timer or an error line become InvalidImage."""
    assert child.stdout is not None
    line = child.stdout.readline(65536)
    try:
        message = json.loads(line) if line else None
    except ValueError:
        message = None
    if not isinstance(message, dict):
        reason = "timed out" if child.poll() == -signal.SIGKILL else "the reader crashed"
        raise InvalidImage(f"{kind.name} {stage} could not be read ({reason})")
    if "error" in message:
        raise InvalidImage(f"{kind.name} {stage} could not be read")
    return message


def _itk_component_bytes(type_name: str) -> int:
    match = re.search(r"(\d+)-bit", type_name)
    bits = int(match.group(1)) if match else 64
    return max(1, bits // 8) * (2 if "complex" in type_name else 1)


# ---------------------------------------------------------------------------------------------
# Arrays


def _decode_array(array: np.ndarray, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    binary = array.dtype == np.bool_
    if binary:
        array = array.view(np.uint8)
    if array.dtype.kind not in "uif" or array.dtype.itemsize > 8:
        raise InvalidImage(f"array dtype {array.dtype.str} is not supported (need bool, int, uint or float)")
    colour = array.ndim in (3, 4) and array.shape[-1] in (3, 4)
    if array.ndim == 2 or (array.ndim == 3 and colour):
        frames, stack = 1, False
    elif array.ndim == 3 or (array.ndim == 4 and colour):
        frames, stack = array.shape[0], True
    else:
        raise InvalidImage(f"array shape {array.shape} is not (H, W), (H, W, 3|4), (N, H, W) or (N, H, W, 3|4)")
    height, width = array.shape[int(stack)], array.shape[int(stack) + 1]
    samples = array.shape[-1] if colour else 1
    _check_size(height, width, frames, samples, array.dtype.itemsize, limits, what="array")
    index = _choose_frame(frame, frames)
    image = _native_order(np.ascontiguousarray(array[index] if stack else array))
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    if colour:
        source, grey, photometric = image, _luma(image[..., :3]), "RGB"
    else:
        source, grey, photometric = image, image, "MONOCHROME2"
    if window is not None:
        used = window
    elif grey.dtype == np.uint8:
        used = Window.from_range(0.0, 1.0 if binary else 255.0, source="full_range")
    else:
        used = _auto_window(grey, None)
    return DecodedImage(
        pixels_u8=_render(grey, used),
        source=source,
        kind=InputKind.ARRAY,
        width=width,
        height=height,
        frames=frames,
        frame=index,
        photometric=photometric,
        transfer_syntax="array",
        window_used=used,
        metadata={"dtype": array.dtype.str, "shape": list(array.shape)},
    )


# ---------------------------------------------------------------------------------------------
# Rendering

_CV_DTYPES = {np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64)}
_AUTO_SAMPLES = 1 << 18


def _luma(rgb: np.ndarray) -> np.ndarray:
    """BT.601 grey, kept in the input's range (OpenCV for 8/16-bit and float32)."""
    rgb = np.ascontiguousarray(rgb)
    if rgb.dtype in (np.uint8, np.uint16, np.float32):
        return np.asarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    weights = np.array([0.299, 0.587, 0.114], dtype=np.float64)
    return np.asarray(rgb.astype(np.float64) @ weights)


def _auto_window(values: np.ndarray, padding: np.ndarray | None) -> Window:
    """Percentiles 0.5/99.5 of a strided sample (fast on big radiographs), padding excluded."""
    step = max(1, int(math.sqrt(values.size / _AUTO_SAMPLES)))
    sample = values[::step, ::step]
    if padding is not None:
        sample = sample[~padding[::step, ::step]]
    sample = sample.ravel()
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return Window.from_range(0.0, 1.0, source="auto")
    low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if not high > low:
        low, high = float(sample.min()), float(sample.max())
    if not high > low:
        high = low + 1.0
    return Window.from_range(low, high, source="auto")


def _render(values: np.ndarray, window: Window, *, invert: bool = False) -> np.ndarray:
    """Values to uint8 through ``window`` (linear in one OpenCV pass, or DICOM's sigmoid).

    ``invert`` (MONOCHROME1) is folded into the same pass: 255 - y.
    """
    if window.function == "SIGMOID":
        x = values.astype(np.float32)
        y = 255.0 / (1.0 + np.exp(np.float32(-4.0 / window.width) * (x - np.float32(window.center))))
        y = 255.0 - y if invert else y
        return np.asarray(np.rint(y), dtype=np.uint8)
    low, high = window.low, window.high
    if values.dtype == np.uint8 and low == 0.0 and high == 255.0 and not invert:
        return np.ascontiguousarray(values)
    if values.dtype not in _CV_DTYPES:
        values = values.astype(np.float64)
    values = np.ascontiguousarray(values)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
    if not high > low:
        on, off = (np.uint8(0), np.uint8(255)) if invert else (np.uint8(255), np.uint8(0))
        return np.where(values > low, on, off)
    scale = 255.0 / (high - low)
    alpha, beta = (-scale, 255.0 + low * scale) if invert else (scale, -low * scale)
    # addWeighted saturates to 0..255 and rounds: one multithreaded pass instead of numpy's three.
    return np.asarray(cv2.addWeighted(values, alpha, values, 0.0, beta, dtype=cv2.CV_8U))
