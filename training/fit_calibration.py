"""Fit the score calibration of the reference models on the calibration seed split; write each calibration.json.

    python -m training.fit_calibration [--count 800] [--box-count 80]

The phantoms are ``training.common.load_split("calib")`` (seed ``CALIB_SEED``): never the training seed, never
the held-out one that ``make eval-models`` and ``make eval-calibration`` score. Classifier, detector and text
segmenter run through onnxruntime on the committed graphs (the bytes Triton serves), with the detector's
model.py post-processing (min_score, NMS) repeated; LiteMedSAM runs through the embedded Triton with its
calibration file left out, because its zoomed-window logic lives in model.py, on phantoms of the calibration seed
range rendered as ``make eval-models`` renders its held-out ones (fitted on the cached split, with its mixed
windows and one box around all lesions, its held-out ECE was 0.073: LiteMedSAM's IoU depends on both).
Deterministic: same graphs and same phantoms give the same files (no randomness but the seeded box jitter).

What is fitted, and why:
  classifier      temperature on the lesion logit (keeps every decision: the 0.5 point is unchanged)
  detector        Platt (strictly increasing: box order, NMS and AP50 unchanged) of "score" vs being a TP at IoU 0.5
  segmenter_text  a logistic score head per channel over mask_features (empty, logit of the mean probability,
                  log area) vs Dice >= 0.5 (an empty mask is right when there is nothing to find); channels with no
                  wrong answer on the split keep their raw score (nothing to fit against)
  segmenter_box   Platt of the predicted IoU with the real IoU as a soft label (increasing: the order is kept)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from training import common
from training import metrics as M
from training.calibration import (
    SEG_SCORES,
    box_prompts,
    detector_outcomes,
    mask_iou,
    segmenter_outcomes,
    serving_calibration,
)

MIN_SCORE = 0.05  # triton_models/detector/config.pbtxt: min_score
NMS_IOU = 0.5  # and nms_iou_threshold
BOX_SEED = 4_000_037


def _write(folder: Path, scores: dict[str, Any], summary: dict[str, Any], count: int) -> None:
    cal = serving_calibration()
    path = folder / cal.FILE
    data = {
        "version": 1,
        "fitted_on": f"{count} phantoms of the calibration split (seed {common.CALIB_SEED})",
        "scores": scores,
        "fit": summary,
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path.relative_to(common.REPO)}", flush=True)


def _summary(raw: np.ndarray, calibrated: np.ndarray, outcome: np.ndarray) -> dict[str, float]:
    right = outcome >= 0.5
    return {
        "n": len(raw),
        "wrong": int((~right).sum()),
        "ece_raw": round(M.ece(raw, outcome), 4),
        "ece_calibrated": round(M.ece(calibrated, outcome), 4),
        "auroc_raw": round(M.auroc(raw, right), 4),
        "auroc_calibrated": round(M.auroc(calibrated, right), 4),
    }


def fit_classifier(
    data: dict[str, np.ndarray],
    onnx: Path = common.MODELS_DIR / "classifier" / "1" / "model.onnx",
    folder: Path | None = None,
) -> dict[str, Any]:
    """Fit the classifier at ``onnx`` (default: the shipped one); write calibration.json into ``folder`` (default:
    beside the graph; ``medgate train`` passes a new version's). The fit summary."""
    (probs,) = common.ort_run(common.ort_session(onnx), data["img1024"])
    p_lesion = probs[:, 1].astype(np.float64)
    labels = data["label"].astype(np.float64)
    t = M.fit_temperature(p_lesion, labels)
    spec = {"method": "platt", "a": 1.0 / t, "b": 0.0}
    calibrated = serving_calibration().apply_map(spec, p_lesion)
    correct = ((p_lesion >= 0.5) == (labels > 0)).astype(np.float64)
    top_raw = np.maximum(p_lesion, 1 - p_lesion)
    top_cal = np.maximum(calibrated, 1 - calibrated)
    summary = {"temperature": round(t, 4), "top_class": _summary(top_raw, top_cal, correct)}
    print(f"classifier: {summary}", flush=True)
    _write(folder or onnx.parent, {"lesion_probability": spec}, summary, len(labels))
    return summary


def fit_detector(
    data: dict[str, np.ndarray],
    onnx: Path = common.MODELS_DIR / "detector" / "1" / "model.onnx",
    folder: Path | None = None,
) -> dict[str, Any]:
    """Fit the detector at ``onnx``; write calibration.json into ``folder`` (default: beside the graph). The summary."""
    boxes, scores = common.ort_run(common.ort_session(onnx), data["img1024"])
    all_scores, all_hits = [], []
    for i in range(len(boxes)):
        ok = scores[i] >= MIN_SCORE
        b, s = boxes[i][ok], scores[i][ok]
        keep = common.nms(b, s, NMS_IOU)[:32]
        truth = data["boxes"][i, : data["count"][i]]
        hits, _ = detector_outcomes(b[keep], s[keep], truth)
        all_scores.append(s[keep])
        all_hits.append(hits)
    raw = np.concatenate(all_scores).astype(np.float64)
    tp = np.concatenate(all_hits).astype(np.float64)
    a, b = M.fit_platt(raw, tp)
    if a <= 0:
        raise RuntimeError(f"detector: Platt slope {a} is not positive; the scores do not rank true positives")
    spec = {"method": "platt", "a": a, "b": b}
    summary = {
        "platt": [round(a, 4), round(b, 4)],
        "box": _summary(raw, serving_calibration().apply_map(spec, raw), tp),
    }
    print(f"detector: {summary}", flush=True)
    _write(folder or onnx.parent, {"scores": spec}, summary, len(boxes))
    return summary


def fit_segmenter_text(
    data: dict[str, np.ndarray],
    onnx: Path = common.MODELS_DIR / "segmenter_text" / "1" / "model.onnx",
    folder: Path | None = None,
) -> dict[str, Any]:
    """Fit the text segmenter at ``onnx``; write calibration.json into ``folder`` (default: beside the graph)."""
    cal = serving_calibration()
    session = common.ort_session(onnx)
    columns: dict[str, list[tuple[float, float, float, float]]] = {k: [] for k in SEG_SCORES}
    for i in range(0, len(data["img1024"]), 4):
        masks, scores, area, peaks = session.run(
            ["masks", "scores", "areas", "peaks"], {"image": data["img1024"][i : i + 4, None]}
        )
        truth = common.unpack_masks(data["masks"][i : i + 4])
        for j in range(len(masks)):
            for name, row in segmenter_outcomes(masks[j], scores[j], area[j], peaks[j], truth[j]).items():
                columns[name].append(row)
    maps: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for name in SEG_SCORES:
        r, a, pk, dc = (np.array(column) for column in zip(*columns[name], strict=True))
        right = (dc >= 0.5).astype(np.float64)
        features = cal.mask_features(r, a, pk)
        if right[features["empty"] == 0].min(initial=1.0) == 1.0:
            summary[name] = {"kept_raw": "no wrong answer on the split to fit against"} | _summary(r, r, right)
            continue
        spec = _mask_head(features, right)
        calibrated = cal.apply_map(spec, r, features)
        summary[name] = _summary(r, calibrated, right) | {"spearman_raw": round(M.spearman(r, dc), 4)}
        summary[name]["spearman_calibrated"] = round(M.spearman(calibrated, dc), 4)
        maps[name] = spec
    print(f"segmenter_text: {json.dumps(summary)}", flush=True)
    _write(folder or onnx.parent, maps, summary, len(data["img1024"]))
    return summary


def _mask_head(features: dict[str, np.ndarray], right: np.ndarray) -> dict[str, Any]:
    """One logistic map in two parts that never mix (each feature is 0 on the other part's masks):

    non-empty masks: a logistic head over (logit of the mean probability, log area);
    empty masks: a logistic head over the logit of the channel's peak probability, or, when the split holds no
    wrong empty mask, the share of right ones with one imagined wrong one (a clean split never says 1.0), folded
    into the ``empty`` weight: for an empty mask z = bias + w_empty + w_peak * empty_peak.
    """
    filled = features["empty"] == 0
    names = ["logit_score", "log_area"]
    x = np.stack([features[k][filled] for k in names], axis=1)
    mean, std = x.mean(axis=0), np.maximum(x.std(axis=0), 1e-9)
    w = M.fit_logistic((x - mean) / std, right[filled], l2=1e-3)
    weights = [float(v) for v in w[:-1] / std]  # fitted on standardised features, folded back into plain weights
    bias = float(w[-1] - (w[:-1] * mean / std).sum())
    empty = ~filled
    w_peak = 0.0
    if empty.any() and 0 < right[empty].sum() < empty.sum():
        peak = features["empty_peak"][empty][:, None]
        p_mean, p_std = float(peak.mean()), max(float(peak.std()), 1e-9)
        we = M.fit_logistic((peak - p_mean) / p_std, right[empty], l2=1e-3)
        w_peak = float(we[0] / p_std)
        z_empty = float(we[1] - we[0] * p_mean / p_std)
    else:
        p_empty = float(right[empty].sum()) / (float(empty.sum()) + 1.0) if empty.any() else 0.5
        p_empty = min(max(p_empty, 1e-4), 1 - 1e-4)
        z_empty = float(np.log(p_empty / (1 - p_empty)))
    return {
        "method": "logistic",
        "features": ["empty", *names, "empty_peak"],
        "weights": [z_empty - bias, *weights, w_peak],
        "bias": bias,
    }


def fit_segmenter_box(count: int) -> None:
    """Through the embedded Triton on a repository holding only segmenter_box, its calibration file left out."""
    import tritonclient.grpc as triton_grpc

    from training.evaluate import _input, _triton
    from training.phantoms import generate, model_space

    source = common.MODELS_DIR / "segmenter_box"
    with tempfile.TemporaryDirectory(prefix="medgate-fit-") as tmp:
        repo = Path(tmp) / "models"
        (repo / "segmenter_box" / "1").mkdir(parents=True)
        shutil.copy(common.MODELS_DIR / "medgate_model_base.py", repo)
        shutil.copy(common.MODELS_DIR / "medgate_calibration.py", repo)
        shutil.copy(source / "config.pbtxt", repo / "segmenter_box")
        for item in (source / "1").iterdir():
            if item.suffix in (".onnx", ".py"):
                (repo / "segmenter_box" / "1" / item.name).symlink_to(item)
        predicted, real = [], []
        rng = np.random.default_rng(BOX_SEED)
        with _triton(None, repository=repo) as url:
            client = triton_grpc.InferenceServerClient(url)
            for i in range(count):
                # Rendered as make eval-models renders its held-out phantoms (one window, each lesion its own box),
                # from the calibration seed range: the masks LiteMedSAM is scored on there.
                sample = model_space(generate(np.random.default_rng(common.CALIB_SEED + i)))
                targets = [sample["left_lung"], sample["right_lung"], sample["heart"], *sample["lesions"]]
                boxes = box_prompts(targets, rng)
                result = client.infer(
                    "segmenter_box",
                    [_input("image", sample["image"][None], "UINT8"), _input("boxes", boxes[None], "FP32")],
                )
                for mask, target, score in zip(
                    result.as_numpy("masks")[0], targets, result.as_numpy("scores")[0], strict=True
                ):
                    predicted.append(float(score))
                    real.append(mask_iou(mask, target))
            client.close()
    p, r = np.array(predicted), np.array(real)
    np.savez(common.CACHE_DIR / f"segmenter_box_pairs_{count}.npz", predicted=p, real=r)  # refits without Triton
    # Platt with the real IoU as a soft label: two parameters generalise from ~100 masks where an isotonic
    # step function did not (held-out ECE 0.073 against 0.0 in-sample, on 30 phantoms).
    a, b = M.fit_platt(p, r)
    spec = {"method": "platt", "a": a, "b": b}
    calibrated = serving_calibration().apply_map(spec, p)
    summary = {
        "n_masks": len(p),
        "ece_raw": round(M.ece(p, r), 4),
        "ece_calibrated": round(M.ece(calibrated, r), 4),
        "auroc_raw_iou_0.5": round(M.auroc(p, r >= 0.5), 4),
        "spearman_raw": round(M.spearman(p, r), 4),
    }
    print(f"segmenter_box: {summary}", flush=True)
    _write(source / "1", {"iou_predictions": spec}, summary, count)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=800, help="calibration phantoms for the fast models")
    parser.add_argument("--box-count", type=int, default=80, help="phantoms for LiteMedSAM (slow: ~5 s each here)")
    parser.add_argument(
        "--models", default="classifier,detector,segmenter_text,segmenter_box", help="comma-separated subset"
    )
    args = parser.parse_args(argv)
    common.setup(0)
    wanted = set(args.models.split(","))
    started = time.time()
    data = common.load_split("calib", args.count) if wanted - {"segmenter_box"} else {}
    if "classifier" in wanted:
        fit_classifier(data)
    if "detector" in wanted:
        fit_detector(data)
    if "segmenter_text" in wanted:
        fit_segmenter_text(data)
    if "segmenter_box" in wanted:
        fit_segmenter_box(args.box_count)
    print(f"fitted in {time.time() - started:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
