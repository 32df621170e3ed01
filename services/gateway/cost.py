"""What a request will cost the models, estimated before any model runs, and the per-request budget.

Pure: no gRPC, no Triton. The estimate counts the units of work the models really do: LiteMedSAM encoder passes
(the box model's dominant cost: ~0.5 s each on an idle CPU core pair), whole-image passes of the other models
(classifier, detector, text segmenter: one each, whatever the prompts), and the pixels decoded. Each unit has a
configured price in milliseconds (``gateway.cost_*_ms``), so the budget ``gateway.max_request_cost_ms`` reads as
"how long one request may occupy the models" on the machine the prices were measured on.

The box model groups nearby small boxes into one shared zoomed window (``triton_models/segmenter_box/1/model.py``);
:func:`box_groups` is the same rule, written again here because the model cannot import the services (and the
services must not need the model repository). ``tests/test_cost_budget.py`` checks the two agree, box for box,
and against the model's own ``encoder_passes`` output on the real Triton.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.imaging.preprocess import MODEL_SIZE
from services.rpc.errors import RequestTooLarge


class CostTooHigh(RequestTooLarge):
    """The request's estimated cost exceeds the per-request budget (RESOURCE_EXHAUSTED, naming both)."""


@dataclass(frozen=True)
class BoxWindows:
    """The box model's zoom and grouping parameters (its config.pbtxt ``parameters``; defaults are the shipped ones).

    A box whose longest side is at most ``roi_max_side`` is segmented zoomed, on a square window ``roi_factor``
    times that side (at least ``roi_min_side``). Zoomed boxes whose own windows are at most ``group_max_side`` and
    whose union, each widened by its margin (``group_margin_frac`` of its longest side, at least
    ``group_margin_min`` pixels), fits one such window share one encoder pass. ``group_max_side`` 0 turns
    grouping off; ``roi_max_side`` 0 turns zooming off (every box then shares the one whole-image pass).
    """

    roi_max_side: float = 400.0
    roi_factor: float = 2.5
    roi_min_side: int = 256
    group_max_side: int = 256
    group_margin_min: float = 16.0
    group_margin_frac: float = 0.5
    flip: bool = False

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, str]) -> BoxWindows:
        """From a model config's string parameters; absent or empty ones keep their defaults, except grouping:
        a box model that does not declare ``roi_group_max_side`` is taken not to group (a cost never too low)."""
        d = cls(group_max_side=0)

        def num(key: str, default: float) -> float:
            raw = parameters.get(key, "")
            return float(raw) if raw not in ("", None) else default

        return cls(
            roi_max_side=num("roi_max_side", d.roi_max_side),
            roi_factor=num("roi_factor", d.roi_factor),
            roi_min_side=int(num("roi_min_side", d.roi_min_side)),
            group_max_side=int(num("roi_group_max_side", d.group_max_side)),
            group_margin_min=num("roi_group_margin_min", d.group_margin_min),
            group_margin_frac=num("roi_group_margin_frac", d.group_margin_frac),
            flip=(parameters.get("roi_flip", "") or "false").lower() == "true",
        )


def window_side(box: np.ndarray, windows: BoxWindows) -> int:
    """The side of the square window one zoomed box gets on its own."""
    x0, y0, x1, y1 = (float(v) for v in box)
    longest = max(x1 - x0, y1 - y0)
    return math.ceil(min(MODEL_SIZE, max(windows.roi_min_side, windows.roi_factor * longest)))


def _widened(box: np.ndarray, windows: BoxWindows) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    margin = max(windows.group_margin_min, windows.group_margin_frac * max(x1 - x0, y1 - y0))
    return max(0.0, x0 - margin), max(0.0, y0 - margin), min(MODEL_SIZE, x1 + margin), min(MODEL_SIZE, y1 + margin)


