"""Already-decoded arrays: (H, W), (H, W, 3|4) RGB(A), (N, H, W) or (N, H, W, 3|4)."""

from __future__ import annotations

import numpy as np

from services.imaging.errors import InvalidImage
from services.imaging.ingest.guards import check_size, choose_frame, native_order
from services.imaging.ingest.image import DecodedImage, ImageMetadata, InputKind, Window
from services.imaging.ingest.render import default_window, luma, render
from services.imaging.limits import IngestLimits

__all__ = ["decode_array"]


def decode_array(array: np.ndarray, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
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
    check_size(height, width, frames, samples, array.dtype.itemsize, limits, what="array")
    index = choose_frame(frame, frames)
    image = native_order(np.ascontiguousarray(array[index] if stack else array))
    if image.dtype == np.float16:
        image = image.astype(np.float32)
    if colour:
        source, grey, photometric = image, luma(image[..., :3]), "RGB"
    else:
        source, grey, photometric = image, image, "MONOCHROME2"
    used = window or default_window(grey, top=1.0 if binary else 255.0)
    info = ImageMetadata(
        kind=InputKind.ARRAY,
        rows=height,
        columns=width,
        frames=frames,
        frame=index,
        photometric_interpretation=photometric,
        transfer_syntax="array",
        window=used,
    )
    return DecodedImage(pixels_u8=render(grey, used), source=source, info=info)
