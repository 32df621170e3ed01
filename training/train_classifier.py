"""Train the reference classifier (normal vs lesion) on phantoms; export triton_models/classifier/1/model.onnx.

    python -m training.train_classifier [--steps N] [--batch B]

Graph: image uint8 [B,1,1024,1024] -> /255, 2x2 mean -> space-to-depth -> small CNN ->
lesion-evidence map 128x128 (8 model pixels a cell) -> image logit = spatial max ->
``probabilities`` [B, 2] = (normal, lesion). The evidence map is trained with the lesion masks as
auxiliary supervision (CenterNet's focal loss, normalised by the lesion cells), together with the
image-level loss on the max; mean-reduced losses on the map stalled at "no lesion anywhere".
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import common
from training.metrics import auroc

ONNX_PATH = common.MODELS_DIR / "classifier" / "1" / "model.onnx"
LABELS = ("normal", "lesion")
SEED = 11
CHANNELS = (16, 24, 32, 48, 64)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = common.Encoder(CHANNELS, stem_stride=2)  # levels at 128, 64, 32, 16, 8
        self.decoder = common.Decoder(CHANNELS, stop=0)  # 128x128
        self.neck = common.cbr(CHANNELS[0], 16)
        self.head = nn.Conv2d(16, 1, 1)
        nn.init.constant_(self.head.bias, -4.0)

    def forward(self, x512: torch.Tensor) -> torch.Tensor:
        """float [B,1,512,512] -> evidence logits [B,1,128,128]."""
        return self.head(self.neck(self.decoder(self.encoder(x512))))


class Serving(nn.Module):
    def __init__(self, core: Classifier) -> None:
        super().__init__()
        self.pre = common.Preprocess()
        self.core = core

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        logit = self.core(self.pre(image)).amax(dim=(1, 2, 3))
        p = torch.sigmoid(logit)
        return torch.stack([1.0 - p, p], dim=1)


def lesion_cells(seg512: np.ndarray) -> np.ndarray:
    """[B,512,512] codes -> [B,1,128,128] float: any lesion pixel in the cell (8 model pixels)."""
    lesion = common.SEG_LUT[seg512][..., 3] > 0
    b = lesion.shape[0]
    return lesion.reshape(b, 128, 4, 128, 4).any(axis=(2, 4))[:, None].astype(np.float32)


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
    img, seg, labels = data["img512"], data["seg512"], data["label"]
    print(f"train: {len(img)} phantoms, {labels.mean():.2f} with lesions", flush=True)
    gen = torch.Generator().manual_seed(SEED)
    order_rng = np.random.default_rng(SEED)
    perm: list[int] = []

    def batch_fn(step: int) -> tuple:
        nonlocal perm
        if len(perm) < args.batch:
            perm = list(order_rng.permutation(len(img))) + perm
        idx = np.array([perm.pop() for _ in range(args.batch)])
        x = torch.from_numpy(img[idx]).float().div_(255.0)[:, None]
        cells = torch.from_numpy(lesion_cells(seg[idx]))
        y = torch.from_numpy(labels[idx].astype(np.float32))
        flip = torch.rand(len(idx), generator=gen) < 0.5
        x[flip] = x[flip].flip(-1)
        cells[flip] = cells[flip].flip(-1)
        return common.augment_intensity(x, gen), cells, y

    def loss_fn(model: Classifier, x: torch.Tensor, cells: torch.Tensor, y: torch.Tensor) -> tuple:
        logits = model(x)
        p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
        focal = -(torch.log(p) * (1 - p) ** 2 * cells) - torch.log(1 - p) * p**2 * (1 - cells)
        cell_loss = focal.sum() / cells.sum().clamp_min(1.0)
        image_loss = F.binary_cross_entropy_with_logits(logits.amax(dim=(1, 2, 3)), y)
        return cell_loss + image_loss, {"cell": cell_loss.item(), "image": image_loss.item()}

    model = Classifier()
    print(f"classifier: {sum(p.numel() for p in model.parameters())} parameters", flush=True)
    train_s = common.train_loop(model, args.steps, batch_fn, loss_fn, lr=args.lr)
    print(f"training took {train_s:.0f}s", flush=True)

    common.export_onnx(Serving(model), ONNX_PATH, ["probabilities"])
    (ONNX_PATH.parent.parent / "labels.txt").write_text("\n".join(LABELS) + "\n")

    held = common.load_split("heldout", args.heldout)
    t0 = time.time()
    (probs,) = common.ort_run(common.ort_session(ONNX_PATH), held["img1024"])
    infer_s = time.time() - t0
    truth = held["label"].astype(bool)
    pred = probs.argmax(1) == 1
    acc = float((pred == truth).mean())
    auc = auroc(probs[:, 1], truth)
    sens = float(pred[truth].mean())
    spec = float((~pred[~truth]).mean())
    print(
        f"HELD-OUT classifier (onnxruntime, {len(truth)} phantoms, seed {common.HELDOUT_SEED}): "
        f"accuracy={acc:.4f} AUC={auc:.4f} sensitivity={sens:.4f} specificity={spec:.4f} "
        f"({infer_s / len(truth) * 1000:.0f} ms/image)",
        flush=True,
    )
    missed = np.nonzero(truth & ~pred)[0]
    if len(missed):
        sizes = [
            float((held["boxes"][i, : held["count"][i], 2:] - held["boxes"][i, : held["count"][i], :2]).max())
            for i in missed
        ]
        print(f"  missed lesion images: {len(missed)}, largest lesion side (model px): {np.round(sizes, 1)}")


if __name__ == "__main__":
    main()