def box_groups(boxes: np.ndarray, windows: BoxWindows) -> list[list[int]]:
    """Indices of the zoomed boxes of one image, one list per shared encoder pass (large boxes are not in any).

    Greedy and deterministic: boxes in (top, left) order, each joins the first group whose widened union
    still fits the group's window, else starts its own. A box alone gets exactly its own window.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if windows.roi_max_side <= 0 or len(boxes) == 0:
        return []
    sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    small = np.nonzero(sides <= windows.roi_max_side)[0]
    order = sorted(small.tolist(), key=lambda j: (float(boxes[j, 1]), float(boxes[j, 0]), j))
    groups: list[list[int]] = []
    extents: list[tuple[float, float, float, float]] = []
    limits: list[int] = []
    for j in order:
        own = window_side(boxes[j], windows)
        wide = _widened(boxes[j], windows)
        if windows.group_max_side > 0 and own <= windows.group_max_side:
            for g, (ux0, uy0, ux1, uy1) in enumerate(extents):
                side = max(limits[g], own)
                union = (min(ux0, wide[0]), min(uy0, wide[1]), max(ux1, wide[2]), max(uy1, wide[3]))
                if side <= windows.group_max_side and max(union[2] - union[0], union[3] - union[1]) <= side:
                    groups[g].append(j)
                    extents[g] = union
                    limits[g] = side
                    break
            else:
                groups.append([j])
                extents.append(wide)
                limits.append(own)
            continue
        groups.append([j])
        extents.append(wide)
        limits.append(MODEL_SIZE + 1)  # never shared
    return groups


def box_encoder_passes(boxes: np.ndarray, windows: BoxWindows) -> int:
    """LiteMedSAM encoder passes for one image's boxes: one per group of zoomed boxes (two with ``flip``), plus
    one whole-image pass when any box is too large to zoom on."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        return 0
    groups = box_groups(boxes, windows)
    zoomed = sum(len(g) for g in groups)
    return len(groups) * (2 if windows.flip else 1) + (1 if zoomed < len(boxes) else 0)


@dataclass(frozen=True)
class CostPrices:
    """Milliseconds of model time per unit of work (``gateway.cost_*_ms``) and the budget (0 = no limit)."""

    encoder_pass_ms: float
    image_pass_ms: float
    megapixel_ms: float
    max_request_cost_ms: float


@dataclass(frozen=True)
class RequestCost:
    """One request's estimated work and its price in milliseconds."""

    encoder_passes: int  # LiteMedSAM encoder passes (box prompts)
    image_passes: int  # whole-image passes of the classifier, detector, text segmenter
    prompts: int  # text and box prompts
    pixels: int  # decoded pixels (rows * columns * frames of the object)
    ms: float

    def describe(self) -> str:
        return (
            f"{self.ms:.0f} ms ({self.encoder_passes} encoder passes, {self.image_passes} image passes, "
            f"{self.prompts} prompts, {self.pixels / 1e6:.1f} megapixels)"
        )


def estimate(
    prices: CostPrices,
    *,
    pixels: int,
    image_passes: int = 0,
    prompts: int = 0,
    boxes: np.ndarray | None = None,
    windows: BoxWindows | None = None,
) -> RequestCost:
    """The cost of one request: ``image_passes`` whole-image model calls, ``prompts`` text prompts, and ``boxes``
    (model space, [N, 4]) for the box model with its ``windows`` rule."""
    box_array = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    passes = box_encoder_passes(box_array, windows or BoxWindows()) if len(box_array) else 0
    ms = passes * prices.encoder_pass_ms + image_passes * prices.image_pass_ms + pixels / 1e6 * prices.megapixel_ms
    return RequestCost(
        encoder_passes=passes,
        image_passes=image_passes,
        prompts=prompts + len(box_array),
        pixels=int(pixels),
        ms=float(ms),
    )


def check_budget(cost: RequestCost, prices: CostPrices) -> None:
    """Raise :class:`CostTooHigh` naming the cost and the limit when ``cost`` is over the budget."""
    limit = prices.max_request_cost_ms
    if limit > 0 and cost.ms > limit:
        raise CostTooHigh(
            f"request cost {cost.describe()} exceeds the limit of {limit:.0f} ms per request "
            "(gateway.max_request_cost_ms); send fewer or closer boxes, or split the request"
        )
