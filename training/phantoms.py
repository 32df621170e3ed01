"""Procedural chest-radiograph phantoms (PA view) with exact anatomy and lesion masks.

Pure NumPy + OpenCV. Each call to :func:`generate` draws a new random radiograph of random size
(600..2500 pixels a side, aspect 0.7..1.4), stored as 12-bit or 16-bit unsigned pixels in the
MONOCHROME2 sense (dense = bright): black direct-exposure background, a soft-tissue body with
shoulders and neck, dark lungs with vascular texture, a bright heart, mediastinum and spine,
ribs and clavicles, an occasional burned-in lead marker, quantum and electronic noise, and
0..3 lesions (small nodules through masses, varied contrast and shape) inside the lungs.

Side convention (the radiological one): the image is a PA radiograph seen as if facing the
patient, so the patient's LEFT is on the IMAGE RIGHT. ``left_lung`` is the patient's left lung
(image right, the side of the cardiac apex); ``right_lung`` is the patient's right lung (image
left, the side of the higher hemidiaphragm). The heart sits slightly toward image right.

Masks: ``left_lung``, ``right_lung`` and ``heart`` are disjoint (lung fields exclude the cardiac
silhouette, as in JSRT/SCR annotations). Each lesion lies inside one lung and is a subset of that
lung's mask. ``lesion_boxes`` are (x0, y0, x1, y1) in original pixels with exclusive ends
(x1 = max_x + 1).

:func:`model_space` renders a phantom to 8 bits with an automatic window and letterboxes it to
the 1024x1024 model square exactly as the serving gateway does (``services.imaging.preprocess``).

The phantoms are for proving the pipeline, not for anything clinical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cv2
import numpy as np

from services.imaging.preprocess import Letterbox, window_to_uint8

MIN_SIDE = 600
MAX_SIDE = 2500
# Lesion diameters, expressed in pixels of the 1024 model square (so they scale with the image):
# about 4 mm nodules through 6 cm masses on a 35 cm field of view.
LESION_DIAMETER_MODEL = (12.0, 180.0)
# Lesion kinds: "standard" (the above, the reference models' training distribution) and "faint": low-contrast
# nodules of a middling size, which the reference detector mostly misses (the weak kind that review and
# retraining target, tests/test_retrain_loop.py). FAINT_CONTRAST scales the standard contrast draw.
LESION_KINDS = ("standard", "faint")
FAINT_DIAMETER_MODEL = (28.0, 70.0)
FAINT_CONTRAST = (0.05, 0.10)
_SUBPIXEL_SHIFT = 4
_SUBPIXEL = float(1 << _SUBPIXEL_SHIFT)


@dataclass
class Phantom:
    image: np.ndarray  # (H, W) uint16
    left_lung: np.ndarray  # (H, W) bool, patient's left = image right
    right_lung: np.ndarray  # (H, W) bool, patient's right = image left
    heart: np.ndarray  # (H, W) bool
    lesions: list[np.ndarray] = field(default_factory=list)  # each (H, W) bool
    lesion_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.float64))
    label: str = "normal"  # "normal" or "lesion"
    bits_stored: int = 16

    @property
    def lesion(self) -> np.ndarray:
        """Union of the lesion masks."""
        out = np.zeros(self.image.shape, dtype=bool)
        for mask in self.lesions:
            out |= mask
        return out


# ----------------------------------------------------------------------------------------------
# geometry helpers


def _chaikin(points: np.ndarray, iterations: int = 2, closed: bool = True) -> np.ndarray:
    for _ in range(iterations):
        nxt = np.roll(points, -1, axis=0) if closed else points[1:]
        cur = points if closed else points[:-1]
        q = 0.75 * cur + 0.25 * nxt
        r = 0.25 * cur + 0.75 * nxt
        points = np.stack([q, r], axis=1).reshape(-1, 2)
    return points


def _fill(shape: tuple[int, int], polygons: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """Rasterise polygons (given in original pixel coordinates) onto a grid ``scale`` times as large."""
    out = np.zeros(shape, dtype=np.uint8)
    pts = [np.round(p * scale * _SUBPIXEL).astype(np.int32).reshape(-1, 1, 2) for p in polygons]
    cv2.fillPoly(out, pts, 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)
    return out


def _ellipse_polygon(cx: float, cy: float, ax: float, ay: float, angle_deg: float, n: int = 96) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = ax * np.cos(t), ay * np.sin(t)
    a = math.radians(angle_deg)
    return np.stack([cx + x * math.cos(a) - y * math.sin(a), cy + x * math.sin(a) + y * math.cos(a)], axis=1)


def _rotate(points: np.ndarray, cx: float, cy: float, angle_rad: float) -> np.ndarray:
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    d = points - (cx, cy)
    return np.stack([cx + d[:, 0] * c - d[:, 1] * s, cy + d[:, 0] * s + d[:, 1] * c], axis=1)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise with about ``cells`` features across the shorter side."""
    h, w = shape
    gh = max(2, round(cells * h / min(h, w)))
    gw = max(2, round(cells * w / min(h, w)))
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur; large sigmas run on a downsampled copy (same result to the eye, far cheaper)."""
    if sigma <= 4.0:
        return cv2.GaussianBlur(img, (0, 0), sigma)
    f = sigma / 2.0
    h, w = img.shape
    small = cv2.resize(img, (max(1, round(w / f)), max(1, round(h / f))), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), 2.0)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 2:
        return mask.astype(bool)
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == best


# ----------------------------------------------------------------------------------------------
# anatomy


def _lung_polygon(
    rng: np.random.Generator,
    side: int,
    cx: float,
    y_apex: float,
    half_width: float,
    height: float,
    med_top: float,
    med_bottom: float,
) -> np.ndarray:
    """Closed lung outline. ``side`` = -1 for image left (patient's right), +1 for image right."""
    j = lambda s: rng.uniform(-s, s)  # noqa: E731
    apex_x = half_width * rng.uniform(0.32, 0.45)
    base_y = y_apex + height
    cp_x = half_width * rng.uniform(0.9, 0.99)  # costophrenic angle
    dome = height * rng.uniform(0.08, 0.16)
    pts: list[tuple[float, float]] = []
    # lateral border: apex -> costophrenic angle
    bulge = rng.uniform(1.6, 2.6)
    for t in np.linspace(0.0, 1.0, 14):
        x = apex_x + (cp_x - apex_x) * (1 - (1 - t) ** bulge) + j(0.01 * half_width) * (0 < t < 1)
        y = y_apex + t * height * rng.uniform(0.995, 1.0)
        pts.append((x, y))
    # diaphragm dome: costophrenic angle -> cardiophrenic angle (medial)
    peak = rng.uniform(0.45, 0.7)
    for s in np.linspace(0.0, 1.0, 10)[1:]:
        x = cp_x + (med_bottom - cp_x) * s
        lift = (
            math.sin(math.pi * min(1.0, s / (2 * peak))) if s < peak else 1.0 - 0.35 * (s - peak) / (1 - peak)
        )
        pts.append((x, base_y - dome * lift + j(0.004 * height)))
    # medial border: base -> apex (mediastinum); aortic knob on the patient's left
    for t in np.linspace(1.0, 0.0, 10)[1:-1]:
        x = med_top + (med_bottom - med_top) * t
        if side > 0 and 0.15 < t < 0.35:
            x += half_width * 0.06 * math.sin(math.pi * (t - 0.15) / 0.2)
        pts.append((x + j(0.008 * half_width), y_apex + t * (height - dome * 0.65)))
    pts.append((apex_x * 0.75, y_apex + 0.03 * height))
    arr = np.array(pts, dtype=np.float64)
    arr = _chaikin(arr, 3)
    arr[:, 0] = cx + side * arr[:, 0]
    return arr


def _lesion_polygon(rng: np.random.Generator, cx: float, cy: float, radius: float) -> np.ndarray:
    n = 64
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    elong = rng.uniform(0.7, 1.0)
    r = np.ones(n)
    for k in range(2, 6):
        r += rng.uniform(0, 0.12 / (k - 1)) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    ang = rng.uniform(0, np.pi)
    x = radius * r * np.cos(t)
    y = radius * r * elong * np.sin(t)
    c, s = math.cos(ang), math.sin(ang)
    return np.stack([cx + x * c - y * s, cy + x * s + y * c], axis=1)


def _random_size(rng: np.random.Generator, height: int | None, width: int | None) -> tuple[int, int]:
    aspect = rng.uniform(0.7, 1.4)  # width / height
    if height is None and width is None:
        height = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
    if height is None:
        assert width is not None
        height = int(np.clip(round(width / aspect), MIN_SIDE, MAX_SIDE))
    if width is None:
        width = int(np.clip(round(height * aspect), MIN_SIDE, MAX_SIDE))
    return int(height), int(width)


def generate(
    rng: np.random.Generator,
    *,
    height: int | None = None,
    width: int | None = None,
    lesion_probability: float = 0.5,
    lesion_kind: str = "standard",
) -> Phantom:
    """One random PA chest-radiograph phantom (see the module docstring for conventions).

    ``lesion_kind``: ``standard`` or ``faint`` (see :data:`LESION_KINDS`); the standard kind draws exactly
    the random numbers it always did, so the cached training sets stay valid.
    """
    if lesion_kind not in LESION_KINDS:
        raise ValueError(f"lesion_kind must be one of {LESION_KINDS}, not {lesion_kind!r}")
    faint = lesion_kind == "faint"
    H, W = _random_size(rng, height, width)
    model_scale = 1024.0 / max(H, W)  # original pixels -> model pixels
    # Smooth densities are rendered on a work grid no larger than the model square, then resized.
    ws = min(1.0, 1024.0 / max(H, W))
    wh, ww = max(1, round(H * ws)), max(1, round(W * ws))

    # ---- body frame (original pixels)
    tw = rng.uniform(0.62, 0.86) * min(W, 1.1 * H)  # thorax width
    lh = tw * rng.uniform(0.72, 0.95)  # lung height (apex to costophrenic angle)
    y_apex = rng.uniform(0.06, 0.2) * H
    if y_apex + lh > 0.93 * H:
        shrink = (0.93 * H - y_apex) / lh
        tw, lh = tw * shrink, lh * shrink
    hw = tw / 2
    cx = W / 2 + rng.uniform(-0.05, 0.05) * W
    tilt = math.radians(rng.uniform(-4, 4))
    rot_cy = y_apex + lh / 2

    def rot(p: np.ndarray) -> np.ndarray:
        return _rotate(p, cx, rot_cy, tilt)

    med_top = tw * rng.uniform(0.06, 0.09)
    med_bottom = tw * rng.uniform(0.05, 0.1)
    right_h = lh * rng.uniform(0.9, 0.97)  # patient's right hemidiaphragm is higher
    right_poly = rot(
        _lung_polygon(
            rng,
            -1,
            cx,
            y_apex + rng.uniform(-0.02, 0.02) * lh,
            hw * rng.uniform(0.97, 1.03),
            right_h,
            med_top,
            med_bottom * rng.uniform(1.0, 1.4),
        )
    )
    left_poly = rot(
        _lung_polygon(
            rng,
            +1,
            cx,
            y_apex + rng.uniform(-0.02, 0.02) * lh,
            hw * rng.uniform(0.95, 1.0),
            lh,
            med_top * rng.uniform(0.9, 1.1),
            med_bottom,
        )
    )

    # heart: an ellipse left of the midline (image right), low in the thorax, tilted toward its apex
    h_ax = tw * rng.uniform(0.2, 0.27)
    h_ay = h_ax * rng.uniform(0.62, 0.82)
    h_cx = cx + tw * rng.uniform(0.04, 0.1)
    h_angle = rng.uniform(10, 28)
    a = math.radians(h_angle)
    h_ext_y = math.hypot(h_ax * math.sin(a), h_ay * math.cos(a))  # lowest point below the centre
    h_cy = y_apex + lh * rng.uniform(0.86, 0.97) - h_ext_y
    heart_poly = rot(_ellipse_polygon(h_cx, h_cy, h_ax, h_ay, h_angle))

    heart = _fill((H, W), [heart_poly]).astype(bool)
    right_lung = _largest_component(_fill((H, W), [right_poly]).astype(bool) & ~heart)
    left_lung = _largest_component(_fill((H, W), [left_poly]).astype(bool) & ~heart)

    # ---- densities on the work grid (1.0 ~ full soft-tissue thickness)
    yy, xx = np.mgrid[0:wh, 0:ww].astype(np.float32)
    xo, yo = xx / ws, yy / ws  # original coordinates of work pixels
    bw = hw * rng.uniform(1.15, 1.35)  # body half-width
    body_top = y_apex - lh * rng.uniform(0.02, 0.12)
    body_poly = rot(
        np.array(
            [
                [cx - bw, H * 1.5],
                [cx - bw * rng.uniform(0.97, 1.05), body_top + 0.25 * lh],
                [cx - bw * 0.92, body_top + 0.06 * lh],
                [cx - bw * 0.7, body_top],
                [cx - tw * 0.14, body_top - 0.03 * lh],
                [cx - tw * 0.12, -10],
                [cx + tw * 0.12, -10],
                [cx + tw * 0.14, body_top - 0.03 * lh],
                [cx + bw * 0.7, body_top],
                [cx + bw * 0.92, body_top + 0.06 * lh],
                [cx + bw * rng.uniform(0.97, 1.05), body_top + 0.25 * lh],
                [cx + bw, H * 1.5],
            ]
        )
    )
    body_poly = _chaikin(body_poly, 3)
    body_w = _fill((wh, ww), [body_poly], ws).astype(np.float32)
    body_w = cv2.GaussianBlur(body_w, (0, 0), max(0.8, 0.004 * tw * ws))
    dx = np.clip((xo - cx) / bw, -1, 1)
    thickness = np.sqrt(1 - dx * dx) * 0.6 + 0.4
    dens = body_w * thickness * rng.uniform(0.85, 1.1)
    dens *= 1 + 0.04 * _smooth_noise(rng, (wh, ww), 5)

    # lungs: air lowers density, most in the middle of each lung; vascular texture from the hila
    lungs_w = _fill((wh, ww), [right_poly, left_poly], ws).astype(np.float32)
    heart_w = _fill((wh, ww), [heart_poly], ws).astype(np.float32)
    lungs_w *= 1 - heart_w
    edge_sigma = max(0.5, 0.0015 * tw * ws)
    lungs_s = cv2.GaussianBlur(lungs_w, (0, 0), edge_sigma)
    depth = _blur(lungs_w, 0.05 * tw * ws)
    air = rng.uniform(0.45, 0.68)
    lung_drop = air * (0.55 * lungs_s + 0.45 * depth * lungs_s)
    hilum_dist = (
        np.minimum(
            np.hypot(xo - (cx - 0.15 * tw), yo - (y_apex + 0.45 * lh)),
            np.hypot(xo - (cx + 0.15 * tw), yo - (y_apex + 0.42 * lh)),
        )
        / tw
    )
    vessels = np.exp(-hilum_dist * rng.uniform(3.0, 5.0)) * rng.uniform(0.1, 0.22)
    texture = _smooth_noise(rng, (wh, ww), int(rng.integers(12, 24))) * rng.uniform(0.015, 0.035)
    texture += _smooth_noise(rng, (wh, ww), int(rng.integers(40, 70))) * rng.uniform(0.008, 0.02)
    dens = dens - lung_drop + (vessels + texture) * lungs_s

    # heart, mediastinum, spine
    heart_s = cv2.GaussianBlur(heart_w, (0, 0), edge_sigma)
    dens += heart_s * rng.uniform(0.08, 0.2)
    med_poly = rot(
        _chaikin(
            np.array(
                [
                    [cx - med_top * 1.1, body_top],
                    [cx + med_top * 1.1, body_top],
                    [cx + med_bottom * 1.2, h_cy],
                    [cx - med_bottom * 1.2, h_cy],
                ]
            ),
            2,
        )
    )
    med_w = _blur(_fill((wh, ww), [med_poly], ws).astype(np.float32), 3 * edge_sigma)
    dens += med_w * (1 - lungs_s) * rng.uniform(0.1, 0.25)
    spine_half = tw * rng.uniform(0.035, 0.05)
    spine_dx = np.abs((xo - cx) * math.cos(tilt) + (yo - rot_cy) * math.sin(tilt))
    spine = np.clip(1 - (spine_dx / spine_half) ** 4, 0, 1)
    vert_period = lh * rng.uniform(0.075, 0.09)
    spine *= 0.75 + 0.25 * (np.cos(2 * np.pi * (yo - y_apex) / vert_period) > -0.7)
    dens += spine * body_w * rng.uniform(0.08, 0.2) * (1 - 0.6 * heart_s)

    # ribs (posterior arcs) and clavicles
    bone = np.zeros((wh, ww), dtype=np.float32)
    n_ribs = int(rng.integers(9, 12))
    spacing = lh * rng.uniform(0.082, 0.098)
    rib_thick = max(1, round(lh * rng.uniform(0.022, 0.032) * ws))
    first = y_apex + lh * rng.uniform(-0.02, 0.04)
    for side in (-1, 1):
        for i in range(n_ribs):
            y0 = first + i * spacing * (1 + 0.02 * i)
            s = np.linspace(0.0, 1.0, 24)
            x = cx + side * (spine_half + s * (hw * rng.uniform(1.0, 1.1) - spine_half))
            y = (
                y0
                - lh * 0.045 * np.sin(np.pi * s * 0.8)
                + lh * 0.16 * s**2.2
                + rng.uniform(-0.005, 0.005) * lh
            )
            pts = rot(np.stack([x, y], 1))
            cv2.polylines(
                bone,
                [np.round(pts * ws * _SUBPIXEL).astype(np.int32).reshape(-1, 1, 2)],
                False,
                rng.uniform(0.7, 1.0),
                rib_thick,
                cv2.LINE_AA,
                _SUBPIXEL_SHIFT,
            )
        s = np.linspace(0.0, 1.0, 16)
        x = cx + side * (tw * 0.05 + s * hw * rng.uniform(0.85, 1.0))
        y = (
            y_apex
            + lh * rng.uniform(0.0, 0.06)
            - s * lh * rng.uniform(0.03, 0.09)
            + lh * 0.03 * np.sin(np.pi * s)
        )
        pts = rot(np.stack([x, y], 1))
        cv2.polylines(
            bone,
            [np.round(pts * ws * _SUBPIXEL).astype(np.int32).reshape(-1, 1, 2)],
            False,
            1.0,
            max(1, round(rib_thick * 1.3)),
            cv2.LINE_AA,
            _SUBPIXEL_SHIFT,
        )
    bone = cv2.GaussianBlur(bone, (0, 0), max(0.6, rib_thick * 0.25))
    dens += bone * body_w * rng.uniform(0.08, 0.2)

    # ---- lesions: inside one lung each, disjoint, full-resolution masks (work in a local crop)
    lesions: list[np.ndarray] = []
    boxes: list[list[float]] = []
    label = "normal"
    if rng.random() < lesion_probability:
        label = "lesion"
        n_les = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        occupied = np.zeros((H, W), dtype=bool)
        lung_choice = [right_lung, left_lung]
        lung_points = []
        step = max(1, min(H, W) // 200)
        for lung in lung_choice:
            ys, xs = np.nonzero(lung[::step, ::step])
            lung_points.append((ys * step, xs * step))
        lesion_w = np.zeros((wh, ww), dtype=np.float32)
        attempts = 0
        while len(lesions) < n_les and attempts < 60:
            attempts += 1
            which = int(rng.integers(0, 2))
            lung = lung_choice[which]
            ys, xs = lung_points[which]
            if len(ys) == 0:
                continue
            k = int(rng.integers(0, len(ys)))
            py, px = float(ys[k]) + rng.uniform(0, step), float(xs[k]) + rng.uniform(0, step)
            sizes = FAINT_DIAMETER_MODEL if faint else LESION_DIAMETER_MODEL
            diameter = math.exp(rng.uniform(*np.log(sizes))) / model_scale
            poly = _lesion_polygon(rng, px, py, diameter / 2)
            gap = max(1, round(3 / model_scale))  # keep lesions >= ~3 model pixels apart
            x0, y0 = np.floor(poly.min(0)).astype(int) - 2 - gap
            x1, y1 = np.ceil(poly.max(0)).astype(int) + 3 + gap
            x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
            if x1 <= x0 or y1 <= y0:
                continue
            crop = _fill((y1 - y0, x1 - x0), [poly - (x0, y0)]).astype(bool)
            area = int(crop.sum())
            if area == 0:
                continue
            inside = crop & lung[y0:y1, x0:x1]
            # mostly inside the lung (pleural-based masses are cut by the lung border), apart from others
            if inside.sum() < 0.85 * area or (inside & occupied[y0:y1, x0:x1]).any():
                continue
            mask = np.zeros((H, W), dtype=bool)
            mask[y0:y1, x0:x1] = inside
            lesions.append(mask)
            occupied[y0:y1, x0:x1] |= cv2.dilate(
                inside.astype(np.uint8), np.ones((3, 3), np.uint8), iterations=gap
            ).astype(bool)
            ys_m, xs_m = np.nonzero(inside)
            boxes.append(
                [
                    float(xs_m.min() + x0),
                    float(ys_m.min() + y0),
                    float(xs_m.max() + 1 + x0),
                    float(ys_m.max() + 1 + y0),
                ]
            )
            contrast = rng.uniform(*(FAINT_CONTRAST if faint else (0.14, 0.5))) * air / 0.55
            if diameter * model_scale < 30 and not faint:  # small nodules are usually solid or calcified
                contrast *= rng.uniform(1.1, 1.5)
            # density on the work grid, in a padded crop
            r_w = diameter / 2 * ws
            pad = math.ceil(3 * max(0.5, 0.4 * r_w)) + 2
            wx0, wy0 = max(0, int(x0 * ws) - pad), max(0, int(y0 * ws) - pad)
            wx1, wy1 = min(ww, math.ceil(x1 * ws) + pad), min(wh, math.ceil(y1 * ws) + pad)
            lw = _fill((wy1 - wy0, wx1 - wx0), [poly * ws - (wx0, wy0)], 1.0).astype(np.float32)
            lw *= cv2.GaussianBlur(lungs_w[wy0:wy1, wx0:wx1], (0, 0), 0.5)
            lw_s = cv2.GaussianBlur(lw, (0, 0), max(0.5, min(0.12 * r_w, 3.0)))
            dome_w = cv2.GaussianBlur(lw, (0, 0), max(0.5, 0.4 * r_w))
            lesion_w[wy0:wy1, wx0:wx1] += (
                contrast * lw_s * (0.65 + 0.35 * dome_w / max(float(dome_w.max()), 1e-6))
            )
        if not lesions:
            label = "normal"
        dens += lesion_w

    # ---- detector response, marker, noise, quantisation
    gamma = rng.uniform(0.85, 1.2)
    dens = np.clip(dens, 0, None) ** gamma
    full = cv2.resize(dens, (W, H), interpolation=cv2.INTER_LINEAR) if (wh, ww) != (H, W) else dens
    full = np.ascontiguousarray(full, dtype=np.float32)
    sigma_q = rng.uniform(0.01, 0.04)
    noise = rng.standard_normal((H, W), dtype=np.float32)
    full += noise * sigma_q * np.sqrt(np.clip(full, 0.05, None))
    full += _smooth_noise(rng, (H, W), int(rng.integers(60, 120))) * rng.uniform(0.002, 0.01)
    bits = 12 if rng.random() < 0.5 else 16
    vmax = float((1 << bits) - 1)
    lo = rng.uniform(0.0, 0.15) * vmax
    hi = rng.uniform(0.55, 0.95) * vmax
    img = lo + (hi - lo) * (full / 1.6)
    if rng.random() < 0.5:  # lead marker ("L"/"R") in an upper corner, near saturation
        mh, mw = max(8, round(0.04 * H)), max(6, round(0.03 * W))
        my = round(rng.uniform(0.02, 0.08) * H)
        mx = (
            round(rng.uniform(0.03, 0.1) * W)
            if rng.random() < 0.5
            else W - mw - round(rng.uniform(0.03, 0.1) * W)
        )
        val = rng.uniform(0.92, 1.0) * vmax
        img[my : my + mh, mx : mx + max(2, mw // 3)] = val
        img[my + mh - max(2, mh // 4) : my + mh, mx : mx + mw] = val
    image = np.clip(np.rint(img), 0, vmax).astype(np.uint16)

    box_arr = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    return Phantom(
        image=image,
        left_lung=left_lung,
        right_lung=right_lung,
        heart=heart,
        lesions=lesions,
        lesion_boxes=box_arr,
        label=label,
        bits_stored=bits,
    )


# ----------------------------------------------------------------------------------------------
# rendering into the model square (what the gateway does)


def auto_window(pixels: np.ndarray, mode: str = "minmax") -> tuple[float, float]:
    """A DICOM viewer's automatic window when the file has none: ``minmax`` or ``percentile`` (0.5/99.5)."""
    if mode == "minmax":
        return float(pixels.min()), float(pixels.max())
    if mode.startswith("percentile"):
        lo_q, hi_q = (0.5, 99.5) if mode == "percentile" else (1.0, 99.0)
        if pixels.dtype == np.uint16:
            hist = np.bincount(pixels.ravel(), minlength=65536)
            cdf = np.cumsum(hist) / pixels.size
            return float(np.searchsorted(cdf, lo_q / 100)), float(np.searchsorted(cdf, hi_q / 100))
        lo, hi = np.percentile(pixels, [lo_q, hi_q])
        return float(lo), float(hi)
    raise ValueError(f"unknown window mode {mode!r}")


def model_space(phantom: Phantom, window: str | tuple[float, float] = "minmax") -> dict:
    """Render to uint8 with an auto window, letterbox image, masks and boxes to 1024x1024.

    Returns ``image`` (1024, 1024) uint8, ``left_lung``/``right_lung``/``heart``/``lesion`` bool
    masks, ``lesions`` (list of bool masks), ``boxes`` [N, 4] float64 in model pixels, ``label``,
    ``letterbox`` (the transform) and ``window`` (low, high).
    """
    low, high = window if isinstance(window, tuple) else auto_window(phantom.image, window)
    rendered = window_to_uint8(phantom.image, low, high)
    h, w = phantom.image.shape
    box = Letterbox.for_shape(h, w)

    def m(mask: np.ndarray) -> np.ndarray:
        return box.mask_to_model(mask.astype(np.uint8)).astype(bool)

    lesions = [m(x) for x in phantom.lesions]
    lesion = np.zeros((box.size, box.size), dtype=bool)
    for x in lesions:
        lesion |= x
    return {
        "image": box.apply(rendered),
        "left_lung": m(phantom.left_lung),
        "right_lung": m(phantom.right_lung),
        "heart": m(phantom.heart),
        "lesion": lesion,
        "lesions": lesions,
        "boxes": box.boxes_to_model(phantom.lesion_boxes),
        "label": phantom.label,
        "letterbox": box,
        "window": (low, high),
    }
