"""Triton Python-backend model ``segmenter_box``: LiteMedSAM box-prompt segmentation with ONNX Runtime.

Self-contained: numpy, onnxruntime, the standard library and ``medgate_model_base.py`` at the repository root
(no torch, no opencv).  The two ONNX graphs next to this file are built by ``make models``
(``python -m training.export_medsam``):

* ``encoder.onnx``: uint8 [B,1,1024,1024] -> embedding [B,256,64,64] (resize/normalise inside the graph)
* ``decoder.onnx``: embedding [1,256,64,64] + boxes [N,4] (1024 space)
  -> low_res_logits [N,1,256,256], iou_predictions [N], masks uint8 [N,1024,1024] (upsampled, > 0)

Contract (see config.pbtxt): image uint8 [B,1024,1024], boxes fp32 [B,N,4] -> masks uint8 [B,N,1024,1024],
scores fp32 [B,N].  Every request gets exactly one response; a bad request gets an error response naming
the problem (never image content) and the rest of the batch is still served.

Boxes whose longest side is at most ``roi_max_side`` (lesions, the heart, small lungs: anything a window
smaller than the image can hold) are segmented on a region of interest instead of the whole image.
LiteMedSAM sees a 1024 image at 256x256, so a 20-pixel lesion is 5 pixels to it.  For such a box a square
window ``roi_factor`` times its longest side (at least ``roi_min_side`` = 256, i.e. at least one encoder
pixel per image pixel) is cut out, area-resampled to the encoder's own 256x256 input, min-max stretched
(LiteMedSAM's own normalisation, per crop), repeated 4x4 to the graph's 1024 input (whose exact 4x4 mean
gives those 256x256 values back, unblurred), encoded, decoded with the box in window coordinates, and the
256x256 logits are bilinearly resized back into the window and thresholded at 0.  Each zoomed box costs
one encoder pass (batched, up to 4 at a time); the whole image is only encoded when one of its boxes is
too large to zoom on.  ``roi_flip`` also encodes the mirrored window and averages the logits (a second
pass per box; off by default: it added little once the window reaches the encoder unblurred).

Nearby small boxes share one window (``roi_group_max_side``, 256 by default: only boxes whose own window is
that small): boxes in (top, left) order join the first group whose union, each box widened by a margin
(``roi_group_margin_frac`` of its longest side, at least ``roi_group_margin_min`` pixels), still fits the
group's window; a group is one encoder pass and one decoder call with all its boxes, its window centred on that
union.  A box alone gets exactly the window it got before grouping.  16 lesion-sized boxes in a 200-pixel
cluster take one pass instead of 16.  ``services/gateway/cost.py`` counts passes by the same rule (the
gateway's cost estimate); the ``encoder_passes`` output says how many this request took, and a request
parameter ``roi_group`` = ``"false"`` turns grouping off for one request (for side-by-side measurement).
Margins chosen on the 23 calibration phantoms (of 200) whose lesions group (59 lesions): Dice 0.9350 one window
each, 0.9391 with these margins, 0.9366 with 32 px / 1.0x, 0.9342 with 48 px; held-out (``make eval-models``
slice of 60) lesion Dice 0.9487 before grouping, 0.9484 after (11 phantoms group; anatomy 0.9428 both).

On 38 lesions of 50 calibration phantoms (seed ``training.common.CALIB_SEED``, never the held-out set),
tight box prompts: Dice 0.79 on the whole image; 0.92 with a window upsampled to 1024 bilinearly and
mirrored (min 0.68); 0.953 (min 0.90) with the window resampled straight to 256 as above, no mirror.
Anatomy boxes (60, same phantoms): 0.924 on the whole image, 0.937 with boxes <= 400 px zoomed.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# The shared base sits at the repository root, which the stub does not put on sys.path; a __pycache__ folder
# there would be a model Triton cannot load (see medgate_model_base's docstring).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
from medgate_calibration import Calibration  # noqa: E402
from medgate_model_base import (  # noqa: E402
    CANCELLED,
    MODEL_SIZE,
    Cancelled,
    Failed,
    Outputs,
    RequestError,
    TritonModel,
    check_images,
    chunks,
    input_array,
    onnx_session,
)

EMBED_INPUT = 256  # LiteMedSAM's encoder input: the graph averages 4x4 blocks of the 1024 image
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
ENCODER_MAX_BATCH = 4


Parsed = tuple[np.ndarray, np.ndarray, bool]  # images [B,1024,1024], boxes [B,N,4], group nearby boxes


class TritonPythonModel(TritonModel[Parsed]):
    default_name = "segmenter_box"
    default_max_batch = 4

    def setup(self, args: dict[str, str]) -> None:
        threads = self.int_param("intra_op_threads", 2)
        self.max_boxes = self.int_param("max_boxes_per_image", 64)
        self.calibration = Calibration.load(self.version_dir)  # calibration.json: predicted IoU -> real IoU
        self.decoder_chunk = max(1, self.int_param("decoder_chunk", 16))
        self.roi_max_side = float(self.params.get("roi_max_side", "400") or 0)  # 0 turns zooming off
        self.roi_factor = self.float_param("roi_factor", 2.5)
        self.roi_min_side = self.int_param("roi_min_side", 256)
        self.roi_flip = (self.params.get("roi_flip", "false") or "false").lower() == "true"
        self.group_max_side = self.int_param("roi_group_max_side", 256)  # 0 turns grouping off
        self.group_margin_min = self.float_param("roi_group_margin_min", 16.0, 0.0)
        self.group_margin_frac = self.float_param("roi_group_margin_frac", 0.5, 0.0)

        _lower_cpu_priority(self.int_param("nice", 0))  # before the sessions start their threads, which inherit it
        encoder, decoder = self.require_files(
            [ENCODER_FILE, DECODER_FILE],
            "run `make models` (python -m training.export_medsam) to export LiteMedSAM first",
        )
        spin = self.bool_param("intra_op_spinning", False)
        self.encoder = onnx_session(encoder, args, threads=threads, spin=spin)
        self.decoder = onnx_session(decoder, args, threads=threads, spin=spin)
        self._check_graphs()
        pb_utils.Logger.log_info(
            f"{self.name}: LiteMedSAM loaded from {self.version_dir} with {self.encoder.get_providers()[0]}, "
            f"{threads} intra-op threads, max {self.max_boxes} boxes per image"
        )

    def _check_graphs(self) -> None:
        enc_in = {i.name: i for i in self.encoder.get_inputs()}
        dec_in = {i.name: i for i in self.decoder.get_inputs()}
        dec_out = {o.name for o in self.decoder.get_outputs()}
        problems = []
        if "image" not in enc_in or enc_in["image"].type != "tensor(uint8)":
            problems.append("encoder.onnx has no uint8 input 'image'")
        if not {"embedding", "boxes"} <= set(dec_in):
            problems.append("decoder.onnx lacks inputs 'embedding' and 'boxes'")
        if not {"masks", "iou_predictions", "low_res_logits"} <= dec_out:
            problems.append("decoder.onnx lacks outputs 'masks', 'iou_predictions' and 'low_res_logits'")
        if problems:
            raise RuntimeError(
                f"{self.name}: unexpected ONNX graphs ({'; '.join(problems)}); "
                "re-run `make models` (python -m training.export_medsam --force)"
            )
        self.embedding_name = self.encoder.get_outputs()[0].name

    def parse(self, request: pb_utils.InferenceRequest) -> Parsed:
        image = input_array(request, "image")
        boxes = input_array(request, "boxes")
        check_images(image)
        if boxes.dtype != np.float32:
            raise RequestError(f"input 'boxes' must be FP32, got {boxes.dtype}")
        if boxes.ndim != 3 or boxes.shape[2] != 4:
            raise RequestError(f"input 'boxes' must have shape [batch, N, 4], got {list(boxes.shape)}")
        if boxes.shape[0] != image.shape[0]:
            raise RequestError(f"input 'boxes' has batch {boxes.shape[0]} but 'image' has batch {image.shape[0]}")
        n = boxes.shape[1]
        if n == 0:
            raise RequestError("no boxes: 'boxes' must hold at least one box [x0, y0, x1, y1] per image")
        if n > self.max_boxes:
            raise RequestError(f"too many boxes: {n} per image, at most {self.max_boxes}")
        finite = np.isfinite(boxes).all(axis=2)
        if not finite.all():
            b, j = np.argwhere(~finite)[0]
            raise RequestError(f"boxes[{b}][{j}] has a NaN or infinite coordinate")
        x0, y0, x1, y1 = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
        outside = (x0 < 0) | (y0 < 0) | (x1 > MODEL_SIZE) | (y1 > MODEL_SIZE)
        if outside.any():
            b, j = np.argwhere(outside)[0]
            raise RequestError(
                f"boxes[{b}][{j}] = {_fmt(boxes[b, j])} is outside the {MODEL_SIZE}x{MODEL_SIZE} image "
                f"(need 0 <= x0 < x1 <= {MODEL_SIZE}, 0 <= y0 < y1 <= {MODEL_SIZE})"
            )
        degenerate = (x1 <= x0) | (y1 <= y0)
        if degenerate.any():
            b, j = np.argwhere(degenerate)[0]
            raise RequestError(
                f"boxes[{b}][{j}] = {_fmt(boxes[b, j])} has zero area or is inverted (need x0 < x1 and y0 < y1)"
            )
        return np.ascontiguousarray(image), np.ascontiguousarray(boxes), _grouping_wanted(request)

    def _decode(self, embedding, boxes, n: int):
        masks = np.empty((boxes.shape[0], MODEL_SIZE, MODEL_SIZE), np.uint8)
        scores = np.empty((boxes.shape[0],), np.float32)
        for s in range(0, boxes.shape[0], self.decoder_chunk):
            self.check(n)
            chunk = boxes[s : s + self.decoder_chunk]
            m, iou = self.decoder.run(["masks", "iou_predictions"], {"embedding": embedding, "boxes": chunk})
            masks[s : s + len(chunk)] = m
            scores[s : s + len(chunk)] = iou
        np.clip(scores, 0.0, 1.0, out=scores)
        return masks, scores

    def _groups(self, boxes, grouping: bool) -> list[list[int]]:
        """Indices into ``boxes`` (all small), one list per shared window; services/gateway/cost.py's rule."""
        if not grouping or self.group_max_side <= 0:
            return [[j] for j in range(len(boxes))]
        return _box_groups(
            boxes,
            self.roi_factor,
            self.roi_min_side,
            self.group_max_side,
            self.group_margin_min,
            self.group_margin_frac,
        )

    def _zoomed(self, image, boxes, n: int, grouping: bool = True):
        """ROI masks [M,1024,1024], predicted IoU [M] and encoder passes for small ``boxes`` [M,4] of one image of
        request ``n``.

        Each encoder pass is the unit of work: request ``n`` is checked before each one, and a pass it gives up
        part-way stops there (``run_watched``), so an abandoned 16-box call frees the model within ~50 ms.
        """
        # One view per group of boxes (a single box: its own window), plus its mirror image when roi_flip is on.
        views = []  # (box indices, mirrored, zoomed uint8 crop, zoomed boxes [k,4], window)
        for group in self._groups(boxes, grouping):
            if len(group) == 1:
                wx, wy, side = _window(boxes[group[0]], self.roi_factor, self.roi_min_side)
            else:
                wx, wy, side = _group_window(
                    boxes[group], self.roi_factor, self.roi_min_side, self.group_margin_min, self.group_margin_frac
                )
            zoomed = _encoder_view(image[wy : wy + side, wx : wx + side])
            zoomed_boxes = ((boxes[group] - [wx, wy, wx, wy]) * (MODEL_SIZE / side)).astype(np.float32)
            views.append((group, False, zoomed, zoomed_boxes, (wx, wy, side)))
            if self.roi_flip:
                mirrored = zoomed_boxes[:, [2, 1, 0, 3]] * [-1, 1, -1, 1] + [MODEL_SIZE, 0, MODEL_SIZE, 0]
                views.append(
                    (group, True, np.ascontiguousarray(zoomed[:, ::-1]), mirrored.astype(np.float32), (wx, wy, side))
                )
        logit_sums: list = [0.0 for _ in boxes]  # low-resolution logits, summed over the views
        iou_sums = np.zeros((len(boxes),), np.float32)
        placed: dict[int, tuple[int, int, int]] = {}
        for s in range(0, len(views), ENCODER_MAX_BATCH):
            part = views[s : s + ENCODER_MAX_BATCH]
            self.check(n)
            batch = np.stack([zoomed for _, _, zoomed, _, _ in part])[:, None]
            embeddings = self.run_watched(self.encoder, [self.embedding_name], {"image": batch}, [n])[0]
            for (group, mirrored, _, zoomed_boxes, window), embedding in zip(part, embeddings, strict=True):
                logits, iou = self.decoder.run(
                    ["low_res_logits", "iou_predictions"], {"embedding": embedding[None], "boxes": zoomed_boxes}
                )
                iou = iou.reshape(-1)
                for i, j in enumerate(group):
                    logit_sums[j] = logit_sums[j] + (logits[i, 0][:, ::-1] if mirrored else logits[i, 0])
                    iou_sums[j] += float(iou[i])
                    placed[j] = window
        masks = np.zeros((len(boxes), MODEL_SIZE, MODEL_SIZE), np.uint8)
        for j, (wx, wy, side) in placed.items():
            masks[j, wy : wy + side, wx : wx + side] = _resize_bilinear(logit_sums[j], side, side) > 0
        scores = np.clip(iou_sums / (2.0 if self.roi_flip else 1.0), 0.0, 1.0).astype(np.float32)
        return masks, scores, len(views)

    def _small(self, boxes):
        """Which boxes [N,4] are segmented zoomed (longest side <= roi_max_side; none when it is 0)."""
        sides = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        return (sides <= self.roi_max_side) if self.roi_max_side > 0 else np.zeros(len(boxes), bool)

    def _segment(self, image, embedding, boxes, n: int, grouping: bool = True):
        """Masks, scores and encoder passes for one image's boxes (request ``n``): large ones on the whole-image
        embedding (one pass, counted here), small ones zoomed."""
        small = self._small(boxes)
        masks = np.empty((len(boxes), MODEL_SIZE, MODEL_SIZE), np.uint8)
        scores = np.empty((len(boxes),), np.float32)
        passes = 0
        if (~small).any():
            masks[~small], scores[~small] = self._decode(embedding, boxes[~small], n)
            passes += 1
        if small.any():
            masks[small], scores[small], zoomed_passes = self._zoomed(image, boxes[small], n, grouping)
            passes += zoomed_passes
        return masks, scores, passes

    def infer(self, batch: list[Parsed]) -> list[Outputs | Failed]:
        # Encoder: the whole image, a few at a time, for every image that has a box too large to zoom on
        # (an image whose boxes are all small is only encoded per box, in _zoomed).
        embeddings: list[dict[int, np.ndarray | None]] = [{} for _ in batch]
        flat = []
        for n, (image, boxes, _) in enumerate(batch):
            for k in range(image.shape[0]):
                if self._small(boxes[k]).all():
                    embeddings[n][k] = None
                else:
                    flat.append((n, k))
        failed: dict[int, Failed] = {}
        for part in chunks(flat, ENCODER_MAX_BATCH):
            for n in {n for n, _ in part if n not in failed}:
                if self.gone(n):
                    failed[n] = CANCELLED
            part = [(n, k) for n, k in part if n not in failed]
            if not part:
                continue
            try:
                images = np.stack([batch[n][0][k] for n, k in part])[:, None]
                out = self.run_watched(self.encoder, [self.embedding_name], {"image": images}, [n for n, _ in part])[0]
            except Cancelled:
                for n, _ in part:
                    failed[n] = CANCELLED
                continue
            except Exception as exc:
                for n, _ in part:
                    failed[n] = Failed(f"image encoder failed ({type(exc).__name__})")
                continue
            for (n, k), emb in zip(part, out, strict=True):
                embeddings[n][k] = emb[None]

        answers: list[Outputs | Failed] = []
        for n, (image, boxes, grouping) in enumerate(batch):
            if n in failed:
                answers.append(failed[n])
                continue
            try:
                b, count = boxes.shape[:2]
                masks = np.empty((b, count, MODEL_SIZE, MODEL_SIZE), np.uint8)
                scores = np.empty((b, count), np.float32)
                passes = np.zeros((b, 1), np.int32)
                for k in range(b):
                    masks[k], scores[k], passes[k, 0] = self._segment(image[k], embeddings[n][k], boxes[k], n, grouping)
                answers.append(
                    [
                        pb_utils.Tensor("masks", masks),
                        pb_utils.Tensor("scores", self.calibration("iou_predictions", scores)),
                        pb_utils.Tensor("encoder_passes", passes),
                    ]
                )
            except Cancelled:
                answers.append(CANCELLED)
            except Exception as exc:
                answers.append(Failed(f"mask decoder failed ({type(exc).__name__})"))
        return answers

    def finalize(self) -> None:
        self.encoder = None
        self.decoder = None


