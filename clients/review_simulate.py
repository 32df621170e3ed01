"""``medgate review simulate``: how many cases a review flow would send to people, and how many wrong answers it
would catch, on a folder of images run through the gateway.

    medgate review simulate --flow segmentation-review --threshold 0.9 FOLDER [--labels labels.json]

Every PNG, JPEG or DICOM file in FOLDER (not recursive) goes through the gateway's task for the flow's type
(Classify; Detect; Segment with the flow's categories as text prompts). The flow's ``ConfidenceLessThan`` score
(``top_class``, ``max_box``, ``min_prompt``...) is compared with ``--threshold`` (default: the flow's own
conditions, ``Sampling`` included, decided on the input's hash as the gateway does). It prints the share sent
to review and, with ``--labels``, the share of wrong answers among those sent.

The labels file (JSON; ``python -m training.phantom_folder`` writes one with its phantoms)::

    {"images": {"<file name in FOLDER>": {
        "label": "normal" | "lesion",                  classification: the true class
        "boxes": [[x0, y0, x1, y1], ...],              detection: every true lesion, ORIGINAL pixels, x1/y1 exclusive
        "masks": {"<prompt>": "<PNG path>", ...}       segmentation: the true mask per prompt (non-zero = inside),
    }}}                                                ORIGINAL grid, paths relative to the labels file

A wrong answer: classification, the top class is not the label; detection, the boxes scoring >= 0.5 hold a false
box or miss a true one at IoU 0.5; segmentation, some prompt's mask has Dice < 0.5 with its truth (an empty mask is
right when the truth is empty). Images without labels count towards the sent share only.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.imaging.boxes import box_iou
from services.review.flows import (
    AllOf,
    AnyOf,
    Condition,
    Confidence,
    FlowDefinition,
    TaskType,
    evaluate,
    summarize,
)

SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
OPERATING_POINT = 0.5  # a detection counts as an answer at this calibrated score


@dataclass(frozen=True)
class Outcome:
    sent: bool
    wrong: bool | None  # None: no label for this image


def confidence_of(condition: Condition | None) -> Confidence | None:
    """The first ConfidenceLessThan in a flow's condition tree (what ``--threshold`` replaces)."""
    if isinstance(condition, Confidence) and condition.below:
        return condition
    if isinstance(condition, AllOf | AnyOf):
        for member in condition.conditions:
            found = confidence_of(member)
            if found is not None:
                return found
    return None


def images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)


def load_labels(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("images"), dict):
        raise ValueError(f"{path}: expected {{'images': {{file name: {{...}}}}}}")
    return dict(data["images"])


