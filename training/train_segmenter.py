"""Train the text-prompt segmenter's network on phantoms; export triton_models/segmenter_text/1/model.onnx.

    python -m training.train_segmenter [--steps N] [--batch B]

One pass predicts four channels (common.SEG_CHANNELS): patient's left lung (image right),
patient's right lung (image left), heart, lesion. The Triton model.py maps each text prompt to
its channel(s). Graph: image uint8 [B,1,1024,1024] -> /255, 2x2 mean -> space-to-depth 256 ->
U-Net (256..16) -> 4x4 logits per 256-pixel, pixel-shuffled to 512 -> bilinear to 1024 ->
``masks`` uint8 [B,4,1024,1024] (probability > 0.5), ``scores`` [B,4] (mean probability inside
the mask, 0 when empty), ``areas`` [B,4] (mask pixels) and, appended after export by
``training.segmenter_outputs``, ``peaks`` [B,4] (each channel's highest probability; the score head of
an empty mask reads it). The calibration that model.py applies is fitted afterwards by
``python -m training.fit_calibration`` (``make calibrate-models``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import common
from training.segmenter_outputs import add_peaks

ONNX_PATH = common.MODELS_DIR / "segmenter_text" / "1" / "model.onnx"
SEED = 37
CHANNELS = (16, 24, 32, 48, 64)
N_OUT = len(common.SEG_CHANNELS)


class Segmenter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = common.Encoder(CHANNELS, stem_stride=1)  # levels at 256, 128, 64, 32, 16
        self.decoder = common.Decoder(CHANNELS, stop=0)  # 256x256
        self.head = nn.Conv2d(CHANNELS[0], N_OUT * 4, 1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x512: torch.Tensor) -> torch.Tensor:
        """float [B,1,512,512] -> logits [B,4,512,512]."""
        return self.shuffle(self.head(self.decoder(self.encoder(x512))))


class Serving(nn.Module):
    def __init__(self, core: Segmenter) -> None:
        super().__init__()
        self.pre = common.Preprocess()
        self.core = core

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = F.interpolate(self.core(self.pre(image)), scale_factor=2.0, mode="bilinear", align_corners=False)
        prob = torch.sigmoid(logits)
        fg = (prob > 0.5).to(torch.float32)
        areas = fg.sum(dim=(2, 3))
        scores = (prob * fg).sum(dim=(2, 3)) / areas.clamp_min(1.0)
        return fg.to(torch.uint8), scores, areas


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, known: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted BCE, soft Dice loss per channel [4]) of logits [B,4,H,W] against targets; with ``known`` (0/1, as
    the logits) only the pixels it marks count (``medgate train`` fine-tunes on reviewed masks of some prompts)."""
    weight = torch.tensor([1.0, 1.0, 1.0, 4.0]).view(1, N_OUT, 1, 1)
    pixels = F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight
    prob = torch.sigmoid(logits)
    if known is None:
        bce = pixels.mean()
    else:
        bce = (pixels * known).sum() / known.sum().clamp_min(1.0)
        prob, target = prob * known, target * known
    inter = (prob * target).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + target.sum(dim=(0, 2, 3))
    return bce, 1.0 - (2 * inter + 1.0) / (denom + 1.0)


def loss_fn(model: Segmenter, x: torch.Tensor, target: torch.Tensor) -> tuple:
    bce, soft_dice = segmentation_loss(model(x), target)
    loss = bce + soft_dice.mean()
    parts = {"bce": bce.item()} | {
        f"dice_{n}": 1 - d.item() for n, d in zip(common.SEG_CHANNELS, soft_dice, strict=True)
    }
    return loss, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--heldout", type=int, default=400)
    args = parser.parse_args()
    common.setup(SEED)

    data = common.load_split("train", args.train)
    img, seg = data["img512"], data["seg512"]
    print(f"train: {len(img)} phantoms", flush=True)
    gen = torch.Generator().manual_seed(SEED)
    order_rng = np.random.default_rng(SEED)
    perm: list[int] = []

    def batch_fn(step: int) -> tuple:
        nonlocal perm
        if len(perm) < args.batch:
            perm = list(order_rng.permutation(len(img))) + perm
        idx = np.array([perm.pop() for _ in range(args.batch)])
        x = torch.from_numpy(img[idx]).float().div_(255.0)[:, None]
        target = torch.from_numpy(common.decode_seg(seg[idx]))
        return common.augment_intensity(x, gen), target

    model = Segmenter()
    print(f"segmenter: {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train_s = common.train_loop(model, args.steps, batch_fn, loss_fn, lr=3e-3, log_every=50)
    print(f"training took {train_s:.0f}s", flush=True)

    common.export_onnx(Serving(model), ONNX_PATH, ["masks", "scores", "areas"])
    add_peaks(ONNX_PATH)
    evaluate(args.heldout)


def evaluate(n: int) -> None:
    held = common.load_split("heldout", n)
    session = common.ort_session(ONNX_PATH)
    dices: dict[str, list[float]] = {name: [] for name in common.SEG_CHANNELS}
    pooled = np.zeros((N_OUT, 2))  # intersection*2, sum of sizes
    lesion_fp_images = 0
    t0 = time.time()
    for i in range(0, len(held["img1024"]), 4):
        (masks,) = session.run(["masks"], {"image": held["img1024"][i : i + 4, None]})
        truth = common.unpack_masks(held["masks"][i : i + 4])
        for j in range(len(masks)):
            for c, name in enumerate(common.SEG_CHANNELS):
                p, t = masks[j, c].astype(bool), truth[j, c]
                pooled[c] += (2 * (p & t).sum(), p.sum() + t.sum())
                if name == "lesion" and not t.any():
                    lesion_fp_images += int(p.any())
                    continue
                dices[name].append(common.dice(p, t))
    infer_s = time.time() - t0
    summary = " ".join(f"{k}={np.mean(v):.4f}" for k, v in dices.items())
    glob = " ".join(f"{k}={pooled[c, 0] / pooled[c, 1]:.4f}" for c, k in enumerate(common.SEG_CHANNELS))
    n_normal = int((held["count"][:n] == 0).sum())
    print(
        f"HELD-OUT segmenter (onnxruntime, {n} phantoms, seed {common.HELDOUT_SEED}, Dice at 1024): "
        f"mean per image: {summary} (lesion over the {len(dices['lesion'])} phantoms with lesions) | "
        f"pooled: {glob} | normal phantoms with any lesion pixel: {lesion_fp_images}/{n_normal} "
        f"({infer_s / n * 1000:.0f} ms/image)",
        flush=True,
    )


if __name__ == "__main__":
    main()
