"""Write held-out phantoms as a folder of 16-bit PNGs with the labels file ``medgate review simulate`` reads.

    python -m training.phantom_folder --out var/phantoms --count 20 [--seed 9000000]

Seeds default to ``training.evaluate.HELD_OUT_SEED`` (the held-out phantoms, never trained or calibrated on).
Each phantom ``phantom-<seed>.png`` gets its class, its lesion boxes (original pixels, x1/y1 exclusive) and one
mask PNG per segmentation prompt of the default flow ("left lung", "right lung", "heart", "lesion"), in
``labels.json`` (the format is in clients/review_simulate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

from training.evaluate import HELD_OUT_SEED
from training.phantoms import Phantom, generate

PROMPT_MASKS = {"left lung": "left_lung", "right lung": "right_lung", "heart": "heart", "lesion": "lesion"}


def _mask(phantom: Phantom, key: str) -> np.ndarray:
    return np.asarray(phantom.lesion if key == "lesion" else getattr(phantom, key))


def write_folder(out: Path, count: int, *, seed: int = HELD_OUT_SEED, lesion_probability: float = 0.5) -> Path:
    """``count`` phantoms (seeds ``seed``, ``seed + 1``, ...) into ``out``; returns the labels file."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    images: dict[str, dict[str, object]] = {}
    for i in range(count):
        phantom = generate(np.random.default_rng(seed + i), lesion_probability=lesion_probability)
        name = f"phantom-{seed + i}.png"
        if not cv2.imwrite(str(out / name), phantom.image):
            raise OSError(f"could not write {out / name}")
        masks = {}
        for prompt, key in PROMPT_MASKS.items():
            relative = f"masks/{Path(name).stem}-{key}.png"
            cv2.imwrite(str(out / relative), _mask(phantom, key).astype(np.uint8) * 255)
            masks[prompt] = relative
        images[name] = {
            "label": phantom.label,
            "boxes": [[float(v) for v in box] for box in phantom.lesion_boxes],
            "masks": masks,
        }
    labels = out / "labels.json"
    labels.write_text(json.dumps({"images": images}, indent=1) + "\n")
    return labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--seed", type=int, default=HELD_OUT_SEED)
    args = parser.parse_args(argv)
    print(write_folder(args.out, args.count, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
