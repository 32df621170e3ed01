"""``medgate train --role segmenter_text``: fine-tune the serving text segmenter on reviewed masks (the command is
:mod:`training.train_from_review`).

Input: the augmented manifest of a segmentation flow (``medgate review export-manifest --flow
segmentation-review``): one line per reviewed case, ``groundtruth/semantic-segmentation``, whose ``<flow>-ref``
names the reviewers' labeledImage PNG (A2I's semantic-segmentation answer, one colour per prompt, background
white, a later prompt painted over an earlier one) written beside the case's image, with Ground Truth's
``internal-color-map`` (index 0 the background, then the prompts in painting order). Each prompt is mapped to the
network's channel (:func:`channel_of`: left lung, right lung, heart, lesion and their single-channel synonyms); a
union prompt ("lungs") or one the segmenter does not know is not trained on (the command says how many). Pixels of
a prompt painted over by a later one are unknown for it (the reviewer's mask under the later colour is lost), so
they count neither in the loss nor in the Dice.

Weights: the serving version's ``model.pt`` when an earlier fine-tune saved one, else recovered exactly from its
ONNX (:mod:`training.onnx_checkpoint`: masks identical, scores within 3e-5 on phantoms). Fine-tuning keeps
BatchNorm frozen and, by default, the encoder (``--freeze encoder``); each batch is 35% reviewed cases (loss only
on the channels and pixels the reviewers answered), the rest standard training phantoms with all four channels
(replay; each replayed phantom with a lesion cropped around it), in :data:`CROP` windows of the 512 stage, never
mirrored (a mirrored chest swaps the left and right lungs); the loss is train_segmenter's (weighted BCE + soft
Dice). Measured (README "From review to a better model"): faint lesions are learnt at a price in standard lesion
Dice, which the defaults keep inside the promotion tolerance. The exported graph gets ``peaks`` appended as
train_segmenter's does.
Evaluation (``dice``, what ``medgate models promote`` compares): mean over channels of the per-image Dice at 1024
through ONNX Runtime, on the reviewed held-out cases (each answered channel, cases whose reviewed mask is empty
left out) and on the standard phantom held-out set (all four channels, the lesion over phantoms with lesions, as
train_segmenter's held-out evaluation); each channel's Dice is reported beside it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from training import retrain_shared as shared

MANIFEST_TYPE_SEGMENTATION = "groundtruth/semantic-segmentation"
METRIC = "dice"
CHANNELS = ("left_lung", "right_lung", "heart", "lesion")  # common.SEG_CHANNELS, the graph's mask order
DEFAULT_FREEZE = "encoder"
DEFAULT_LR = 1e-3
DEFAULT_SHARE = 0.35  # of each batch: reviewed cases; the rest replayed standard phantoms
LESION = CHANNELS.index("lesion")
# Of the replayed phantoms with a lesion, the share cropped around it (the rest anywhere): the reviewed faint
# lesions make the lesion channel eager, and standard lesions seen whole keep their edges where they were.
REPLAY_LESION_SHARE = 1.0
# Fine-tuning windows, in the 512 stage the network sees (a multiple of 32): 384 keeps the heart in most of them
# (256 windows cost it 0.006-0.02 Dice on the standard set), and costs about half of a whole image's step.
CROP = 384
_LESION_WORDS = ("lesion", "nodule", "mass", "tumor", "tumour", "opacity")
_LESION_PROMPTS = {*_LESION_WORDS, *(w + "s" for w in _LESION_WORDS), "masses", "opacities"}


def channel_of(prompt: str) -> int | None:
    """The one channel a prompt selects (as the serving model.py maps it), ``None`` for a union or unknown one."""
    text = " ".join(prompt.lower().split())
    if text in ("left lung", "right lung"):
        return CHANNELS.index(text.replace(" ", "_"))
    if text in ("heart", "cardiac silhouette"):
        return CHANNELS.index("heart")
    if text in _LESION_PROMPTS:
        return LESION
    return None


@dataclass
class SegmentedCase:
    name: str  # the human loop's name
    image: np.ndarray  # uint8 [1024, 1024], model space
    masks: np.ndarray  # packed bits [4, 131072] of bool [4, 1024, 1024]: the reviewers' mask per channel
    known: np.ndarray  # packed bits, as masks: the pixels the answer says something about, per channel
    channels: list[int] = field(default_factory=list)  # the answered channels


def _label_masks(path: Path, number: int, file_name: str, metadata: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    """(class name, bool mask) per painted label of a labeledImage PNG, in painting order (background left out)."""
    label = cv2.imread(str(path.parent / file_name.rsplit("/", 1)[-1]), cv2.IMREAD_COLOR)
    if label is None:
        raise shared.ManifestError(f"{path} line {number}: label image {file_name} beside the manifest cannot be read")
    try:
        colour_map = metadata["internal-color-map"]
        ordered = sorted(((int(k), v["class-name"], v["hex-color"]) for k, v in colour_map.items()))
        painted = []
        for index, name, colour in ordered:
            if index == 0:
                continue
            bgr = np.array([int(colour[i : i + 2], 16) for i in (5, 3, 1)], np.uint8)
            painted.append((str(name), np.all(label == bgr, axis=2)))
    except (KeyError, TypeError, ValueError) as exc:
        raise shared.ManifestError(f"{path} line {number}: internal-color-map: {exc}") from None
    return painted


def read_segmentations(path: Path) -> list[SegmentedCase]:
    """The segmentation cases of an augmented manifest, with the images and label images beside it."""
    cases: list[SegmentedCase] = []
    skipped: dict[str, int] = {}
    for line in shared.manifest_lines(path, MANIFEST_TYPE_SEGMENTATION):
        painted = _label_masks(path, line.number, str(line.value), line.metadata)
        image, _ = shared.to_model_space(line.image)
        masks = np.zeros((len(CHANNELS), *image.shape), bool)
        known = np.zeros_like(masks)
        covered = np.zeros(line.image.shape, bool)  # painted by a later label
        channels: list[int] = []
        for name, mask in reversed(painted):
            channel = channel_of(name)
            if channel is None or channel in channels:
                skipped[name] = skipped.get(name, 0) + 1
            else:
                model_mask, _ = shared.to_model_space(mask.astype(np.uint8) * 255)
                model_known, _ = shared.to_model_space((~covered).astype(np.uint8) * 255)
                masks[channel], known[channel] = model_mask > 127, model_known > 127
                channels.append(channel)
            covered |= mask
        if channels:
            packed_masks, packed_known = (np.packbits(m.reshape(len(CHANNELS), -1), axis=-1) for m in (masks, known))
            cases.append(SegmentedCase(line.name, image, packed_masks, packed_known, sorted(channels)))
    if skipped:
        print(f"prompts not trained on (a union, unknown or repeated): {skipped}", flush=True)
    return cases


def _pooled_mask(packed: np.ndarray) -> np.ndarray:
    """packed bits [4, 131072] -> float32 [4, 512, 512], the share of each 2x2 cell inside (soft targets)."""
    from training import common

    return shared.pooled(common.unpack_masks(packed).astype(np.uint8) * 255).astype(np.float32) / 255.0


def load(version_dir: Path) -> tuple[Any, str]:
    from training import onnx_checkpoint
    from training.train_segmenter import Segmenter

    return onnx_checkpoint.load_version(version_dir, Segmenter)


def serving(model: Any) -> Any:
    from training.train_segmenter import Serving

    return Serving(model)


def finish_export(onnx_path: Path) -> None:
    from training.segmenter_outputs import add_peaks

    add_peaks(onnx_path)


def loss(model: Any, reviewed: list[SegmentedCase], replay: dict[str, np.ndarray], recipe: shared.Recipe) -> Any:
    """Reviewed cases on their answered channels and pixels, replayed phantoms on all four (train_segmenter's loss)."""
    import torch

    from training import common
    from training.train_segmenter import segmentation_loss

    reviewed_img = shared.pooled(np.stack([c.image for c in reviewed]))
    reviewed_target = np.stack([_pooled_mask(c.masks) for c in reviewed])
    reviewed_known = np.stack([(_pooled_mask(c.known) == 1.0).astype(np.float32) for c in reviewed])

    def loss_of(rng: np.random.Generator, gen: torch.Generator) -> torch.Tensor:
        b = shared.mixed_batch(
            rng, gen, reviewed_img, replay["img512"], recipe.batch, recipe.reviewed_share, mirror=False
        )
        target = np.concatenate([reviewed_target[b.reviewed], common.decode_seg(replay["seg512"][b.replay])])
        known = np.concatenate([reviewed_known[b.reviewed], np.ones((len(b.replay), *target.shape[1:]), np.float32)])
        x, target, known = _crops(rng, b.x, target, known, len(b.reviewed))
        bce, soft_dice = segmentation_loss(model(x), torch.from_numpy(target), torch.from_numpy(known))
        return bce + soft_dice.mean()

    return loss_of


def channel_dice(onnx_path: Path, images: np.ndarray, truth: Callable[[int], tuple[np.ndarray, np.ndarray]]) -> dict:
    """Mean per-image Dice per channel of the graph's masks on uint8 images [N,1024,1024]; ``truth(i)`` gives image
    ``i``'s (mask, known) bool [4,1024,1024]: only known pixels count, and an image whose known mask is empty in a
    channel is left out of it. Channels with no image are absent."""
    from training import common

    session = common.ort_session(onnx_path)
    dices: dict[int, list[float]] = {c: [] for c in range(len(CHANNELS))}
    for i in range(len(images)):
        (masks,) = session.run(["masks"], {"image": images[i : i + 1, None]})
        mask, known = truth(i)
        for c in range(len(CHANNELS)):
            t = mask[c] & known[c]
            if t.any():
                dices[c].append(common.dice(masks[0, c].astype(bool) & known[c], t))
    return {CHANNELS[c]: round(float(np.mean(v)), 4) for c, v in dices.items() if v}


def _summary(prefix: str, per_channel: dict[str, float]) -> dict[str, float]:
    mean = round(float(np.mean(list(per_channel.values()))), 4) if per_channel else float("nan")
    return {f"{prefix}_{METRIC}": mean} | {f"{prefix}_{METRIC}_{name}": v for name, v in per_channel.items()}


def _crops(
    rng: np.random.Generator, x: Any, target: np.ndarray, known: np.ndarray, reviewed: int
) -> tuple[Any, np.ndarray, np.ndarray]:
    """A CROP-square window of each row (the network is fully convolutional; about half the pixels and the time):
    a reviewed row's around a pixel its reviewers marked (anywhere when they marked none), a replayed row's around
    one of its lesions (:data:`REPLAY_LESION_SHARE`) or anywhere."""
    import torch

    xs, ts, ks = [], [], []
    for row in range(len(target)):
        marked: np.ndarray = np.empty((0, 2), np.int64)
        if row < reviewed:
            marked = np.argwhere((target[row] * known[row]).max(axis=0) > 0.5)
        elif rng.random() < REPLAY_LESION_SHARE:
            marked = np.argwhere(target[row, LESION] > 0.5)
        if len(marked):
            cy, cx = marked[rng.integers(len(marked))] + rng.integers(-CROP // 4, CROP // 4 + 1, 2)
        else:
            cy, cx = rng.integers(CROP // 2, 512 - CROP // 2 + 1, 2)
        y0, x0 = (int(np.clip(c - CROP // 2, 0, 512 - CROP)) for c in (cy, cx))
        window = (slice(y0, y0 + CROP), slice(x0, x0 + CROP))
        xs.append(x[row, :, window[0], window[1]])
        ts.append(target[row, :, window[0], window[1]])
        ks.append(known[row, :, window[0], window[1]])
    return torch.stack(xs), np.stack(ts), np.stack(ks)


def measure(onnx_path: Path, heldout: list[SegmentedCase], phantoms: dict[str, np.ndarray]) -> dict[str, float]:
    from training import common

    everywhere = np.ones((len(CHANNELS), 1024, 1024), bool)

    def reviewed_truth(i: int) -> tuple[np.ndarray, np.ndarray]:
        return common.unpack_masks(heldout[i].masks), common.unpack_masks(heldout[i].known)

    def phantom_truth(i: int) -> tuple[np.ndarray, np.ndarray]:
        return common.unpack_masks(phantoms["masks"][i]), everywhere

    reviewed = channel_dice(onnx_path, np.stack([c.image for c in heldout]), reviewed_truth)
    standard = channel_dice(onnx_path, phantoms["img1024"], phantom_truth)
    return _summary("reviewed_heldout", reviewed) | _summary("phantom_heldout", standard)


def counts(heldout: list[SegmentedCase], phantoms: dict[str, np.ndarray]) -> dict[str, Any]:
    return {
        "reviewed_heldout_cases": len(heldout),
        "reviewed_heldout_by_channel": {
            name: sum(c in case.channels and bool(case.masks[c].any()) for case in heldout)
            for c, name in enumerate(CHANNELS)
        },
        "phantom_heldout_phantoms": len(phantoms["img1024"]),
        "phantom_heldout_with_lesions": int((phantoms["count"] > 0).sum()),
    }


def train(args: argparse.Namespace, parent_dir: Path, work: Path) -> shared.Trained:
    """Fine-tune, export, evaluate (the new ONNX and checkpoint under ``work``)."""
    cases = read_segmentations(args.manifest)
    return shared.train_role(sys.modules[__name__], args, parent_dir, work, cases, ["masks", "scores", "areas"])
