"""Masks from the models to what an answer carries: areas, boxes on the original image, wire arrays.

Pixel work on up to N x 1024 x 1024 masks (and their back-mapping to a 2,000 x 2,000 radiograph):
it runs on the gateway's executor, never on the event loop. Pure: no gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.imaging.arrays import WireArray, encode_array
from services.imaging.preprocess import Letterbox

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class MaskSummary:
    """One mask: its area in model pixels and its bounding box on the original image (None if empty)."""

    area_pixels: int
    original_box: Box | None


@dataclass(frozen=True)
class EncodedMasks:
    stacked: np.ndarray  # [N, 1024, 1024] uint8 in model space (kept for review routing)
    summaries: list[MaskSummary]
    model_space: WireArray | None
    original_space: WireArray | None


def summarize_mask(mask: np.ndarray, transform: Letterbox) -> MaskSummary:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return MaskSummary(area_pixels=0, original_box=None)
    model_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
    x0, y0, x1, y1 = (float(v) for v in transform.boxes_to_original(model_box)[0])
    return MaskSummary(area_pixels=int(xs.size), original_box=(x0, y0, x1, y1))


def encode_masks(
    masks: list[np.ndarray], transform: Letterbox, *, model_space: bool, original_space: bool, packbits: bool
) -> EncodedMasks:
    """Stack the per-prompt masks, summarise each, and encode them in the pixel spaces the caller asked for."""
    stacked = np.stack(masks).astype(np.uint8, copy=False)
    return EncodedMasks(
        stacked=stacked,
        summaries=[summarize_mask(mask, transform) for mask in stacked],
        model_space=encode_array(stacked, packbits=packbits) if model_space else None,
        original_space=encode_array(transform.mask_to_original(stacked), packbits=packbits) if original_space else None,
    )
