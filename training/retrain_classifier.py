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
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import retrain_shared as shared

MANIFEST_TYPE_CLASSIFICATION = "groundtruth/image-classification"
METRIC = "accuracy"
LABELS = ("normal", "lesion")  # train_classifier.LABELS, the model's labels.txt (without importing torch)
DEFAULT_FREEZE = "encoder"
DEFAULT_LR = 2e-3
DEFAULT_SHARE = 0.5  # of each batch: reviewed cases; the rest replayed standard phantoms


@dataclass
class ClassifiedCase:
    name: str  # the human loop's name
    image: np.ndarray  # uint8 [1024, 1024], model space
    label: int  # index into LABELS: the reviewers' class


def read_classifications(path: Path) -> list[ClassifiedCase]:
    """The classification cases of an augmented manifest, with the images beside it."""
    cases: list[ClassifiedCase] = []
    for line in shared.manifest_lines(path, MANIFEST_TYPE_CLASSIFICATION):
        name = str(line.metadata.get("class-name", ""))
        if name not in LABELS:
            raise shared.ManifestError(
                f"{path} line {line.number}: class {name!r} is not one of the classifier's {LABELS}"
            )
        image, _ = shared.to_model_space(line.image)
        cases.append(ClassifiedCase(line.name, image, LABELS.index(name)))
    return cases


def accuracy(onnx_path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose top class (model.py's answer) is the label, through ONNX Runtime."""
    from training import common

    if not len(images):
        return float("nan")
    (probabilities,) = common.ort_run(common.ort_session(onnx_path), images)
    return round(float((probabilities.argmax(axis=1) == labels).mean()), 4)


def load(version_dir: Path) -> tuple[Any, str]:
    from training import onnx_checkpoint
    from training.train_classifier import Classifier

    return onnx_checkpoint.load_version(version_dir, Classifier)


def serving(model: Any) -> Any:
    from training.train_classifier import Serving

    return Serving(model)


def loss(model: Any, reviewed: list[ClassifiedCase], replay: dict[str, np.ndarray], recipe: shared.Recipe) -> Any:
    """Reviewed cases by their image label, replayed phantoms by label and lesion mask (train_classifier's losses)."""
    import torch
    import torch.nn.functional as F

    from training.train_classifier import lesion_cells

    reviewed_img = shared.pooled(np.stack([c.image for c in reviewed]))
    reviewed_labels = np.array([c.label for c in reviewed], np.float32)

    def loss_of(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = shared.mixed_batch(rng, gen, reviewed_img, replay["img512"], recipe.batch, recipe.reviewed_share)
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

    return loss_of


def measure(onnx_path: Path, heldout: list[ClassifiedCase], phantoms: dict[str, np.ndarray]) -> dict[str, float]:
    labels = np.array([c.label for c in heldout])
    return {
        "reviewed_heldout_accuracy": accuracy(onnx_path, np.stack([c.image for c in heldout]), labels),
        "phantom_heldout_accuracy": accuracy(onnx_path, phantoms["img1024"], phantoms["label"].astype(np.int64)),
    }


def counts(heldout: list[ClassifiedCase], phantoms: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "reviewed_heldout_cases": len(heldout),
        "reviewed_heldout_by_class": {name: sum(c.label == i for c in heldout) for i, name in enumerate(LABELS)},
        "phantom_heldout_phantoms": len(phantoms["label"]),
        "phantom_heldout_with_lesions": int(phantoms["label"].sum()),
    }


def train(args: argparse.Namespace, parent_dir: Path, work: Path) -> shared.Trained:
    """Fine-tune, export, evaluate (the new ONNX and checkpoint under ``work``)."""
    cases = read_classifications(args.manifest)
    return shared.train_role(sys.modules[__name__], args, parent_dir, work, cases, ["probabilities"])
