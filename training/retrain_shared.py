"""What every role's ``medgate train`` shares: reviewed cases from an augmented manifest, the held-out split, the
standard phantom sets, the fine-tuning loop with phantom replay, and the new version's calibration refit.

Role-specific parts live in :mod:`training.retrain_detector`, :mod:`training.retrain_classifier` and
:mod:`training.retrain_segmenter`; the command
itself in :mod:`training.train_from_review`. Torch is imported only inside the functions that train.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import cv2
import numpy as np

T = TypeVar("T")


class ManifestError(ValueError):
    """The manifest cannot be used (named with its line number)."""


@dataclass
class ManifestLine:
    """One reviewed case of an augmented manifest: its loop name, its image (uint8, as exported) and its label."""

    number: int  # line number, for errors
    name: str  # the human loop's name (the manifest's job-name without "a2i/", else the image file's stem)
    image: np.ndarray
    value: Any  # the label attribute's value (boxes for detection, the class id for classification)
    metadata: dict[str, Any]


def _label_attribute(line: dict[str, Any]) -> str:
    names = [k for k in line if k != "source-ref" and not k.endswith("-metadata")]
    if len(names) != 1:
        raise ManifestError(f"expected one label attribute beside source-ref, found {names}")
    return names[0]


def manifest_lines(path: Path, manifest_type: str) -> Iterator[ManifestLine]:
    """The lines of type ``manifest_type`` (e.g. ``groundtruth/image-classification``); images read from beside it."""
    for number, text in enumerate(path.read_text().splitlines(), 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
            attribute = _label_attribute(line)
            metadata = line.get(f"{attribute}-metadata", {})
            if metadata.get("type") != manifest_type:
                continue
            file_name = str(line["source-ref"]).rsplit("/", 1)[-1]
            value = line[attribute]
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"{path} line {number}: {exc}") from None
        image = cv2.imread(str(path.parent / file_name), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ManifestError(f"{path} line {number}: image {file_name} beside the manifest cannot be read")
        job = str(metadata.get("job-name", ""))
        name = job.removeprefix("a2i/") if job.startswith("a2i/") else Path(file_name).stem
        yield ManifestLine(number, name, image, value, metadata)


def is_heldout(name: str, fraction: float) -> bool:
    """Whether a case is held out: by a hash of its name, so its side never changes as cases are added."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def split(cases: list[T], fraction: float, name: Callable[[T], str]) -> tuple[list[T], list[T]]:
    """(to train on, held out); ManifestError unless both sides hold a case."""
    train = [c for c in cases if not is_heldout(name(c), fraction)]
    heldout = [c for c in cases if is_heldout(name(c), fraction)]
    if not train or not heldout:
        raise ManifestError(
            f"{len(cases)} reviewed cases give {len(train)} to train on and {len(heldout)} held out; both need one"
        )
    print(f"reviewed cases: {len(train)} to train on, {len(heldout)} held out", flush=True)
    return train, heldout


def phantom_set(split_name: str, count: int, *, full: bool) -> dict[str, np.ndarray]:
    """The first ``count`` phantoms of a standard split (train, heldout, calib): from the cache, else generated."""
    from concurrent.futures import ProcessPoolExecutor

    from training import common

    seed = {"train": common.TRAIN_SEED, "heldout": common.HELDOUT_SEED, "calib": common.CALIB_SEED}[split_name]
    folder = common.CACHE_DIR / common.DATA_VERSION
    starts = range(0, count, common.CHUNK)
    if all((folder / f"{split_name}_{seed}_{s:06d}_{common.CHUNK}.npz").exists() for s in starts):
        return common.load_split(split_name, count)
    cached = folder / f"{split_name}_{seed}_first_{count}.npz"  # the same phantoms, without a whole chunk
    if cached.exists():
        return dict(np.load(cached))
    pieces = [(seed, s, min(s + 25, count), full) for s in range(0, count, 25)]
    with ProcessPoolExecutor(max_workers=common.THREADS) as pool:
        parts = list(pool.map(common._chunk, pieces))
    data = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f".{cached.stem}.{os.getpid()}.tmp.npz"
    np.savez(temporary, **data)
    os.replace(temporary, cached)
    return data


