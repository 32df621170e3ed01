"""PNG and JPEG through OpenCV, sized from their own headers (IHDR, SOF) before OpenCV allocates."""

from __future__ import annotations

import struct

import cv2
import numpy as np

from services.imaging.errors import InvalidImage, UnsupportedCodec
from services.imaging.ingest.guards import check_size
from services.imaging.ingest.image import DecodedImage, ImageMetadata, InputKind, Window
from services.imaging.ingest.render import default_window, render
from services.imaging.limits import IngestLimits

__all__ = ["decode_jpeg", "decode_png", "jpeg_header"]

_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}  # as OpenCV returns them (palette may gain alpha)
_PNG_PHOTOMETRIC = {0: "MONOCHROME2", 2: "RGB", 3: "PALETTE COLOR", 4: "MONOCHROME2", 6: "RGB"}
_SOF_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def decode_png(data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    """``frame`` is accepted for the common decoder signature; a PNG has one frame."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise InvalidImage("PNG has no IHDR header")
    width, height, depth, colour = struct.unpack_from(">IIBB", data, 16)
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise InvalidImage(f"PNG IHDR is invalid (bit depth {depth}, colour type {colour})")
    check_size(height, width, 1, _PNG_CHANNELS[colour], 2 if depth == 16 else 1, limits, what="PNG image")
    image = _cv2_decode(data, "PNG")
    return _finish(image, InputKind.PNG, "PNG", _PNG_PHOTOMETRIC[colour], window)


def decode_jpeg(data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    """Baseline and extended 8-bit JPEG (what OpenCV's libjpeg reads); others are UnsupportedCodec."""
    header = jpeg_header(data)
    if header is None:
        raise InvalidImage("JPEG has no frame header (SOF)")
    marker, precision, height, width, components = header
    if height == 0:
        raise UnsupportedCodec("JPEG with the height in a DNL marker is not supported")
    check_size(height, width, 1, max(1, components), 2 if precision > 8 else 1, limits, what="JPEG image")
    process = f"SOF{marker - 0xC0}" if marker != 0xF7 else "JPEG-LS"
    try:
        image = _cv2_decode(data, "JPEG")
    except InvalidImage:
        if marker not in (0xC0, 0xC1, 0xC2) or precision != 8:
            raise UnsupportedCodec(f"JPEG {process} with {precision}-bit samples is not supported") from None
        raise
    photometric = {1: "MONOCHROME2", 3: "RGB", 4: "CMYK"}.get(components, "RGB")
    return _finish(image, InputKind.JPEG, f"JPEG ({process})", photometric, window)


def jpeg_header(data: bytes) -> tuple[int, int, int, int, int] | None:
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


def _cv2_decode(data: bytes, name: str) -> np.ndarray:
    # IMREAD_UNCHANGED keeps 16 bit and ignores EXIF orientation: masks map back onto the stored grid.
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise InvalidImage(f"{name} data could not be decoded")
    return image


def _finish(
    image: np.ndarray, kind: InputKind, transfer_syntax: str, photometric: str, window: Window | None
) -> DecodedImage:
    """Shared by PNG and JPEG: OpenCV's BGR(A) to RGB source and grey pixels (alpha is dropped)."""
    if image.ndim == 3:
        bgr = np.ascontiguousarray(image[:, :, :3])
        source = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    else:
        source = grey = image
    used = window or default_window(grey)
    height, width = grey.shape[:2]
    info = ImageMetadata(
        kind=kind,
        rows=height,
        columns=width,
        frames=1,
        frame=0,
        photometric_interpretation=photometric,
        transfer_syntax=transfer_syntax,
        window=used,
    )
    return DecodedImage(pixels_u8=render(grey, used), source=source, info=info)