def _window(box, factor: float, min_side: int):
    """A square window (x, y, side) around ``box``: ``factor`` times its longest side, inside the image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = int(np.ceil(min(MODEL_SIZE, max(min_side, factor * max(x1 - x0, y1 - y0)))))
    x = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, MODEL_SIZE - side))
    y = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, MODEL_SIZE - side))
    return x, y, side


def _lower_cpu_priority(nice: int) -> None:
    """Raise this process's nice level to ``nice`` (Linux: per thread, so every thread there is now; threads
    started later inherit it). Only ever lowers the priority, which needs no privilege."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) < nice:
                os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
        except OSError:
            pass


def _grouping_wanted(request) -> bool:
    """False when the request carries the parameter ``roi_group`` = "false" (one box per window, as before)."""
    read = getattr(request, "parameters", None)
    if read is None:
        return True
    try:
        value = json.loads(read() or "{}").get("roi_group", True)
    except (TypeError, ValueError, AttributeError):
        return True
    return str(value).lower() != "false"


def _window_side(box, factor: float, min_side: int) -> int:
    x0, y0, x1, y1 = (float(v) for v in box)
    return int(np.ceil(min(MODEL_SIZE, max(min_side, factor * max(x1 - x0, y1 - y0)))))


def _widened(box, margin_min: float, margin_frac: float):
    x0, y0, x1, y1 = (float(v) for v in box)
    margin = max(margin_min, margin_frac * max(x1 - x0, y1 - y0))
    return max(0.0, x0 - margin), max(0.0, y0 - margin), min(MODEL_SIZE, x1 + margin), min(MODEL_SIZE, y1 + margin)


