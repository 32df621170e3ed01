"""``medgate train --role detector``: fine-tune the serving detector on reviewed cases (the command is
:mod:`training.train_from_review`).

Seed 003's loop, closed: the review service's augmented manifest (``medgate review export-manifest``: one JSON
line per reviewed case, with the case's 1024 model-space image written beside it and the reviewer's boxes in
its pixels) is read here, never the review store's database.

Fine-tuning starts from the serving version's own weights (its ``model.pt`` when a fine-tune saved one, else
recovered exactly from its ONNX, :mod:`training.detector_checkpoint`), with BatchNorm, the encoder and the
decoder frozen (``--freeze``: only the neck and the heads learn), fixed seeds and each batch half reviewed
cases, half standard training phantoms (replay, so the detector keeps what it knew). Measured on faint lesions
(38 reviewed, 100 steps; AP50 on 100 standard held-out phantoms, 0.9995 before): training every layer raised
their AP50 0.35 -> 0.65 but cost 0.038 on the standard set; the encoder frozen, 0.69 for 0.024; encoder and
decoder frozen, 0.54 for 0.014 (the README's "From review to a better model" has the table).
Evaluation: AP50 of the serving (parent) version and of the new one, on the reviewed held-out cases and on the
standard phantom held-out set, both through ONNX Runtime with model.py's post-processing (min score 0.05, NMS at
IoU 0.5).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.retrain_shared import (
    ManifestError,
    Recipe,
    Trained,
    manifest_lines,
    mixed_batch,
    pooled,
    to_model_space,
    train_role,
)

MANIFEST_TYPE_DETECTION = "groundtruth/object-detection"
METRIC = "ap50"
DEFAULT_FREEZE = "encoder,decoder"
DEFAULT_LR = 2e-3
DEFAULT_SHARE = 0.5  # of each batch: reviewed cases; the rest replayed standard phantoms


@dataclass
class ReviewedCase:
    name: str  # the human loop's name (the manifest's job-name without "a2i/", else the image file's stem)
    image: np.ndarray  # uint8 [1024, 1024], model space
    boxes: np.ndarray  # float64 [N, 4] x0, y0, x1, y1 in the image's pixels


def read_manifest(path: Path) -> list[ReviewedCase]:
    """The detection cases of an augmented manifest; images are read from beside it (``source-ref``'s file name)."""
    cases: list[ReviewedCase] = []
    for line in manifest_lines(path, MANIFEST_TYPE_DETECTION):
        try:
            boxes = np.array(
                [
                    [a["left"], a["top"], a["left"] + a["width"], a["top"] + a["height"]]
                    for a in line.value["annotations"]
                ],
                dtype=np.float64,
            ).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path} line {line.number}: {exc}") from None
        image, model_boxes = to_model_space(line.image, boxes)
        cases.append(ReviewedCase(line.name, image, boxes if model_boxes is None else model_boxes))
    return cases


def ap50(onnx_path: Path, images: np.ndarray, truths: list[np.ndarray]) -> float:
    """AP at IoU 0.5 of the graph at ``onnx_path`` with model.py's post-processing."""
    from training import common
    from training.train_detector import postprocess

    if not len(images):
        return float("nan")
    boxes, scores = common.ort_run(common.ort_session(onnx_path), images)
    detections = [postprocess(b, s) for b, s in zip(boxes, scores, strict=True)]
    return round(common.average_precision(detections, truths, 0.5)[0], 4)


def load(version_dir: Path) -> tuple[Any, str]:
    from training.detector_checkpoint import load_detector

    return load_detector(version_dir)


def serving(model: Any) -> Any:
    from training.train_detector import Serving

    return Serving(model)


def loss(model: Any, reviewed: list[ReviewedCase], replay: dict[str, np.ndarray], recipe: Recipe) -> Any:
    """Each batch ``recipe.reviewed_share`` reviewed cases (their boxes), the rest replayed standard phantoms."""
    import torch
    import torch.nn.functional as F

    from training import common
    from training.train_detector import focal_loss, targets

    reviewed_img = pooled(np.stack([c.image for c in reviewed]))
    reviewed_boxes = np.zeros((len(reviewed), common.MAX_LESIONS * 4, 4), np.float32)
    reviewed_counts = np.zeros(len(reviewed), np.int64)
    for i, case in enumerate(reviewed):
        n = min(len(case.boxes), reviewed_boxes.shape[1])
        reviewed_boxes[i, :n], reviewed_counts[i] = case.boxes[:n], n
    width = max(reviewed_boxes.shape[1], replay["boxes"].shape[1])
    batch = recipe.batch

    def loss_of(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = mixed_batch(rng, gen, reviewed_img, replay["img512"], batch, recipe.reviewed_share)
        half = len(b.reviewed)
        bx = np.zeros((batch, width, 4), np.float32)
        bx[:half, : reviewed_boxes.shape[1]] = reviewed_boxes[b.reviewed]
        bx[half:, : replay["boxes"].shape[1]] = replay["boxes"][b.replay]
        counts = np.concatenate([reviewed_counts[b.reviewed], replay["count"][b.replay].astype(np.int64)])
        flipped = bx.copy()
        flipped[b.flip, :, 0], flipped[b.flip, :, 2] = 1024.0 - bx[b.flip, :, 2], 1024.0 - bx[b.flip, :, 0]
        heat, reg, mask = (torch.from_numpy(a) for a in targets(flipped, counts))
        heat_logits, reg_pred = model(b.x)
        positives = mask.sum().clamp_min(1.0)
        return (
            focal_loss(heat_logits, heat)
            + (F.l1_loss(reg_pred[:, :2], reg[:, :2], reduction="none") * mask).sum() / positives
            + (F.l1_loss(reg_pred[:, 2:], reg[:, 2:], reduction="none") * mask).sum() / positives
        )

    return loss_of


def _phantom_truths(phantoms: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [phantoms["boxes"][i, :n].astype(np.float64) for i, n in enumerate(phantoms["count"])]


def measure(onnx_path: Path, heldout: list[ReviewedCase], phantoms: dict[str, np.ndarray]) -> dict[str, float]:
    return {
        "reviewed_heldout_ap50": ap50(onnx_path, np.stack([c.image for c in heldout]), [c.boxes for c in heldout]),
        "phantom_heldout_ap50": ap50(onnx_path, phantoms["img1024"], _phantom_truths(phantoms)),
    }


def counts(heldout: list[ReviewedCase], phantoms: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "reviewed_heldout_cases": len(heldout),
        "reviewed_heldout_lesions": int(sum(len(c.boxes) for c in heldout)),
        "phantom_heldout_phantoms": len(phantoms["count"]),
        "phantom_heldout_lesions": int(phantoms["count"].sum()),
    }


def train(args: argparse.Namespace, parent_dir: Path, work: Path) -> Trained:
    """Fine-tune, export, evaluate (the new ONNX and checkpoint under ``work``)."""
    return train_role(sys.modules[__name__], args, parent_dir, work, read_manifest(args.manifest), ["boxes", "scores"])