def pooled(images: np.ndarray) -> np.ndarray:
    """uint8 [N,1024,1024] -> the 512 stage the graph computes first (as the training cache stores it)."""
    summed = images.reshape(len(images), 512, 2, 512, 2).astype(np.uint16).sum(axis=(2, 4))
    return ((summed + 2) // 4).astype(np.uint8)


@dataclass
class Batch:
    """One mixed batch: the first ``len(reviewed)`` rows are reviewed cases, the rest replayed phantoms."""

    reviewed: np.ndarray  # indices into the reviewed cases
    replay: np.ndarray  # indices into the replay set
    flip: np.ndarray  # bool per row: mirrored left-right (targets must follow)
    x: Any  # torch float [B,1,512,512], intensity-augmented


def mixed_batch(
    rng: np.random.Generator,
    gen: Any,
    reviewed_img512: np.ndarray,
    replay_img512: np.ndarray,
    batch: int,
    reviewed_share: float,
    *,
    mirror: bool = True,
) -> Batch:
    """Draw a batch, ``reviewed_share`` of it reviewed cases and the rest standard phantoms, mirrored at random
    (unless ``mirror`` is False: a mirrored chest swaps the segmenter's left and right lungs)."""
    import torch

    from training import common

    half = min(batch, max(1, round(batch * reviewed_share)))
    ri = rng.integers(0, len(reviewed_img512), half)
    pi = rng.integers(0, len(replay_img512), batch - half)
    images = np.concatenate([reviewed_img512[ri], replay_img512[pi]])
    flip = rng.random(batch) < 0.5 if mirror else np.zeros(batch, bool)
    images[flip] = images[flip][:, :, ::-1]
    x = common.augment_intensity(torch.from_numpy(images.copy()).float().div_(255.0)[:, None], gen)
    return Batch(ri, pi, flip, x)


@dataclass(frozen=True)
class Recipe:
    """How to fine-tune: steps, batch size, peak learning rate, seed, the parts kept frozen (parameter name
    prefixes: they keep the serving weights), and the share of each batch that is reviewed cases."""

    steps: int
    batch: int
    lr: float
    seed: int
    frozen: tuple[str, ...] = ()
    reviewed_share: float = 0.5

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Recipe:
        frozen = tuple(part for part in args.freeze.split(",") if part)
        return cls(args.steps, args.batch, args.lr, args.seed, frozen, args.reviewed_share)


def finetune(model: Any, loss_of: Callable[[np.random.Generator, Any], Any], recipe: Recipe) -> float:
    """Fine-tune ``model`` in place with BatchNorm frozen; ``loss_of(rng, torch_generator)`` draws a batch and
    returns its loss. Seconds taken."""
    import torch

    from training import common

    common.setup(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(recipe.frozen))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.lr, weight_decay=1e-4)
    model.eval()  # frozen BatchNorm statistics: the recovered ones are the folded identity
    started = time.time()
    steps = recipe.steps
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = common.cosine_lr(step, steps, recipe.lr, warmup=min(20, steps // 5))
        loss = loss_of(rng, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if (step + 1) % 25 == 0 or step == steps - 1:
            print(f"  step {step + 1}/{steps} loss={loss.item():.4f} ({time.time() - started:.0f}s)", flush=True)
    model.eval()
    return time.time() - started


def to_model_space(image: np.ndarray, boxes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """An exported image (and boxes in its pixels) letterboxed into the 1024 model square, if it is not already."""
    from services.imaging.preprocess import Letterbox

    box = Letterbox.for_shape(*image.shape)
    if box.scale == 1.0 and image.shape == (box.size, box.size):
        return image, boxes
    return box.apply(image), None if boxes is None else box.boxes_to_model(boxes)


class Role(Protocol):
    """What :func:`train_role` needs of a role's module (:mod:`training.retrain_detector`, ``retrain_classifier``)."""

    def load(self, version_dir: Path) -> tuple[Any, str]:
        """The torch model of a version folder and where its weights came from."""

    def serving(self, model: Any) -> Any:
        """The module exported to ONNX (uint8 image in)."""

    def loss(self, model: Any, reviewed: list[Any], replay: dict[str, np.ndarray], recipe: Recipe) -> Any:
        """``loss_of(rng, generator)`` for :func:`finetune`."""

    def measure(self, onnx_path: Path, heldout: list[Any], phantoms: dict[str, np.ndarray]) -> dict[str, float]:
        """The role's metric on the reviewed held-out cases and on the phantom held-out set."""

    def counts(self, heldout: list[Any], phantoms: dict[str, np.ndarray]) -> dict[str, Any]:
        """What the evaluation was measured on."""


def train_role(
    role: Role, args: argparse.Namespace, parent_dir: Path, work: Path, cases: list[Any], outputs: list[str]
) -> Trained:
    """Split the reviewed ``cases``, fine-tune the parent version on the training side with replay, export the new
    ONNX and checkpoint into ``work``, and measure parent and candidate on both held-out sets."""
    import torch

    from training import common

    if not cases:
        raise ManifestError(f"{args.manifest} holds no {args.role} cases")
    train_cases, heldout = split(cases, args.heldout_fraction, lambda c: c.name)
    model, source = role.load(parent_dir)
    print(f"fine-tuning version {parent_dir.name} of {args.model} (weights from {source})", flush=True)
    replay = phantom_set("train", args.replay, full=False)
    recipe = Recipe.from_args(args)
    train_s = finetune(model, role.loss(model, train_cases, replay, recipe), recipe)
    onnx_path, checkpoint = work / "model.onnx", work / "model.pt"
    common.export_onnx(role.serving(model), onnx_path, outputs)
    finish = getattr(role, "finish_export", None)  # e.g. the segmenter's appended ``peaks`` output
    if finish is not None:
        finish(onnx_path)
    torch.save(model.state_dict(), checkpoint)
    phantoms = phantom_set("heldout", args.phantom_heldout, full=True)
    sides = (("parent", parent_dir / "model.onnx"), ("candidate", onnx_path))
    return Trained(
        files={"model.onnx": onnx_path, "model.pt": checkpoint},
        reviewed_train=len(train_cases),
        reviewed_heldout=len(heldout),
        frozen=recipe.frozen,
        seconds=train_s,
        started_from=source,
        evaluation={**role.counts(heldout, phantoms), **{k: role.measure(p, heldout, phantoms) for k, p in sides}},
    )


@dataclass
class Trained:
    """What a role's training gives the command: the files of the new version (under the work folder) and numbers."""

    files: dict[str, Path]
    reviewed_train: int
    reviewed_heldout: int
    frozen: tuple[str, ...]
    seconds: float
    started_from: str
    evaluation: dict[str, Any]  # counts, and "parent"/"candidate" -> {metric: value}


def refit_calibration(role: str, onnx_path: Path, folder: Path, count: int) -> dict[str, Any]:
    """Fit ``role``'s score calibration for the graph at ``onnx_path`` on the first ``count`` phantoms of the
    calibration seed split (never the held-out or training seeds), as ``training.fit_calibration`` fits the shipped
    version's; writes ``folder/calibration.json``; its fit summary."""
    from training import common, fit_calibration

    data = phantom_set("calib", count, full=True)
    fit = {
        "classifier": fit_calibration.fit_classifier,
        "detector": fit_calibration.fit_detector,
        "segmenter_text": fit_calibration.fit_segmenter_text,
    }[role]
    summary = fit(data, onnx_path, folder)
    return {"refitted": True, "phantoms": count, "seed": common.CALIB_SEED, "fit": summary}