def _box_groups(boxes, factor: float, min_side: int, max_side: int, margin_min: float, margin_frac: float):
    """Small ``boxes`` [M,4] in groups that share one window (services/gateway/cost.py's box_groups, same rule):
    in (top, left) order each box joins the first group whose widened union still fits the group's window side
    (the largest own window of its members, at most ``max_side``), else starts its own."""
    order = sorted(range(len(boxes)), key=lambda j: (float(boxes[j][1]), float(boxes[j][0]), j))
    groups: list[list[int]] = []
    extents: list[tuple[float, float, float, float]] = []
    sides: list[int] = []
    for j in order:
        own = _window_side(boxes[j], factor, min_side)
        wide = _widened(boxes[j], margin_min, margin_frac)
        if own <= max_side:
            for g, (ux0, uy0, ux1, uy1) in enumerate(extents):
                side = max(sides[g], own)
                union = (min(ux0, wide[0]), min(uy0, wide[1]), max(ux1, wide[2]), max(uy1, wide[3]))
                if side <= max_side and max(union[2] - union[0], union[3] - union[1]) <= side:
                    groups[g].append(j)
                    extents[g], sides[g] = union, side
                    break
            else:
                groups.append([j])
                extents.append(wide)
                sides.append(own)
            continue
        groups.append([j])
        extents.append(wide)
        sides.append(MODEL_SIZE + 1)  # never shared
    return groups