def detection_wrong(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> bool:
    """A false box or a missed lesion among the boxes scoring >= the operating point (greedy, IoU 0.5)."""
    shown = boxes[scores >= OPERATING_POINT].reshape(-1, 4)
    order = np.argsort(-scores[scores >= OPERATING_POINT], kind="stable")
    truth = truth.reshape(-1, 4)
    if len(shown) == 0 or len(truth) == 0:
        return len(shown) != len(truth)
    overlaps = box_iou(shown, truth)
    used = np.zeros(len(truth), dtype=bool)
    for index in order:
        best = int(np.argmax(overlaps[index]))
        if overlaps[index, best] < 0.5 or used[best]:
            return True
        used[best] = True
    return not used.all()


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _truth_mask(base: Path, relative: str) -> np.ndarray:
    mask = cv2.imread(str(base / relative), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ValueError(f"cannot read the mask {relative!r}")
    return np.asarray(mask) > 0


def run_one(
    stub: pb_grpc.InferenceStub, flow: FlowDefinition, path: Path, label: dict[str, Any] | None, labels_dir: Path
) -> tuple[dict[str, Any], bool | None, pb.ImageInput]:
    """One image through the gateway: (the scores the flow's conditions see, whether the answer is wrong, input)."""
    from clients.infer import array_of

    image = pb.ImageInput(data=path.read_bytes())
    wrong: bool | None = None
    if flow.task_type is TaskType.CLASSIFICATION:
        answer = stub.Classify(pb.ClassifyRequest(image=image))
        scores: dict[str, Any] = {"class_scores": [s.score for s in answer.scores]}
        if label is not None:
            wrong = answer.top_label != label["label"]
    elif flow.task_type is TaskType.DETECTION:
        found = stub.Detect(pb.DetectRequest(image=image))
        scores = {"box_scores": [d.score for d in found.detections]}
        if label is not None:
            boxes = np.array([[d.box.x0, d.box.y0, d.box.x1, d.box.y1] for d in found.detections], np.float64)
            values = np.array([d.score for d in found.detections], np.float64)
            wrong = detection_wrong(boxes.reshape(-1, 4), values, np.array(label.get("boxes", []), np.float64))
    else:
        prompts = list(flow.categories)
        options = pb.OutputOptions(mask_space=pb.MASK_SPACE_ORIGINAL)
        segmented = stub.Segment(pb.SegmentRequest(image=image, prompts=" & ".join(prompts), output=options))
        scores = {"prompt_scores": {p.prompt: p.score for p in segmented.prompts}}
        if label is not None:
            masks = array_of(segmented.original_masks)
            truths = label.get("masks", {})
            wrong = any(
                dice(masks[k], _truth_mask(labels_dir, truths[p])) < 0.5 for k, p in enumerate(prompts) if p in truths
            )
    return scores, wrong, image


def simulate(
    stub: pb_grpc.InferenceStub,
    flow: FlowDefinition,
    folder: Path,
    *,
    threshold: float | None,
    labels: Path | None,
) -> list[Outcome]:
    from services.gateway.routing import input_hash

    truth = load_labels(labels) if labels is not None else {}
    confidence = confidence_of(flow.activation_conditions)
    if threshold is not None and confidence is None:
        raise ValueError(f"flow {flow.name} has no ConfidenceLessThan condition for --threshold to replace")
    outcomes = []
    for path in images_in(folder):
        label = truth.get(path.name)
        scores, wrong, image = run_one(stub, flow, path, label, labels.parent if labels else folder)
        summary = summarize(input_hash(image), **scores)
        if threshold is not None and confidence is not None:
            replaced = Confidence(confidence.score, threshold)
            sent = evaluate(replaced, summary).matched
        else:
            sent = flow.activation(summary).matched
        outcomes.append(Outcome(sent, wrong))
    return outcomes


def report(flow: FlowDefinition, outcomes: list[Outcome], threshold: float | None) -> str:
    confidence = confidence_of(flow.activation_conditions)
    rule = (
        f"{confidence.score} < {threshold:g}"
        if threshold is not None and confidence is not None
        else "its own conditions (config)"
    )
    n = len(outcomes)
    sent = sum(o.sent for o in outcomes)
    lines = [f"flow {flow.name}: {rule}, {n} images"]
    lines.append(f"sent to review: {sent}/{n} = {sent / n:.3f}" if n else "sent to review: no images")
    labelled = [o for o in outcomes if o.wrong is not None]
    wrong = [o for o in labelled if o.wrong]
    if not labelled:
        lines.append("wrong answers caught: unknown (no --labels)")
    elif not wrong:
        lines.append(f"wrong answers caught: none to catch (0 wrong of {len(labelled)} labelled)")
    else:
        caught = sum(o.sent for o in wrong)
        lines.append(f"wrong answers caught: {caught}/{len(wrong)} = {caught / len(wrong):.3f}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="PNG/JPEG/DICOM images (not recursive)")
    parser.add_argument("--flow", required=True, help="a flow of the review settings' flows file")
    parser.add_argument("--threshold", type=float, help="replace the flow's ConfidenceLessThan threshold")
    parser.add_argument("--labels", type=Path, help="ground truth JSON (see `medgate review simulate --help`)")
    parser.add_argument("--gateway", help="gateway host:port (default: the settings' gateway)")
    parser.add_argument("--flows-file", type=Path, help="flows TOML (default: the settings' review.flows_file)")


def run(args: argparse.Namespace) -> int:
    from clients.infer import channel
    from services.review.flows import load_flows
    from services.security.identity import Role
    from services.settings import load_settings

    settings = load_settings()
    flows = load_flows(args.flows_file or settings.review.flows_file)
    if args.flow not in flows:
        print(f"error: unknown flow {args.flow!r}; flows: {', '.join(flows)}", file=sys.stderr)
        return 2
    if not args.folder.is_dir():
        print(f"error: {args.folder} is not a folder", file=sys.stderr)
        return 2
    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        print("error: --threshold must be within [0, 1]", file=sys.stderr)
        return 2
    target = args.gateway or f"{settings.gateway.host}:{settings.gateway.port}"
    security = connect.from_args(args, Role.INFERENCE)
    with channel(target, security) as ch:
        try:
            outcomes = simulate(
                pb_grpc.InferenceStub(ch), flows[args.flow], args.folder, threshold=args.threshold, labels=args.labels
            )
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}{connect.explain(exc)}", file=sys.stderr)
            return 2
        except (ValueError, KeyError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(report(flows[args.flow], outcomes, args.threshold))
    return 0
