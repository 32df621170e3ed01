"""Do the reference models' scores mean what they say? A calibration report through a running Triton.

    python -m training.calibration [--count 200] [--box-count 24] [--out bench/results/calibration.json]

On ``make eval-models``'s held-out phantoms (``training.evaluate.HELD_OUT_SEED``), through tritonclient gRPC as
the gateway calls Triton, so what is measured is what every client sees (calibration applied in model.py):

  classifier      top-class probability vs the class being right
  detector        each box's score vs being a true positive at IoU 0.5 (the matching AP50 counts)
  segmenter_text  each prompt's score vs Dice >= 0.5 (an empty mask is right when there is nothing to find),
                  and Spearman's rank correlation of score with Dice
  segmenter_box   LiteMedSAM's predicted IoU vs the real IoU, on box prompts drawn around the true masks with
                  10% jitter (a person's box, not a perfect one)

For each: ECE with 10 equal-width bins, AUROC of the score for right vs wrong, and a reliability diagram
(``bench/results/calibration-<score>.png``). Then, for each flow of config/flows.toml: the share of held-out cases
it sends to review and the share of wrong answers among them it catches, at its threshold and over a sweep.
Cost with the defaults: 200 images through three small models and 24 through LiteMedSAM, a few minutes on two
busy cores (plus the embedded Triton's start).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import numpy as np

from training import metrics as M

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "triton_models"
SEG_SCORES = ("left_lung", "right_lung", "heart", "lesion", "lungs")
SEG_PROMPTS = {
    "left lung": "left_lung",
    "right lung": "right_lung",
    "heart": "heart",
    "lesion": "lesion",
    "lungs": "lungs",
}
BOX_JITTER = 0.10
BOX_SEED = 5_000_011
SWEEP = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
ECE_BAR = 0.05

_serving: ModuleType | None = None


def serving_calibration() -> ModuleType:
    """triton_models/medgate_calibration.py, the code model.py applies, imported without writing bytecode there.

    A ``__pycache__`` folder at the repository root is a model Triton fails to load, so this never writes one.
    """
    global _serving
    if _serving is None:
        previous = sys.dont_write_bytecode
        sys.dont_write_bytecode = True
        try:
            spec = importlib.util.spec_from_file_location("medgate_calibration", MODELS_DIR / "medgate_calibration.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        finally:
            sys.dont_write_bytecode = previous
        _serving = module
    return _serving


# ---------------------------------------------------------------------------------------------
# Outcomes: what each score should predict, from one answer and the truth (pure).


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 when both are empty (an empty answer where there is nothing to find is right)."""
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    union = int(np.logical_or(a, b).sum())
    return 1.0 if union == 0 else int(np.logical_and(a, b).sum()) / union


def segmenter_outcomes(
    masks4: np.ndarray, scores4: np.ndarray, areas4: np.ndarray, peaks4: np.ndarray, truth4: np.ndarray
) -> dict[str, tuple[float, float, float, float]]:
    """The text segmenter's raw graph outputs for one image -> {score name: (raw score, area, peak, Dice)}.

    Channels 0..3 are left lung, right lung, heart, lesion; ``lungs`` is the union prompt, whose raw score
    model.py forms as the area-weighted mean of the two lung channels' scores (and whose peak is the larger).
    """
    out = {}
    for c, name in enumerate(SEG_SCORES[:4]):
        raw = float(scores4[c]) if areas4[c] > 0 else 0.0
        out[name] = (raw, float(areas4[c]), float(peaks4[c]), dice(masks4[c], truth4[c]))
    area = float(areas4[0] + areas4[1])
    score = float(scores4[0] * areas4[0] + scores4[1] * areas4[1]) / area if area > 0 else 0.0
    peak = float(max(peaks4[0], peaks4[1]))
    out["lungs"] = (score, area, peak, dice(masks4[0] | masks4[1], truth4[0] | truth4[1]))
    return out


def detector_outcomes(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, int]:
    """(true-positive flag per box at IoU 0.5, number of true boxes no box matched)."""
    hits = M.match_detections(boxes, scores, truth)
    return hits, int(len(truth) - hits.sum())


