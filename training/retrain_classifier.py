"""``medgate train --role classifier``: fine-tune the serving classifier on reviewed classification cases (the
command is :mod:`training.train_from_review`).

Input: the augmented manifest of a classification flow (``medgate review export-manifest --flow
chest-xray-classification``): one line per reviewed case, ``groundtruth/image-classification``, whose
``class-name`` is the reviewers' majority label (the ``label`` of the A2I output.json answers), with the image the
review store kept written beside it. A class name that is not one of the classifier's labels (``normal``,
``lesion``) stops the command, naming the line.

The shipped classifier has no torch checkpoint (``train_classifier.py`` exports ONNX only): its weights are
recovered exactly from the serving version's ONNX (:mod:`training.onnx_checkpoint`; max difference 0.0 on
phantoms), or read from the ``model.pt`` an earlier fine-tune saved. Fine-tuning keeps BatchNorm frozen and, by
default, the encoder (``--freeze encoder``); each batch is half reviewed cases, half standard training phantoms
(replay). Reviewed cases carry only an image label, so their loss is the image-level one (binary cross-entropy on
the spatial max of the lesion-evidence map, multiple-instance style); replayed phantoms keep both of
train_classifier.py's losses (the evidence map against their lesion masks, and the image label).
Evaluation: accuracy (top class, as model.py answers; its temperature keeps the 0.5 point) of the serving
(parent) version and of the new one, on the reviewed held-out cases and on the standard phantom held-out set,
through ONNX Runtime.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.retrain_shared import ManifestError, Trained, manifest_lines, mixed_batch, pooled, to_model_space

MANIFEST_TYPE_CLASSIFICATION = "groundtruth/image-classification"
METRIC = "accuracy"
LABELS = ("normal", "lesion")  # train_classifier.LABELS, the model's labels.txt (without importing torch)
DEFAULT_FREEZE = "encoder"
DEFAULT_LR = 2e-3


@dataclass
class ClassifiedCase:
    name: str  # the human loop's name
    image: np.ndarray  # uint8 [1024, 1024], model space
    label: int  # index into LABELS: the reviewers' class


def read_classifications(path: Path) -> list[ClassifiedCase]:
    """The classification cases of an augmented manifest, with the images beside it."""
    cases: list[ClassifiedCase] = []
    for line in manifest_lines(path, MANIFEST_TYPE_CLASSIFICATION):
        name = str(line.metadata.get("class-name", ""))
        if name not in LABELS:
            raise ManifestError(f"{path} line {line.number}: class {name!r} is not one of the classifier's {LABELS}")
        image, _ = to_model_space(line.image)
        cases.append(ClassifiedCase(line.name, image, LABELS.index(name)))
    return cases


def accuracy(onnx_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose top class (model.py's answer) is the label, through ONNX Runtime."""
    from training import common

    if not len(images):
        return float("nan")
    (probabilities,) = common.ort_run(common.ort_session(onnx_path), images)
    return round(float((probabilities.argmax(axis=1) == labels).mean()), 4)


def finetune(
    model: Any,
    reviewed: list[ClassifiedCase],
    replay: dict[str, np.ndarray],
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    reviewed_share: float = 0.5,
    frozen: tuple[str, ...] = (),
) -> float:
    """Fine-tune in place (BatchNorm frozen): reviewed cases by their image label, replayed phantoms by label and
    lesion mask. Seconds taken."""
    import torch
    import torch.nn.functional as F

    from training import retrain_shared
    from training.train_classifier import lesion_cells

    reviewed_img = pooled(np.stack([c.image for c in reviewed]))
    reviewed_labels = np.array([c.label for c in reviewed], np.float32)

    def loss_of(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = mixed_batch(rng, gen, reviewed_img, replay["img512"], batch, reviewed_share)
        half = len(b.reviewed)
        logits = model(b.x)
        labels = np.concatenate([reviewed_labels[b.reviewed], replay["label"][b.replay].astype(np.float32)])
        image_loss = F.binary_cross_entropy_with_logits(logits.amax(dim=(1, 2, 3)), torch.from_numpy(labels))
        cells = torch.from_numpy(lesion_cells(replay["seg512"][b.replay]))
        mirrored = torch.from_numpy(b.flip[half:])
        cells[mirrored] = cells[mirrored].flip(-1)
        p = torch.sigmoid(logits[half:]).clamp(1e-4, 1 - 1e-4)
        focal = -(torch.log(p) * (1 - p) ** 2 * cells) - torch.log(1 - p) * p**2 * (1 - cells)
        return image_loss + focal.sum() / cells.sum().clamp_min(1.0)

    return retrain_shared.finetune(model, loss_of, steps=steps, lr=lr, seed=seed, frozen=frozen)


def train(args: argparse.Namespace, parent_dir: Path, work: Path) -> Trained:
    """Fine-tune, export, evaluate (the new ONNX and checkpoint under ``work``)."""
    import torch

    from training import common, onnx_checkpoint
    from training.retrain_shared import phantom_set, split
    from training.train_classifier import Classifier, Serving

    cases = read_classifications(args.manifest)
    if not cases:
        raise ManifestError(f"{args.manifest} holds no classification cases")
    train_cases, heldout = split(cases, args.heldout_fraction, lambda c: c.name)
    model, source = onnx_checkpoint.load_version(parent_dir, Classifier)
    print(f"fine-tuning version {parent_dir.name} of {args.model} (weights from {source})", flush=True)
    replay = phantom_set("train", args.replay, full=False)
    frozen = tuple(part for part in args.freeze.split(",") if part)
    train_s = finetune(
        model, train_cases, replay, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed, frozen=frozen
    )
    onnx_path, checkpoint = work / "model.onnx", work / "model.pt"
    common.export_onnx(Serving(model), onnx_path, ["probabilities"])
    torch.save(model.state_dict(), checkpoint)

    phantoms = phantom_set("heldout", args.phantom_heldout, full=True)
    reviewed_images = np.stack([c.image for c in heldout])
    reviewed_labels = np.array([c.label for c in heldout])
    evaluation = {
        side: {
            "reviewed_heldout_accuracy": accuracy(path, reviewed_images, reviewed_labels),
            "phantom_heldout_accuracy": accuracy(path, phantoms["img1024"], phantoms["label"].astype(np.int64)),
        }
        for side, path in (("parent", parent_dir / "model.onnx"), ("candidate", onnx_path))
    }
    return Trained(
        files={"model.onnx": onnx_path, "model.pt": checkpoint},
        reviewed_train=len(train_cases),
        reviewed_heldout=len(heldout),
        frozen=frozen,
        seconds=train_s,
        started_from=source,
        evaluation={
            "reviewed_heldout_cases": len(heldout),
            "reviewed_heldout_by_class": {name: int((reviewed_labels == i).sum()) for i, name in enumerate(LABELS)},
            "phantom_heldout_phantoms": len(phantoms["label"]),
            "phantom_heldout_with_lesions": int(phantoms["label"].sum()),
            **evaluation,
        },
    )
