"""Box geometry shared by the gateway, the CLI and the training code: numpy only, no gRPC, no torch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

# The union's floor: two zero-area boxes overlap 0, not NaN.
_MIN_UNION = 1e-9


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Intersection over union of every box in ``a`` [N, 4] with every box in ``b`` [M, 4]: an [N, M] float64 matrix.

    Boxes are (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0, in any numeric dtype (computed in float64); an empty side
    gives an empty matrix.

    >>> box_iou([[0, 0, 2, 2]], [[1, 0, 3, 2], [4, 4, 5, 5]]).round(3).tolist()
    [[0.333, 0.0]]
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    x0 = np.maximum(a[:, None, 0], b[None, :, 0])
    y0 = np.maximum(a[:, None, 1], b[None, :, 1])
    x1 = np.minimum(a[:, None, 2], b[None, :, 2])
    y1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, _MIN_UNION), dtype=np.float64)
