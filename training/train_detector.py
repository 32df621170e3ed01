"""Train the reference lesion detector (CenterNet-style) on phantoms; export triton_models/detector/1/model.onnx.

    python -m training.train_detector [--steps N] [--batch B]

Graph: image uint8 [B,1,1024,1024] -> /255, 2x2 mean -> space-to-depth -> small encoder/decoder ->
128x128 centre heatmap (one cell = 8 model pixels), sub-cell offset and log size -> 3x3 peak
extraction and top-32 inside the graph -> ``boxes`` [B,32,4] (x0,y0,x1,y1, 1024 model space) and
``scores`` [B,32] sorted by score. Non-maximum suppression (IoU 0.5) and the minimum score (0.05)
are applied by the Triton model.py, as the held-out evaluation here does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import common

ONNX_PATH = common.MODELS_DIR / "detector" / "1" / "model.onnx"
LABELS = ("lesion",)
SEED = 23
CHANNELS = (16, 24, 32, 48, 64)
STRIDE = 8  # model pixels per heatmap cell
GRID = 1024 // STRIDE
TOP_K = 32
NMS_IOU = 0.5
MIN_SCORE = 0.05


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = common.Encoder(CHANNELS, stem_stride=2)  # levels at 128, 64, 32, 16, 8
        self.decoder = common.Decoder(CHANNELS, stop=0)  # 128x128
        self.neck = common.cbr(CHANNELS[0], 32)
        self.heat = nn.Conv2d(32, 1, 1)
        self.reg = nn.Conv2d(32, 4, 1)  # offset x, offset y, log(w / STRIDE), log(h / STRIDE)
        nn.init.constant_(self.heat.bias, -4.0)
        nn.init.zeros_(self.reg.weight)
        nn.init.constant_(self.reg.bias, 0.0)

    def forward(self, x512: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.neck(self.decoder(self.encoder(x512)))
        return self.heat(y), self.reg(y)


class Serving(nn.Module):
    def __init__(self, core: Detector) -> None:
        super().__init__()
        self.pre = common.Preprocess()
        self.core = core

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heat_logits, reg = self.core(self.pre(image))
        heat = torch.sigmoid(heat_logits)
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat).to(heat.dtype)
        b = heat.shape[0]
        scores, index = torch.topk(peaks.reshape(b, GRID * GRID), TOP_K, dim=1)
        reg_flat = reg.reshape(b, 4, GRID * GRID)
        picked = torch.gather(reg_flat, 2, index[:, None, :].expand(b, 4, TOP_K))  # [B,4,K]
        iy = torch.div(index, GRID, rounding_mode="floor").to(torch.float32)
        ix = (index - torch.div(index, GRID, rounding_mode="floor") * GRID).to(torch.float32)
        cx = (ix + 0.5 + picked[:, 0]) * STRIDE
        cy = (iy + 0.5 + picked[:, 1]) * STRIDE
        w = torch.exp(picked[:, 2].clamp(-3.0, 5.0)) * STRIDE
        h = torch.exp(picked[:, 3].clamp(-3.0, 5.0)) * STRIDE
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=2).clamp(0.0, 1024.0)
        return boxes, scores


def targets(boxes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heatmaps [B,1,G,G], regression targets [B,4,G,G] and their mask [B,1,G,G]."""
    b = len(counts)
    heat = np.zeros((b, 1, GRID, GRID), dtype=np.float32)
    reg = np.zeros((b, 4, GRID, GRID), dtype=np.float32)
    mask = np.zeros((b, 1, GRID, GRID), dtype=np.float32)
    ys, xs = np.mgrid[0:GRID, 0:GRID].astype(np.float32)
    for i in range(b):
        for x0, y0, x1, y1 in boxes[i, : counts[i]]:
            cx, cy = (x0 + x1) / 2 / STRIDE, (y0 + y1) / 2 / STRIDE
            w, h = (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
            gx, gy = min(GRID - 1, int(cx)), min(GRID - 1, int(cy))
            sigma = max(0.6, 0.12 * float(np.sqrt(w * h)))
            g = np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * sigma * sigma))
            heat[i, 0] = np.maximum(heat[i, 0], g)
            heat[i, 0, gy, gx] = 1.0
            reg[i, :, gy, gx] = (cx - gx - 0.5, cy - gy - 0.5, np.log(w), np.log(h))
            mask[i, 0, gy, gx] = 1.0
    return heat, reg, mask


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = target.eq(1.0).float()
    neg = 1.0 - pos
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p**2 * (1 - target) ** 4 * neg
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp_min(1.0)