def _group_window(boxes, factor: float, min_side: int, margin_min: float, margin_frac: float):
    """The square window (x, y, side) a group of boxes shares: its members' largest own window, centred on the
    union of the widened boxes, inside the image."""
    side = max(_window_side(box, factor, min_side) for box in boxes)
    wide = [_widened(box, margin_min, margin_frac) for box in boxes]
    x0, y0 = min(w[0] for w in wide), min(w[1] for w in wide)
    x1, y1 = max(w[2] for w in wide), max(w[3] for w in wide)
    x = int(np.clip(round((x0 + x1) / 2 - side / 2), 0, MODEL_SIZE - side))
    y = int(np.clip(round((y0 + y1) / 2 - side / 2), 0, MODEL_SIZE - side))
    return x, y, side


def _encoder_view(crop):
    """A square crop as the encoder should see it: area-resampled to the encoder's own 256x256 input,
    min-max stretched to 0..255 (LiteMedSAM's normalisation), then repeated 4x4 to the 1024 graph input
    so that the graph's exact 4x4 mean gives back those 256x256 values unblurred."""
    a = _area_matrix(crop.shape[0], EMBED_INPUT)
    b = _area_matrix(crop.shape[1], EMBED_INPUT)
    small = a @ crop.astype(np.float32) @ b.T
    low, high = float(small.min()), float(small.max())
    small = (small - low) * (255.0 / max(high - low, 1.0))
    small = np.clip(small + 0.5, 0, 255).astype(np.uint8)
    scale = MODEL_SIZE // EMBED_INPUT
    return np.repeat(np.repeat(small, scale, axis=0), scale, axis=1)


