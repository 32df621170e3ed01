"""Letterbox to the square model input (aspect kept, black padding) and its exact inverse."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MODEL_SIZE = 1024


@dataclass(frozen=True)
class Letterbox:
    """How an original image of ``original_height x original_width`` sits in the model square.

    model = original * scale + (pad_left, pad_top); the inverse maps boxes and masks back.
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
        offset = np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], dtype=np.float64)
        return boxes * self.scale + offset

    def boxes_to_original(self, boxes: np.ndarray) -> np.ndarray:
        """Model-space boxes [N, 4] to original pixels, clipped to the image."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        offset = np.array([self.pad_left, self.pad_top, self.pad_left, self.pad_top], dtype=np.float64)
        out = (boxes - offset) / self.scale
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, self.original_width)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, self.original_height)
        return out

    def mask_to_original(self, mask: np.ndarray) -> np.ndarray:
        """A model-space mask [..., size, size] back onto the original pixel grid (nearest neighbour)."""
        crop = mask[
            ...,
            self.pad_top : self.pad_top + self.resized_height,
            self.pad_left : self.pad_left + self.resized_width,
        ]
        flat = crop.reshape((-1, self.resized_height, self.resized_width))
        out = np.empty((flat.shape[0], self.original_height, self.original_width), dtype=mask.dtype)
        for index, plane in enumerate(flat):
            out[index] = cv2.resize(
                plane, (self.original_width, self.original_height), interpolation=cv2.INTER_NEAREST
            )
        return out.reshape((*mask.shape[:-2], self.original_height, self.original_width))

    def mask_to_model(self, mask: np.ndarray) -> np.ndarray:
        """An original-grid mask [H, W] into model space (nearest neighbour, zero padding)."""
        resized = cv2.resize(
            mask, (self.resized_width, self.resized_height), interpolation=cv2.INTER_NEAREST
        )
        out = np.zeros((self.size, self.size), dtype=mask.dtype)
        out[
            self.pad_top : self.pad_top + self.resized_height,
            self.pad_left : self.pad_left + self.resized_width,
        ] = resized
        return out


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