def postprocess(boxes: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What model.py does: minimum score, then NMS at IoU 0.5."""
    keep = scores >= MIN_SCORE
    boxes, scores = boxes[keep], scores[keep]
    kept = common.nms(boxes, scores, NMS_IOU)
    return boxes[kept], scores[kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--heldout", type=int, default=400)
    args = parser.parse_args()
    common.setup(SEED)

    data = common.load_split("train", args.train)
    img, boxes, counts = data["img512"], data["boxes"], data["count"]
    print(f"train: {len(img)} phantoms, {int(counts.sum())} lesions", flush=True)
    gen = torch.Generator().manual_seed(SEED)
    order_rng = np.random.default_rng(SEED)
    perm: list[int] = []

    def batch_fn(step: int) -> tuple:
        nonlocal perm
        if len(perm) < args.batch:
            perm = list(order_rng.permutation(len(img))) + perm
        idx = np.array([perm.pop() for _ in range(args.batch)])
        x = torch.from_numpy(img[idx]).float().div_(255.0)[:, None]
        bx = boxes[idx].copy()
        flip = order_rng.random(len(idx)) < 0.5
        x[torch.from_numpy(flip)] = x[torch.from_numpy(flip)].flip(-1)
        bx[flip, :, 0], bx[flip, :, 2] = 1024.0 - boxes[idx][flip, :, 2], 1024.0 - boxes[idx][flip, :, 0]
        heat, reg, mask = targets(bx, counts[idx])
        return common.augment_intensity(x, gen), torch.from_numpy(heat), torch.from_numpy(reg), torch.from_numpy(mask)

    def loss_fn(model: Detector, x, heat, reg, mask) -> tuple:
        heat_logits, reg_pred = model(x)
        hl = focal_loss(heat_logits, heat)
        n = mask.sum().clamp_min(1.0)
        off = (F.l1_loss(reg_pred[:, :2], reg[:, :2], reduction="none") * mask).sum() / n
        size = (F.l1_loss(reg_pred[:, 2:], reg[:, 2:], reduction="none") * mask).sum() / n
        return hl + off + size, {"heat": hl.item(), "offset": off.item(), "size": size.item()}

    model = Detector()
    print(f"detector: {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train_s = common.train_loop(model, args.steps, batch_fn, loss_fn, lr=args.lr)
    print(f"training took {train_s:.0f}s", flush=True)

    common.export_onnx(Serving(model), ONNX_PATH, ["boxes", "scores"])
    (ONNX_PATH.parent.parent / "labels.txt").write_text("\n".join(LABELS) + "\n")

    held = common.load_split("heldout", args.heldout)
    t0 = time.time()
    out_boxes, out_scores = common.ort_run(common.ort_session(ONNX_PATH), held["img1024"])
    infer_s = time.time() - t0
    dets = [postprocess(b, s) for b, s in zip(out_boxes, out_scores, strict=True)]
    truths = [held["boxes"][i, : held["count"][i]].astype(np.float64) for i in range(len(dets))]
    ap50, recall = common.average_precision(dets, truths, 0.5)
    ap75, _ = common.average_precision(dets, truths, 0.75)
    sizes = np.concatenate([np.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])) for t in truths])
    small = [t[np.sqrt((t[:, 2] - t[:, 0]) * (t[:, 3] - t[:, 1])) < 24] for t in truths]
    _, rec_small = common.average_precision(dets, small, 0.5)  # recall only: other detections count as FP
    n_fp_normal = sum(int((s >= 0.5).sum()) for (_, s), t in zip(dets, truths, strict=True) if len(t) == 0)
    print(
        f"HELD-OUT detector (onnxruntime, {len(dets)} phantoms, {len(sizes)} lesions, seed {common.HELDOUT_SEED}): "
        f"AP50={ap50:.4f} AP75={ap75:.4f} recall@{MIN_SCORE}={recall:.4f} | lesions < 24 px: "
        f"recall={rec_small:.4f} | detections >= 0.5 on normal phantoms: {n_fp_normal} "
        f"({infer_s / len(dets) * 1000:.0f} ms/image)",
        flush=True,
    )


if __name__ == "__main__":
    main()
