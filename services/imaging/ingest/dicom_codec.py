"""DICOM bytes to one frame's stored values: bounded Deflate, the transfer syntax, codestream checks, the plugins."""

from __future__ import annotations

import struct
import zlib
from typing import Any

import numpy as np
import pydicom.encaps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from services.imaging.errors import InvalidImage, UnsupportedCodec
from services.imaging.ingest.dicom_attrs import uid
from services.imaging.ingest.guards import PASS_THROUGH, check_size, inflate
from services.imaging.ingest.raster import jpeg_header
from services.imaging.ingest.sniff import JP2_MAGIC
from services.imaging.limits import IngestLimits

DEFLATED = "1.2.840.10008.1.2.1.99"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# pydicom decoder plugins we let near untrusted data, in order. GDCM is left out: on a fuzzed
# JPEG it threw a C++ exception through SWIG and aborted the whole process (std::terminate);
# pylibjpeg decodes every compressed file of pydicom's and pydicom-data's corpus without it.
DICOM_DECODER_PLUGINS = ("pylibjpeg", "pydicom", "pillow")


def scan_file_meta(data: bytes) -> tuple[int, str | None, tuple[int, int] | None]:
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


def inflate_dicom(data: bytes, meta_end: int, span: tuple[int, int], limits: IngestLimits) -> bytes:
    """Inflate a Deflated data set with a bound and relabel it Explicit VR Little Endian.

    pydicom would call zlib.decompress on it unbounded; the new UID is NUL-padded into the old
    value's length so the meta group's lengths stay valid (UI values may carry trailing NULs).
    """
    value_at, length = span
    replacement = str(ExplicitVRLittleEndian).encode().ljust(length, b"\x00")
    if len(replacement) != length:
        raise InvalidImage("DICOM transfer syntax UID is malformed")
    body = inflate(data[meta_end:], -zlib.MAX_WBITS, limits, what="deflated DICOM data set")
    return data[:value_at] + replacement + data[value_at + length : meta_end] + body


def decode_frame(
    decoder: Any, ds: Dataset, *, index: int, plugins: tuple[str, ...], label: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """One frame through each allowed plugin in turn (YBR becomes RGB, pydicom's default).

    When every plugin refuses for a reason of its own (a feature it lacks, or a strictness other
    decoders do not have) the file is real and our codecs are the limit: UnsupportedCodec
    (FAILED_PRECONDITION) naming the transfer syntax. Any other failure means the bytes are bad:
    InvalidImage. Plugin messages are classified, never passed on.
    """
    failures: list[str] = []
    refusals: list[str] = []
    for plugin in plugins or ("",):
        try:
            array, properties = decoder.as_array(ds, index=index, decoding_plugin=plugin)
            return array, dict(properties)
        except PASS_THROUGH:
            raise
        except BaseException as exc:  # incl. pyo3's PanicException from the Rust RLE decoder
            failures.append(type(exc).__name__)
            refusal = _codec_refusal(exc)
            if refusal is not None:
                refusals.append(f"{plugin or 'pydicom'}: {refusal}")
    if refusals and len(refusals) == len(failures):
        raise UnsupportedCodec(
            f"transfer syntax {label}: the installed decoders cannot decode this pixel data ({'; '.join(refusals)})"
        )
    raise InvalidImage(f"DICOM pixel data could not be decoded ({label}; {', '.join(failures)})")


# What a plugin says when the codec, not the data, is the limit (pydicom 3.0 and pylibjpeg wording).
_UNSUPPORTED_FEATURE = ("does not support", "is not supported", "not implemented")
# libjpeg (pylibjpeg) refuses sequential JPEG whose SOS spectral selection is not 0..63; IJG
# libjpeg (dcmtk, GDCM, Pillow) only warns and decodes. pydicom's JPEG-lossy.dcm (NEMA WG04
# NM1_JPLY, 12-bit) has such a header: dcmtk's dcmj2pnm renders it.
_STRICT_SCAN_HEADER = "scan start must be zero and scan stop must be 63"


def _codec_refusal(exc: BaseException) -> str | None:
    """A fixed description when ``exc`` says the codec cannot handle valid data, else None."""
    if isinstance(exc, NotImplementedError):
        return "not supported"
    text = str(exc)
    if _STRICT_SCAN_HEADER in text:
        return "refuses the sequential scan header other decoders accept"
    if any(phrase in text for phrase in _UNSUPPORTED_FEATURE):
        return "not supported"
    return None


def transfer_syntax(ds: Dataset, *, bare: bool) -> str:
    """The data set's transfer syntax; for files without meta, the encoding pydicom read."""
    meta = getattr(ds, "file_meta", None)
    ts = uid(meta, "TransferSyntaxUID") if meta is not None else None
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


def ts_name(ts: str) -> str:
    name = UID(ts).name
    return name if name else ts


def ts_label(ts: str) -> str:
    name = UID(ts).name
    return f"{name} ({ts})" if name and name != ts else ts


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
    if not data.startswith(JP2_MAGIC):
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


def check_codestream(
    ds: Dataset, *, index: int, frames: int, rows: int, columns: int, label: str, limits: IngestLimits
) -> None:
    """Codecs allocate from their own header, so that header must agree with Rows/Columns first."""
    try:
        encoded = pydicom.encaps.get_frame(ds.PixelData, index, number_of_frames=frames)
    except Exception as exc:
        raise InvalidImage(f"DICOM encapsulated pixel data is malformed ({label}; {type(exc).__name__})") from None
    _check_jp2_boxes(encoded)
    if encoded[:2] == b"\xff\xd8":
        header = jpeg_header(encoded)
        size = (header[2], header[3], header[4]) if header else None
    else:
        size = _j2k_header(encoded)
    if size is None:
        return  # RLE and anything we cannot parse: the decoder sizes its output from the DICOM header
    height, width, components = size
    if height and (height, width) != (rows, columns):
        raise InvalidImage(f"{label} codestream is {width}x{height} but the DICOM header says {columns}x{rows}")
    check_size(height or rows, width, 1, max(1, components), 2, limits, what=f"{label} codestream")
