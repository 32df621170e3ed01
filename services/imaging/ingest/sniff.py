"""What the bytes are, from magic numbers alone: no parser runs and nothing is imported but the standard library."""

from __future__ import annotations

import struct
from collections.abc import Callable

from services.imaging.ingest.image import InputKind

__all__ = ["SNIFFERS", "SUPPORTED_FORMATS", "may_be_bare_dicom", "sniff", "unsupported_format"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
JP2_MAGIC = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
# Enough of a file to sniff every supported magic number (NIfTI-2's header is 540 bytes).
HEAD_BYTES = 544
SUPPORTED_FORMATS = "DICOM, PNG, JPEG, NIfTI, MHA or NRRD"

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
    (JP2_MAGIC, "JPEG 2000 (JP2)"),
    (b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (b"PK\x03\x04", "ZIP"),
    (b"BZh", "bzip2"),
    (b"%PDF-", "PDF"),
)


def is_dicom(data: bytes) -> bool:
    """A DICOM file: 128-byte preamble, then ``DICM`` (a bare data set is :func:`may_be_bare_dicom`)."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def is_png(data: bytes) -> bool:
    return data.startswith(PNG_MAGIC)


def is_jpeg(data: bytes) -> bool:
    return data.startswith(b"\xff\xd8\xff")


def nifti_version(data: bytes) -> int:
    """1 or 2 for a NIfTI-1/-2 header (single file or header of a pair), else 0."""
    if (
        len(data) >= 348
        and data[344:347] in (b"n+1", b"ni1")
        and struct.unpack_from("<i", data)[0] in (348, 0x5C010000)
    ):
        return 1
    if len(data) >= 540 and data[4:7] in (b"n+2", b"ni2") and struct.unpack_from("<i", data)[0] in (540, 0x1C020000):
        return 2
    return 0


def is_nifti(data: bytes) -> bool:
    return nifti_version(data) > 0


def is_nrrd(data: bytes) -> bool:
    return data.startswith(b"NRRD000")


def is_mha(data: bytes) -> bool:
    return data.lstrip()[:32].startswith(_METAIO_KEYS)


# In the order they are tried; each format's decoder is paired with its sniffer in the package's table.
SNIFFERS: dict[InputKind, Callable[[bytes], bool]] = {
    InputKind.DICOM: is_dicom,
    InputKind.PNG: is_png,
    InputKind.JPEG: is_jpeg,
    InputKind.NIFTI: is_nifti,
    InputKind.NRRD: is_nrrd,
    InputKind.MHA: is_mha,
}


def sniff(data: bytes) -> InputKind | None:
    """The format of ``data`` (its first :data:`HEAD_BYTES` suffice) by magic number, or None.

    A DICOM data set without the preamble is not recognised here: see :func:`may_be_bare_dicom`.

    >>> sniff(b"\\x89PNG\\r\\n\\x1a\\n" + bytes(24))
    <InputKind.PNG: 'png'>
    """
    for kind, matches in SNIFFERS.items():
        if matches(data):
            return kind
    return None


def unsupported_format(data: bytes) -> str | None:
    """The name of an image or archive format we recognise but do not read, for a precise error."""
    for magic, name in _UNSUPPORTED_MAGIC:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def may_be_bare_dicom(data: bytes) -> bool:
    """A DICOM data set without preamble starts with a group 0002 or 0008 tag (either byte order)."""
    if len(data) < 8:
        return False
    return struct.unpack_from("<H", data)[0] in (0x0002, 0x0008) or struct.unpack_from(">H", data)[0] == 0x0008
