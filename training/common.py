"""Shared pieces of the reference-model training: phantom data sets (cached), layers, export, metrics.

Data flow, identical to serving: phantom (16-bit, original size) -> auto window to uint8 ->
letterbox to 1024x1024 (``training.phantoms.model_space``). Every exported ONNX graph takes that
uint8 square as ``image`` [B, 1, 1024, 1024] and starts with ``cast -> /255 -> 2x2 average pool``
(:class:`Preprocess`), so the training sets are cached at that 512x512 stage (``img512``) and the
networks train on exactly what the graph computes after its first op (up to uint8 rounding of
the 2x2 means in the cache). Held-out sets are kept at full 1024 resolution and are scored through
onnxruntime on the exported graph, the same bytes Triton will run.
"""

from __future__ import annotations

import itertools
import os
import random
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from services.imaging.boxes import box_iou
from training import phantoms

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "phantoms"
MODELS_DIR = REPO / "triton_models"
# Bump when phantoms.py or the cached representation changes (old caches are then ignored).
DATA_VERSION = "v1"
TRAIN_SEED = 1_000_003
HELDOUT_SEED = 2_000_029  # a different seed: held-out phantoms are never seen in training
CALIB_SEED = 3_000_017  # a third seed, for fitting score calibration (never the held-out set)
CHUNK = 200
WINDOW_MODES = ("minmax", "percentile", "percentile-1-99")
WINDOW_P = (0.5, 0.25, 0.25)
THREADS = 2

# Segmentation channels (all models agree): patient's left lung (image right), patient's right
# lung (image left), heart, lesion.
SEG_CHANNELS = ("left_lung", "right_lung", "heart", "lesion")


def setup(seed: int) -> None:
    torch.set_num_threads(THREADS)
    torch.set_num_interop_threads(1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# 2x2 coverage codes: one uint8 per 512-pixel holds how many of its four 1024-pixels are left lung,
# right lung, heart (disjoint, so at most 4 together) and lesion.

_COMBOS = [(a, b, c, d) for a, b, c in itertools.product(range(5), repeat=3) if a + b + c <= 4 for d in range(5)]
SEG_LUT = np.array(_COMBOS, dtype=np.float32) / 4.0  # code -> soft targets [4]
_ENCODE = np.full((5, 5, 5, 5), 255, dtype=np.uint8)
for _i, _c in enumerate(_COMBOS):
    _ENCODE[_c] = _i
assert len(_COMBOS) < 255


def encode_seg(masks: np.ndarray) -> np.ndarray:
    """[4, 1024, 1024] bool -> [512, 512] uint8 coverage code."""
    counts = masks.reshape(4, 512, 2, 512, 2).sum(axis=(2, 4))
    return _ENCODE[counts[0], counts[1], counts[2], counts[3]]


def decode_seg(codes: np.ndarray) -> np.ndarray:
    """[..., 512, 512] uint8 code -> [..., 4, 512, 512] float32 soft targets."""
    return np.moveaxis(SEG_LUT[codes], -1, -3)


# ----------------------------------------------------------------------------------------------
# data sets

MAX_LESIONS = 3


def _sample(seed: int, index: int, full: bool) -> dict:
    rng = np.random.default_rng([seed, index])
    ph = phantoms.generate(rng, lesion_probability=0.5)
    mode_rng = np.random.default_rng([seed, index, 1])
    mode = WINDOW_MODES[int(mode_rng.choice(len(WINDOW_MODES), p=WINDOW_P))]
    ms = phantoms.model_space(ph, mode)
    masks = np.stack([ms[name] for name in SEG_CHANNELS])
    boxes = np.zeros((MAX_LESIONS, 4), dtype=np.float32)
    boxes[: len(ms["boxes"])] = ms["boxes"]
    out = {
        "label": np.uint8(ph.label == "lesion"),
        "count": np.uint8(len(ms["boxes"])),
        "boxes": boxes,
        "orig_shape": np.array(ph.image.shape, dtype=np.int32),
    }
    if full:
        out["img1024"] = ms["image"]
        out["masks"] = np.packbits(masks.reshape(4, -1), axis=1)
    else:
        pooled = ms["image"].reshape(512, 2, 512, 2).astype(np.uint16).sum(axis=(1, 3))
        out["img512"] = ((pooled + 2) // 4).astype(np.uint8)
        out["seg512"] = encode_seg(masks)
    return out


def _chunk(args: tuple[int, int, int, bool]) -> dict:
    seed, start, stop, full = args
    samples = [_sample(seed, i, full) for i in range(start, stop)]
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}


def load_split(split: str, n: int, *, workers: int = 2) -> dict[str, np.ndarray]:
    """First ``n`` samples of ``train`` (512 cache), ``heldout`` or ``calib`` (full 1024 images, packed masks)."""
    seeds = {"train": TRAIN_SEED, "heldout": HELDOUT_SEED, "calib": CALIB_SEED}
    if split not in seeds:
        raise ValueError(f"unknown split {split!r}")
    full = split != "train"
    seed = seeds[split]
    folder = CACHE_DIR / DATA_VERSION
    folder.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, n, CHUNK))
    paths = [folder / f"{split}_{seed}_{s:06d}_{CHUNK}.npz" for s in starts]
    todo = [(seed, s, s + CHUNK, full) for s, p in zip(starts, paths, strict=True) if not p.exists()]
    if todo:
        t0 = time.time()
        print(f"generating {len(todo) * CHUNK} {split} phantoms into {folder} ...", flush=True)
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for args, result in zip(todo, pool.map(_chunk, todo), strict=True):
                path = folder / f"{split}_{seed}_{args[1]:06d}_{CHUNK}.npz"
                tmp = path.with_suffix(".tmp.npz")
                np.savez_compressed(tmp, **result)
                os.replace(tmp, path)
                print(f"  {path.name} ({time.time() - t0:.0f}s)", flush=True)
    parts = [dict(np.load(p)) for p in paths]
    return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}


