"""Segmentation answers: a reviewer's masks from the wire, and A2I's ``labeledImage`` PNG made from them.

A2I's semantic-segmentation template answers ``{"annotatedResult": {"inputImageProperties", "labelMappings":
{label: {"color": "#rrggbb"}}, "labeledImage": {"pngImageData": <base64 RGB PNG>}}}``: one colour per label,
background white (Ground Truth's ``BACKGROUND`` colour), a later label painted over an earlier one.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from medgate.v1 import inference_pb2 as ipb
from services.imaging.arrays import decode_array
from services.review.flows import InvalidArgument

# Ground Truth's label colours, in the order its semantic-segmentation tool hands them out.
PALETTE = ("#2ca02c", "#1f77b4", "#ff7f0e", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
BACKGROUND = "#ffffff"


def wire_masks(array: ipb.NDArray, size: int) -> np.ndarray:
    """A mask answer as [N, size, size] uint8 0/1; raises InvalidArgument naming what does not fit."""
    shape = [int(v) for v in array.shape]
    if len(shape) == 2:
        shape = [1, *shape]
    if len(shape) != 3 or shape[1:] != [size, size] or not 1 <= shape[0] <= 64:
        raise InvalidArgument(f"a corrected mask must be {size}x{size} or [N, {size}, {size}], got {list(array.shape)}")
    try:
        masks = decode_array(
            array.data, shape, array.dtype or "uint8", packbits=array.encoding == ipb.ARRAY_ENCODING_PACKBITS
        )
    except ValueError as exc:
        raise InvalidArgument(f"corrected mask: {exc}") from None
    return (np.asarray(masks) != 0).astype(np.uint8)


def labeled_image(masks: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """A2I's ``annotatedResult`` for [N, H, W] 0/1 masks, mask ``i`` labelled ``labels[i]``."""
    count, height, width = masks.shape
    if len(labels) != count:
        raise InvalidArgument(f"{count} masks need {count} labels, got {len(labels)}")
    colours: dict[str, str] = {}
    for label in labels:
        colours.setdefault(label, PALETTE[len(colours) % len(PALETTE)])
    image = np.empty((height, width, 3), np.uint8)
    image[:] = _bgr(BACKGROUND)
    for mask, label in zip(masks, labels, strict=True):
        image[mask != 0] = _bgr(colours[label])
    ok, png = cv2.imencode(".png", image)
    if not ok:
        raise RuntimeError("PNG encoding of the labeled image failed")
    return {
        "inputImageProperties": {"width": width, "height": height},
        "labelMappings": {label: {"color": colour} for label, colour in colours.items()},
        "labeledImage": {"pngImageData": base64.b64encode(png.tobytes()).decode()},
    }


def _bgr(colour: str) -> tuple[int, int, int]:
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return blue, green, red


def read_labeled_image(document: dict[str, Any]) -> dict[str, np.ndarray]:
    """The inverse, for checks and exports: label -> H x W bool mask of the pixels painted in its colour."""
    png = base64.b64decode(document["labeledImage"]["pngImageData"])
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return {
        label: np.all(image == np.array(_bgr(m["color"]), np.uint8), axis=2)
        for label, m in document["labelMappings"].items()
    }