def detection_wrong(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> bool:
    """The image's answer at the operating point (boxes scoring >= ``threshold``) has a false or a missed lesion."""
    shown = scores >= threshold
    hits, missed = detector_outcomes(boxes[shown], scores[shown], truth)
    return bool(missed > 0 or not hits.all())


def box_prompts(targets: list[np.ndarray], rng: np.random.Generator, jitter: float = BOX_JITTER) -> np.ndarray:
    """A box around each mask, each side moved by a normal draw of ``jitter`` times the box's side: [N,4] fp32."""
    out = []
    for mask in targets:
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        w, h = x1 - x0, y1 - y0
        d = rng.normal(0.0, jitter, 4) * np.array([w, h, w, h])
        box = np.array([x0 + d[0], y0 + d[1], x1 + d[2], y1 + d[3]])
        box[2] = max(box[2], box[0] + 2)
        box[3] = max(box[3], box[1] + 2)
        out.append(np.clip(box, 0, 1024))
    return np.array(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Collection through Triton.


def collect(url: str, *, count: int, box_count: int, batch: int = 4) -> dict[str, Any]:
    """Every score with its outcome on ``count`` held-out phantoms (``box_count`` of them for LiteMedSAM)."""
    import tritonclient.grpc as triton_grpc

    from training.evaluate import HELD_OUT_SEED, _input
    from training.phantoms import generate, model_space

    client = triton_grpc.InferenceServerClient(url)
    samples = [model_space(generate(np.random.default_rng(HELD_OUT_SEED + i))) for i in range(count)]
    out: dict[str, Any] = {
        "p_lesion": [], "label": [], "hash": [],
        "box_scores": [], "box_hits": [], "det_max": [], "det_wrong": [],
        "seg": {name: {"score": [], "dice": []} for name in SEG_PROMPTS},
        "box_iou_pred": [], "box_iou_real": [],
    }  # fmt: skip
    prompts = list(SEG_PROMPTS)
    for start in range(0, count, batch):
        chunk = samples[start : start + batch]
        images = np.stack([s["image"] for s in chunk])
        image = _input("image", images, "UINT8")
        probs = client.infer("classifier", [image]).as_numpy("probabilities")
        result = client.infer("detector", [image])
        counts = result.as_numpy("count").reshape(-1)
        prompt_array = np.array([[p.encode() for p in prompts]] * len(chunk), dtype=np.object_)
        seg = client.infer("segmenter_text", [image, _input("prompts", prompt_array, "BYTES")])
        for i, sample in enumerate(chunk):
            out["p_lesion"].append(float(probs[i, 1]))
            out["label"].append(sample["label"] == "lesion")
            out["hash"].append(hashlib.sha256(sample["image"].tobytes()).hexdigest())
            boxes = result.as_numpy("boxes")[i][: counts[i]]
            scores = result.as_numpy("scores")[i][: counts[i]]
            truth = np.asarray(sample["boxes"], dtype=np.float64).reshape(-1, 4)
            hits, _ = detector_outcomes(boxes, scores, truth)
            out["box_scores"].extend(float(s) for s in scores)
            out["box_hits"].extend(bool(h) for h in hits)
            out["det_max"].append(float(scores.max()) if len(scores) else 0.0)
            out["det_wrong"].append(detection_wrong(boxes, scores, truth))
            lungs = sample["left_lung"] | sample["right_lung"]
            for j, prompt in enumerate(prompts):
                key = SEG_PROMPTS[prompt]
                target = lungs if key == "lungs" else sample[key]
                out["seg"][prompt]["score"].append(float(seg.as_numpy("scores")[i, j]))
                out["seg"][prompt]["dice"].append(dice(seg.as_numpy("masks")[i, j], target))
    rng = np.random.default_rng(BOX_SEED)
    for sample in samples[:box_count]:
        targets = [sample["left_lung"], sample["right_lung"], sample["heart"], *sample["lesions"]]
        boxes = box_prompts(targets, rng)
        result = client.infer(
            "segmenter_box", [_input("image", sample["image"][None], "UINT8"), _input("boxes", boxes[None], "FP32")]
        )
        for mask, target, score in zip(result.as_numpy("masks")[0], targets, result.as_numpy("scores")[0], strict=True):
            out["box_iou_pred"].append(float(score))
            out["box_iou_real"].append(mask_iou(mask, target))
    client.close()
    return out


# ---------------------------------------------------------------------------------------------
# Report (pure, from what collect() gathered).


def score_entry(scores: np.ndarray, outcomes: np.ndarray, *, right: np.ndarray | None = None) -> dict[str, Any]:
    """ECE, AUROC (right vs wrong), the reliability bins and the counts of one score."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(outcomes, dtype=np.float64)
    ok = (y >= 0.5) if right is None else np.asarray(right, dtype=bool)
    return {
        "n": len(s),
        "wrong": int((~ok).sum()),
        "mean_score": round(float(s.mean()), 4) if len(s) else float("nan"),
        "mean_outcome": round(float(y.mean()), 4) if len(y) else float("nan"),
        "ece": round(M.ece(s, y), 4),
        "auroc": round(M.auroc(s, ok), 4),
        "bins": [
            {"low": b.low, "high": b.high, "count": b.count, "mean_score": b.mean_score, "mean_outcome": b.mean_outcome}
            for b in M.reliability_bins(s, y)
        ],
    }


def flow_routing(flow: Any, summaries: list[Any], wrong: np.ndarray, score_ref: str) -> dict[str, Any]:
    """The flow as configured (every condition, sampling included) and a sweep of its ConfidenceLessThan."""
    from services.review.flows import evaluate, parse_conditions

    sent = np.array([flow.activation(s).matched for s in summaries])
    w = np.asarray(wrong, dtype=bool)
    scores = np.array([s.score(score_ref) for s in summaries], dtype=np.float64)
    sweep = []
    for t in SWEEP:
        condition = parse_conditions(
            {
                "ConditionType": "ConfidenceLessThan",
                "ConditionParameters": {"Score": score_ref, "ConfidenceLessThan": t},
            }
        )
        hit = np.array([evaluate(condition, s).matched for s in summaries])
        sweep.append(
            {
                "threshold": t,
                "sent": round(float(hit.mean()), 4),
                "caught": round(float(hit[w].mean()), 4) if w.any() else None,
            }
        )
    return {
        "score": score_ref,
        "cases": len(summaries),
        "wrong": int(w.sum()),
        "sent": round(float(sent.mean()), 4),
        "caught": round(float(sent[w].mean()), 4) if w.any() else None,
        "mean_score": round(float(np.nanmean(scores)), 4),
        "sweep": sweep,
    }


def build_report(data: dict[str, Any], flows_file: Path) -> dict[str, Any]:
    from services.review.flows import TaskType, load_flows, summarize

    p = np.array(data["p_lesion"])
    label = np.array(data["label"], dtype=bool)
    top = np.maximum(p, 1 - p)
    correct = (p >= 0.5) == label
    scores: dict[str, Any] = {"classifier.top_class": score_entry(top, correct.astype(float))}
    scores["detector.box"] = score_entry(np.array(data["box_scores"]), np.array(data["box_hits"], dtype=float))
    for prompt, values in data["seg"].items():
        s, d = np.array(values["score"]), np.array(values["dice"])
        entry = score_entry(s, (d >= 0.5).astype(float))
        entry["spearman_dice"] = round(M.spearman(s, d), 4)
        entry["mean_dice"] = round(float(d.mean()), 4)
        scores[f"segmenter_text.{prompt}"] = entry
    les_s, les_d = np.array(data["seg"]["lesion"]["score"]), np.array(data["seg"]["lesion"]["dice"])
    present = label  # a held-out phantom has a lesion exactly when it is labelled "lesion"
    entry = score_entry(les_s[present], (les_d[present] >= 0.5).astype(float))
    entry["spearman_dice"] = round(M.spearman(les_s[present], les_d[present]), 4)
    scores["segmenter_text.lesion (images with a lesion)"] = entry
    pred, real = np.array(data["box_iou_pred"]), np.array(data["box_iou_real"])
    entry = score_entry(pred, real, right=real >= 0.5)
    entry["spearman_iou"] = round(M.spearman(pred, real), 4)
    scores["segmenter_box.iou"] = entry

    routing: dict[str, Any] = {}
    hashes = data["hash"]
    for name, flow in load_flows(flows_file).items():
        if flow.task_type is TaskType.CLASSIFICATION:
            summaries = [summarize(h, class_scores=[1 - x, x]) for h, x in zip(hashes, p, strict=True)]
            routing[name] = flow_routing(flow, summaries, ~correct, "top_class")
        elif flow.task_type is TaskType.DETECTION:
            summaries = [
                summarize(h, box_scores=[m] if m > 0 else []) for h, m in zip(hashes, data["det_max"], strict=True)
            ]
            routing[name] = flow_routing(flow, summaries, np.array(data["det_wrong"]), "max_box")
        elif flow.task_type is TaskType.SEGMENTATION:
            prompts = [c for c in flow.categories if c in data["seg"]]
            summaries = [
                summarize(h, prompt_scores={c: data["seg"][c]["score"][i] for c in prompts})
                for i, h in enumerate(hashes)
            ]
            wrong = np.array([any(data["seg"][c]["dice"][i] < 0.5 for c in prompts) for i in range(len(hashes))])
            routing[name] = flow_routing(flow, summaries, wrong, "min_prompt") | {"prompts": prompts}
    return {"scores": scores, "routing": routing}


def reliability_png(path: Path, title: str, entry: dict[str, Any]) -> None:
    """A reliability diagram drawn with OpenCV (matplotlib is not in the environment): bars of the mean outcome
    per score bin against the diagonal, bin counts under the bars, ECE and AUROC in the title."""
    size, pad = 420, 50
    img = np.full((size + 2 * pad, size + 2 * pad, 3), 255, np.uint8)
    x0, y0 = pad, pad + size  # origin, bottom left

    def pt(x: float, y: float) -> tuple[int, int]:
        return round(x0 + x * size), round(y0 - y * size)

    for b in entry["bins"]:
        if not b["count"]:
            continue
        cv2.rectangle(img, pt(b["low"] + 0.005, b["mean_outcome"]), pt(b["high"] - 0.005, 0), (200, 140, 60), -1)
        cv2.rectangle(
            img, pt(b["low"] + 0.005, b["mean_score"]), pt(b["high"] - 0.005, b["mean_outcome"]), (80, 80, 230), 1
        )
        cv2.putText(
            img, str(b["count"]), (pt(b["low"], 0)[0] + 4, y0 + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1
        )
    cv2.line(img, pt(0, 0), pt(1, 1), (120, 120, 120), 1, cv2.LINE_AA)
    cv2.rectangle(img, pt(0, 1), pt(1, 0), (0, 0, 0), 1)
    for t in (0.0, 0.5, 1.0):
        cv2.putText(img, f"{t:g}", (pt(t, 0)[0] - 6, y0 + 34), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
        cv2.putText(img, f"{t:g}", (x0 - 28, pt(0, t)[1] + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    cv2.putText(img, title, (x0, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    caption = f"ECE {entry['ece']:.3f}  AUROC {entry['auroc']:.3f}  n {entry['n']}  wrong {entry['wrong']}"
    cv2.putText(img, caption, (x0, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    legend = "x: score bin (count); blue: observed; red: mean score"
    cv2.putText(img, legend, (x0, y0 + 48), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    if not cv2.imwrite(str(path), img):
        raise OSError(f"could not write {path}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def main(argv: list[str] | None = None) -> int:
    from training.evaluate import _triton

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="Triton gRPC host:port (default: start the embedded one)")
    parser.add_argument("--count", type=int, default=200, help="held-out phantoms for the three small models")
    parser.add_argument("--box-count", type=int, default=24, help="of which this many go to LiteMedSAM (slow)")
    parser.add_argument("--flows", type=Path, default=REPO / "config" / "flows.toml")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "calibration.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with _triton(args.url) as url:
        data = collect(url, count=args.count, box_count=args.box_count)
    report = {
        "count": args.count,
        "box_count": args.box_count,
        "seconds": round(time.perf_counter() - started, 1),
        "ece_bar": ECE_BAR,
    } | build_report(data, args.flows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print("| score | n | wrong | ECE | AUROC |\n|---|---|---|---|---|")
    for name, entry in report["scores"].items():
        reliability_png(args.out.parent / f"calibration-{_slug(name)}.png", name, entry)
        mark = "" if entry["ece"] <= ECE_BAR else " (over the bar)"
        print(f"| {name} | {entry['n']} | {entry['wrong']} | {entry['ece']:.4f}{mark} | {entry['auroc']:.4f} |")
    print("\n| flow | score | sent to review | wrong caught |\n|---|---|---|---|")
    for name, flow in report["routing"].items():
        print(f"| {name} | {flow['score']} | {flow['sent']:.3f} | {flow['caught']} (of {flow['wrong']}) |")
    print(f"\nwritten to {args.out} and its reliability diagrams ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