@functools.lru_cache(maxsize=64)
def _area_matrix(n_in: int, n_out: int):
    """[n_out, n_in] weights of an area (box-filter) resampling along one axis, as OpenCV's INTER_AREA."""
    ratio = n_in / n_out
    start = np.arange(n_out, dtype=np.float64)[:, None] * ratio
    pixel = np.arange(n_in, dtype=np.float64)[None, :]
    overlap = np.minimum(start + ratio, pixel + 1) - np.maximum(start, pixel)
    weights = np.clip(overlap, 0.0, None) / ratio
    weights /= weights.sum(axis=1, keepdims=True)
    return weights.astype(np.float32)


def _axis(n_in: int, n_out: int):
    """Source indices and weights for linear resampling along one axis (pixel centres, as OpenCV)."""
    src = np.clip((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, n_in - 1)
    return lower, upper, (src - lower).astype(np.float32)


def _resize_bilinear(a, out_h: int, out_w: int):
    """Bilinear resize of a 2-D array to float32 [out_h, out_w] (no OpenCV in this model's environment)."""
    a = np.asarray(a, dtype=np.float32)
    y0, y1, wy = _axis(a.shape[0], out_h)
    x0, x1, wx = _axis(a.shape[1], out_w)
    rows = a[y0] * (1.0 - wy)[:, None] + a[y1] * wy[:, None]
    return rows[:, x0] * (1.0 - wx) + rows[:, x1] * wx


def _fmt(box) -> str:
    return "[" + ", ".join(f"{float(v):.1f}" for v in box) + "]"