def unpack_masks(packed: np.ndarray) -> np.ndarray:
    """[..., 4, 131072] packed bits -> [..., 4, 1024, 1024] bool."""
    return np.unpackbits(packed, axis=-1).reshape(*packed.shape[:-1], 1024, 1024).astype(bool)


# ----------------------------------------------------------------------------------------------
# layers


def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Preprocess(nn.Module):
    """uint8 [B, 1, 1024, 1024] -> float [B, 1, 512, 512] in 0..1 (the graph's first op)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32) * (1.0 / 255.0)
        return F.avg_pool2d(x, 2)


class Encoder(nn.Module):
    """512 input -> space-to-depth 256 (no information lost) -> feature pyramid at 256/2**i."""

    def __init__(self, channels: tuple[int, ...], stem_stride: int = 1) -> None:
        super().__init__()
        self.unshuffle = nn.PixelUnshuffle(2)
        self.stem = nn.Sequential(cbr(4, channels[0], stem_stride), cbr(channels[0], channels[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(cbr(channels[i], channels[i + 1], 2), cbr(channels[i + 1], channels[i + 1]))
            for i in range(len(channels) - 1)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(self.unshuffle(x - 0.5))
        feats = [x]
        for down in self.downs:
            x = down(x)
            feats.append(x)
        return feats


class Decoder(nn.Module):
    """Top-down path (upsample + lateral add + conv) from the coarsest level to level ``stop``."""

    def __init__(self, channels: tuple[int, ...], stop: int = 0) -> None:
        super().__init__()
        self.stop = stop
        n = len(channels)
        self.up = nn.ModuleList(cbr(channels[i + 1], channels[i]) for i in range(n - 1))
        self.lateral = nn.ModuleList(nn.Conv2d(channels[i], channels[i], 1) for i in range(n - 1))
        self.fuse = nn.ModuleList(cbr(channels[i], channels[i]) for i in range(n - 1))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = feats[-1]
        for i in range(len(feats) - 2, self.stop - 1, -1):
            y = F.interpolate(self.up[i](y), scale_factor=2.0, mode="nearest")
            y = self.fuse[i](y + self.lateral[i](feats[i]))
        return y


def augment_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random gamma per image (keeps black padding black and white white)."""
    gamma = torch.exp(torch.empty(x.shape[0], 1, 1, 1).uniform_(-0.2, 0.2, generator=gen))
    return x.clamp_min(0).pow(gamma)


