"""Held-out evaluation of the reference models through a running Triton (never in-process).

``python -m training.evaluate --count 200 --out bench/results/models.json`` starts the embedded
Triton on free ports (or uses ``--url``), sends held-out phantoms (a seed range training never
saw) through tritonclient gRPC exactly as the gateway would, and prints one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc

from services.imaging.boxes import box_iou
from training.metrics import auroc
from training.phantoms import generate, model_space

# Training uses seeds below this; evaluation starts here so the two never meet.
HELD_OUT_SEED = 9_000_000
TEXT_PROMPTS = {"left lung": "left_lung", "right lung": "right_lung", "lungs": "lungs", "heart": "heart"}
TARGETS = {
    "classifier.accuracy": 0.98,
    "detector.ap50": 0.95,
    "segmenter_text.dice.left lung": 0.95,
    "segmenter_text.dice.right lung": 0.95,
    "segmenter_text.dice.lungs": 0.95,
    "segmenter_text.dice.heart": 0.95,
    "segmenter_text.dice.lesion": 0.85,
    "segmenter_box.dice.anatomy": 0.90,
    "segmenter_box.dice.lesion": 0.90,
}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def average_precision(
    detections: list[tuple[np.ndarray, np.ndarray]], truths: list[np.ndarray], iou: float = 0.5
) -> float:
    """VOC-style all-point AP over images: detections = [(boxes, scores)] and truths = [boxes] per image."""
    records: list[tuple[float, bool]] = []
    total = sum(len(t) for t in truths)
    for (boxes, scores), truth in zip(detections, truths, strict=True):
        matched = np.zeros(len(truth), dtype=bool)
        overlaps = box_iou(boxes, truth)
        for index in np.argsort(-scores, kind="stable"):
            hit = False
            if len(truth):
                best = int(np.argmax(overlaps[index]))
                if overlaps[index, best] >= iou and not matched[best]:
                    matched[best] = True
                    hit = True
            records.append((float(scores[index]), hit))
    if total == 0:
        return float("nan")
    records.sort(key=lambda r: -r[0])
    hits = np.array([r[1] for r in records], dtype=np.float64)
    tp = np.cumsum(hits)
    fp = np.cumsum(1.0 - hits)
    recall = tp / total
    precision = tp / np.maximum(tp + fp, 1e-9)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[1.0], precision, [0.0]])
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    steps = np.nonzero(recall[1:] != recall[:-1])[0]
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def _mask_box(mask: np.ndarray, margin: int = 0) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array(
        [
            max(xs.min() - margin, 0),
            max(ys.min() - margin, 0),
            min(xs.max() + 1 + margin, 1024),
            min(ys.max() + 1 + margin, 1024),
        ],
        dtype=np.float32,
    )


def _input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def evaluate(
    url: str, *, count: int, seed: int = HELD_OUT_SEED, batch: int = 4, box_count: int | None = None
) -> dict[str, Any]:
    """Every metric of every model on ``count`` held-out phantoms (``box_count`` of them for the slow box model)."""
    client = triton_grpc.InferenceServerClient(url)
    samples = [model_space(generate(np.random.default_rng(seed + i))) for i in range(count)]
    started = time.perf_counter()

    probabilities: list[np.ndarray] = []
    detections: list[tuple[np.ndarray, np.ndarray]] = []
    text_dice: dict[str, list[float]] = {name: [] for name in [*TEXT_PROMPTS, "lesion"]}
    prompts = [*TEXT_PROMPTS, "lesion"]
    for start in range(0, count, batch):
        chunk = samples[start : start + batch]
        images = np.stack([s["image"] for s in chunk])
        image_input = _input("image", images, "UINT8")
        result = client.infer("classifier", [image_input])
        probabilities.extend(result.as_numpy("probabilities"))
        result = client.infer("detector", [image_input])
        counts = result.as_numpy("count").reshape(-1)
        for i, n in enumerate(counts):
            detections.append((result.as_numpy("boxes")[i][:n], result.as_numpy("scores")[i][:n]))
        prompt_array = np.array([[p.encode() for p in prompts]] * len(chunk), dtype=np.object_)
        result = client.infer("segmenter_text", [image_input, _input("prompts", prompt_array, "BYTES")])
        masks = result.as_numpy("masks")
        for i, sample in enumerate(chunk):
            lungs = sample["left_lung"] | sample["right_lung"]
            for j, prompt in enumerate(prompts):
                key = TEXT_PROMPTS.get(prompt, "lesion")
                truth = lungs if key == "lungs" else sample[key]
                if key == "lesion" and not truth.any():
                    continue
                text_dice[prompt].append(dice(masks[i][j], truth))

    box_dice: dict[str, list[float]] = {"anatomy": [], "lesion": []}
    for sample in samples[: box_count if box_count is not None else count]:
        targets = [sample["left_lung"], sample["right_lung"], sample["heart"], *sample["lesions"]]
        kinds = ["anatomy"] * 3 + ["lesion"] * len(sample["lesions"])
        boxes = np.stack([_mask_box(t) for t in targets])[None]
        result = client.infer(
            "segmenter_box", [_input("image", sample["image"][None], "UINT8"), _input("boxes", boxes, "FP32")]
        )
        for mask, truth, kind in zip(result.as_numpy("masks")[0], targets, kinds, strict=True):
            box_dice[kind].append(dice(mask, truth))
    client.close()

    labels = np.array([s["label"] == "lesion" for s in samples])
    probs = np.stack(probabilities)
    metrics: dict[str, Any] = {
        "count": count,
        "box_count": box_count if box_count is not None else count,
        "seconds": round(time.perf_counter() - started, 1),
        "classifier.accuracy": float(np.mean((probs[:, 1] >= 0.5) == labels)),
        "classifier.auc": auroc(probs[:, 1], labels),
        "detector.ap50": average_precision(detections, [s["boxes"] for s in samples]),
    }
    for prompt, values in text_dice.items():
        metrics[f"segmenter_text.dice.{prompt}"] = float(np.mean(values)) if values else float("nan")
    for kind, values in box_dice.items():
        metrics[f"segmenter_box.dice.{kind}"] = float(np.mean(values)) if values else float("nan")
    return metrics


def table(metrics: dict[str, Any]) -> str:
    lines = ["| metric | value | target |", "|---|---|---|"]
    for key, value in metrics.items():
        if isinstance(value, float):
            target = TARGETS.get(key)
            mark = "" if target is None else (" ✓" if value >= target else " ✗")
            lines.append(f"| {key} | {value:.4f}{mark} | {'' if target is None else f'≥ {target}'} |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _triton(url: str | None, *, repository: Path | None = None) -> Iterator[str]:
    """``url`` when given, else the embedded Triton on free ports (on ``repository`` instead of the settings' one)."""
    if url:
        yield url
        return
    from services.settings import load_settings
    from services.triton.embedded import EmbeddedTriton

    settings = load_settings()
    triton = dataclasses.replace(
        settings.triton, url="", http_port=_free_port(), grpc_port=_free_port(), metrics_port=_free_port()
    )
    if repository is not None:
        triton = dataclasses.replace(triton, model_repository=repository)
    with EmbeddedTriton(triton):
        yield triton.grpc_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", help="Triton gRPC host:port (default: start the embedded one)")
    parser.add_argument("--count", type=int, default=200, help="held-out phantoms")
    parser.add_argument("--box-count", type=int, default=60, help="of which this many go to the (slow) box model")
    parser.add_argument("--out", type=Path, default=Path("bench/results/models.json"))
    args = parser.parse_args(argv)
    with _triton(args.url) as url:
        metrics = evaluate(url, count=args.count, box_count=args.box_count)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"metrics": metrics, "targets": TARGETS}, indent=2) + "\n")
    print(table(metrics))
    print(f"\nwritten to {args.out}")
    failed = [k for k, t in TARGETS.items() if not metrics.get(k, 0) >= t]
    if failed:
        print("below target: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
