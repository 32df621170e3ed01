"""Letterbox to the square model input (aspect kept, black padding) and its exact inverse.

Coordinates are continuous with pixel ``i`` covering [i, i + 1) (OpenCV's half-pixel convention,
the one ``cv2.resize`` uses), so a box edge maps as ``x * scale_x + pad_left``. Masks are resampled
at pixel centres: output pixel ``i`` takes the input pixel under ``(i + 0.5) / scale``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MODEL_SIZE = 1024


@dataclass(frozen=True)
class Letterbox:
    """How an original image of ``original_height x original_width`` sits in the model square.

    model = (x * scale_x + pad_left, y * scale_y + pad_top); the inverse maps boxes and masks back.
    ``scale`` is the long side's factor (``size / max(height, width)``); the short side is rounded
    to whole pixels, so its own factor (``scale_x`` or ``scale_y``) can differ from ``scale``: a
    5000x7 image is resized to 1024x1, 1/7 and not 0.2048 on its short side.
    """

    original_height: int
    original_width: int
    scale: float
    pad_top: int
    pad_left: int
    resized_height: int
    resized_width: int
    size: int = MODEL_SIZE

    @classmethod
    def for_shape(cls, height: int, width: int, size: int = MODEL_SIZE) -> Letterbox:
        if height <= 0 or width <= 0:
            raise ValueError(f"image has no pixels ({height}x{width})")
        scale = size / max(height, width)
        resized_height = max(1, min(size, round(height * scale)))
        resized_width = max(1, min(size, round(width * scale)))
        return cls(
            original_height=height,
            original_width=width,
            scale=scale,
            pad_top=(size - resized_height) // 2,
            pad_left=(size - resized_width) // 2,
            resized_height=resized_height,
            resized_width=resized_width,
            size=size,
        )

    @property
    def scale_x(self) -> float:
        """Model pixels per original pixel horizontally: the resize that happened, not the nominal scale."""
        return self.resized_width / self.original_width

    @property
    def scale_y(self) -> float:
        """Model pixels per original pixel vertically."""
        return self.resized_height / self.original_height

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Resize ``image`` (H, W) uint8 into the padded square."""
        if image.shape[:2] != (self.original_height, self.original_width):
            raise ValueError(f"image shape {image.shape[:2]} does not match the letterbox's original size")
        if (self.resized_height, self.resized_width) == image.shape[:2] == (self.size, self.size):
            return np.ascontiguousarray(image)  # already the model square: nothing to resize or pad
        shrinking = self.scale < 1.0
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = cv2.resize(image, (self.resized_width, self.resized_height), interpolation=interpolation)
        out = np.zeros((self.size, self.size, *image.shape[2:]), dtype=image.dtype)
        out[
            self.pad_top : self.pad_top + self.resized_height,
            self.pad_left : self.pad_left + self.resized_width,
        ] = resized
        return out

    def boxes_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """Original-pixel boxes [N, 4] (x0, y0, x1, y1) to model space."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        return boxes * self._scales() + self._offset()

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Model-space boxes [N, 4] to original pixels, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out = (boxes - self._offset()) / self._scales()
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.original_width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.original_height)
        return out

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """A model-space mask [..., size, size] back onto the original pixel grid (nearest pixel centre)."""
        crop = mask[
            ...,
            self.pad_top : self.pad_top + self.resized_height,
            self.pad_left : self.pad_left + self.resized_width,
        ]
        rows = _centre_indices(self.resized_height, self.original_height)
        columns = _centre_indices(self.resized_width, self.original_width)
        return np.ascontiguousarray(crop.take(rows, axis=-2).take(columns, axis=-1))

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """An original-grid mask [..., H, W] into model space (nearest pixel centre, zero padding)."""
        if mask.shape[-2:] != (self.original_height, self.original_width):
            raise ValueError(f"mask shape {mask.shape[-2:]} does not match the letterbox's original size")
        rows = _centre_indices(self.original_height, self.resized_height)
        columns = _centre_indices(self.original_width, self.resized_width)
        out = np.zeros((*mask.shape[:-2], self.size, self.size), dtype=mask.dtype)
        out[
            ...,
            self.pad_top : self.pad_top + self.resized_height,
            self.pad_left : self.pad_left + self.resized_width,
        ] = mask.take(rows, axis=-2).take(columns, axis=-1)
        return out

    def _scales(self) -> np.ndarray:
        return np.array([self.scale_x, self.scale_y, self.scale_x, self.scale_y], dtype=np.float64)

    def _offset(self) -> np.ndarray:
        return np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], dtype=np.float64)


def _centre_indices(source: int, target: int) -> np.ndarray:
    """For each of ``target`` output pixels, the ``source`` pixel under its centre.

    floor((i + 0.5) * source / target) in integers, so it is exact at any size. OpenCV's
    INTER_NEAREST samples floor(i * source / target), the pixel's corner: mapping a mask up and
    back then moved one edge by a pixel. Centre sampling makes original -> model -> original the
    identity when the model grid is the finer one (images up to 1024 px), and model -> original
    -> model the identity when it is the coarser one.
    """
    index = np.arange(target, dtype=np.int64)
    return (2 * index + 1) * source // (2 * target)


def letterbox(image: np.ndarray, size: int = MODEL_SIZE) -> tuple[np.ndarray, Letterbox]:
    """Letterbox a uint8 image (H, W) into ``size x size``; returns the square and its transform."""
    transform = Letterbox.for_shape(image.shape[0], image.shape[1], size)
    return transform.apply(image), transform


def window_to_uint8(pixels: np.ndarray, low: float, high: float, *, invert: bool = False) -> np.ndarray:
    """Linear window [low, high] to 0..255 (MONOCHROME1 inverts)."""
    if not high > low:
        high = low + 1.0
    scaled = (pixels.astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
    out = np.clip(scaled, 0, 255).astype(np.uint8)
    return 255 - out if invert else out