# ----------------------------------------------------------------------------------------------
# training loop and export


def cosine_lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * t)))


def train_loop(
    model: nn.Module,
    steps: int,
    batch_fn: Callable[[int], tuple],
    loss_fn: Callable[..., tuple[torch.Tensor, dict]],
    *,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    log_every: int = 50,
) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    t0 = time.time()
    running: dict[str, float] = {}
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr)
        batch = batch_fn(step)
        loss, parts = loss_fn(model, *batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + float(v)
        if (step + 1) % log_every == 0 or step == steps - 1:
            msg = " ".join(f"{k}={v / log_every:.4f}" for k, v in running.items())
            print(f"  step {step + 1}/{steps} {msg} ({time.time() - t0:.0f}s)", flush=True)
            running = {}
    model.eval()
    return time.time() - t0


def export_onnx(model: nn.Module, path: Path, output_names: list[str], *, example_batch: int = 2) -> None:
    """Export ``model`` (uint8 [B,1,1024,1024] -> outputs) with a dynamic batch axis, opset 17."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    example = torch.randint(0, 256, (example_batch, 1, 1024, 1024), dtype=torch.uint8)
    dynamic = {"image": {0: "batch"}} | {name: {0: "batch"} for name in output_names}
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["image"],
        output_names=output_names,
        dynamic_axes=dynamic,
        opset_version=17,
        dynamo=False,
        do_constant_folding=True,
    )
    onnx.checker.check_model(onnx.load(str(path)))
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1e6:.2f} MB)", flush=True)


def ort_session(path: Path):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_run(session, images: np.ndarray, batch: int = 4) -> list[np.ndarray]:
    """Run ``session`` over uint8 [N, 1024, 1024] in batches; outputs concatenated along axis 0."""
    outs: list[list[np.ndarray]] = []
    for i in range(0, len(images), batch):
        res = session.run(None, {"image": images[i : i + batch, None]})
        outs.append(res)
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


# ----------------------------------------------------------------------------------------------
# metrics


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while len(order):
        i = int(order[0])
        keep.append(i)
        if len(order) == 1:
            break
        ious = box_iou(boxes[i : i + 1], boxes[order[1:]])[0]
        order = order[1:][ious <= iou]
    return np.array(keep, dtype=np.int64)


def average_precision(
    detections: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], iou: float = 0.5
) -> tuple[float, float]:
    """VOC all-point AP over images; returns (AP, recall at the lowest score kept)."""
    records = []
    n_truth = sum(len(t) for t in truths)
    for img, ((boxes, scores), _gt) in enumerate(zip(detections, truths, strict=True)):
        for k in range(len(scores)):
            records.append((float(scores[k]), img, boxes[k]))
    records.sort(key=lambda r: -r[0])
    used = [np.zeros(len(t), dtype=bool) for t in truths]
    tp = np.zeros(len(records))
    for r, (_, img, box) in enumerate(records):
        gt = truths[img]
        if len(gt) == 0:
            continue
        ious = box_iou(box[None], gt)[0]
        j = int(ious.argmax())
        if ious[j] >= iou and not used[img][j]:
            used[img][j] = True
            tp[r] = 1
    if n_truth == 0:
        return float("nan"), float("nan")
    ctp = np.cumsum(tp)
    recall = ctp / n_truth
    precision = ctp / np.arange(1, len(records) + 1)
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    ap = float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))
    return ap, float(recall[-1]) if len(recall) else 0.0


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    p, t = pred.astype(bool), truth.astype(bool)
    denom = int(p.sum()) + int(t.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & t).sum()) / denom
