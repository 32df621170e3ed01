"""Checks every format shares: limits from header values before allocation, bounded inflate, frame choice."""

from __future__ import annotations

import zlib

import numpy as np

from services.imaging.errors import InvalidImage, LimitExceeded
from services.imaging.limits import IngestLimits


def check_size(
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


def choose_frame(frame: int | None, frames: int) -> int:
    """The requested 0-based frame, checked, or the middle one."""
    if frame is None:
        return frames // 2
    if not 0 <= frame < frames:
        raise InvalidImage(f"frame {frame} is out of range: the image has {frames} frame(s)")
    return int(frame)


def inflate(data: bytes, wbits: int, limits: IngestLimits, *, what: str) -> bytes:
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


def native_order(array: np.ndarray) -> np.ndarray:
    if array.dtype.byteorder not in ("=", "|"):
        return array.astype(array.dtype.newbyteorder("="))
    return array


# Never turned into domain errors; everything else a third-party decoder raises is.
PASS_THROUGH = (KeyboardInterrupt, SystemExit, GeneratorExit)
