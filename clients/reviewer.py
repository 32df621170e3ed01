"""``medgate reviewer``: receive review cases live, look at an overlay, decide, submit; reconnects without losing cases.

Decision ids are derived from (reviewer, human loop), so a decision resent after a reconnect is
recognised by the server as the same decision and never counted twice. With a token the reviewer is
the token's subject and the server says how it keys it (``ReviewCase.reviewer_id``); ``--reviewer-id``
is for a development server without tokens.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np

from clients import connect
from clients.infer import array_of
from medgate.v1 import inference_pb2 as ipb
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.security.identity import Role

log = logging.getLogger("medgate.reviewer")
PALETTE = [(0, 200, 255), (255, 120, 0), (0, 255, 0), (255, 0, 255), (0, 0, 255), (255, 255, 0)]


# RenewLease at half the time a lease has left, but not more often than this.
MIN_RENEW_INTERVAL_S = 0.2


class LeaseKeeper:
    """Renews a case's lease from a thread while the reviewer works on it, so a long look (a hard case, a
    coffee) does not send the case to someone else. Stops at exit, or when the lease has ended anyway
    (answered, released, expired: FAILED_PRECONDITION; a decision is still accepted while the loop is open).
    """

    def __init__(self, stub: pb_grpc.ReviewStub, case: pb.ReviewCase, reviewer_id: str) -> None:
        self._stub = stub
        self._request = pb.RenewLeaseRequest(delivery_id=case.delivery_id, reviewer_id=reviewer_id)
        self._expires = case.lease_expires.ToNanoseconds() / 1e9
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="medgate-lease", daemon=True)
        self.renewals = 0

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _keep(self) -> None:
        while not self._stop.wait(max(MIN_RENEW_INTERVAL_S, (self._expires - time.time()) / 2)):
            try:
                answer = self._stub.RenewLease(self._request, timeout=10)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                    log.info(
                        "lease %s ended; a decision is still accepted while the loop is open", self._request.delivery_id
                    )
                    return
                log.warning("lease renewal failed (%s); trying again", code)
                continue
            self._expires = answer.lease_expires.ToNanoseconds() / 1e9
            self.renewals += 1


def decision_id(reviewer: str, loop_name: str) -> str:
    return hashlib.sha256(f"{reviewer}\0{loop_name}".encode()).hexdigest()[:32]


def overlay(case: pb.ReviewCase) -> np.ndarray:
    """The case's 1024 image with the model's masks, boxes and scores drawn on it."""
    image = cv2.imdecode(np.frombuffer(case.image_png, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        image = np.zeros((1024, 1024, 3), np.uint8)
    if case.HasField("masks"):
        for index, mask in enumerate(array_of(case.masks)):
            color = PALETTE[index % len(PALETTE)]
            region = mask.astype(bool)
            image[region] = (0.55 * image[region] + 0.45 * np.array(color, np.float32)).astype(np.uint8)
    for det in case.detections:
        b = det.model_box
        cv2.rectangle(image, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), (0, 0, 255), 2)
        cv2.putText(
            image,
            f"{det.label} {det.score:.2f}",
            (int(b.x0), max(14, int(b.y0) - 4)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.6,
            (0, 0, 255),
            2,
        )
    y = 30
    for score in case.scores:
        cv2.putText(
            image, f"{score.label} {score.score:.2f}", (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.9, (255, 255, 255), 2
        )
        y += 32
    for prompt in case.prompts:
        cv2.putText(
            image, f"{prompt.prompt}: {prompt.score:.2f}", (10, y), cv2.FONT_HERSHEY_SIMPLEX, 0.7, (255, 255, 255), 2
        )
        y += 28
    return image


def summary(case: pb.ReviewCase) -> str:
    task = pb.TaskType.Name(case.task_type).removeprefix("TASK_TYPE_").lower()
    lines = [
        f"case {case.human_loop_name} ({case.flow_definition}, {task}),"
        f" image {case.original_width}x{case.original_height}"
    ]
    content: dict[str, Any] = json.loads(case.input_content_json or "{}")
    reasons = content.get("humanLoopActivationReasons", [])
    if reasons:
        lines.append("  routed because: " + "; ".join(reasons))
    for score in case.scores:
        lines.append(f"  class {score.label}: {score.score:.3f}")
    for det in case.detections:
        b = det.box
        lines.append(f"  box {det.label} {det.score:.3f} at ({b.x0:.0f},{b.y0:.0f})-({b.x1:.0f},{b.y1:.0f})")
    for prompt in case.prompts:
        lines.append(f"  prompt {prompt.prompt!r} -> {prompt.category}, score {prompt.score:.3f}")
    return "\n".join(lines)


def image_key(png: bytes) -> str:
    """The key of a case's image in a ground-truth file: SHA-256 of its decoded grey pixels (1024x1024 uint8)."""
    pixels = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE)
    return hashlib.sha256(np.ascontiguousarray(pixels).tobytes()).hexdigest() if pixels is not None else ""


_TRUTHS: dict[Path, dict[str, dict[str, Any]]] = {}


def read_truths(path: Path) -> dict[str, dict[str, Any]]:
    """A ground-truth file: JSON lines ``{"image_sha256": ..., "boxes": [[x0, y0, x1, y1], ...], "label": ...}``
    (or ``"masks": {prompt: base64 PNG}`` for segmentation cases).

    Boxes are in the case image's pixels (the 1024 model square the review service shows); read once per file.
    """
    if path not in _TRUTHS:
        lines = [json.loads(text) for text in path.read_text().splitlines() if text.strip()]
        _TRUTHS[path] = {str(line["image_sha256"]): line for line in lines}
    return _TRUTHS[path]


def truth_answer(path: Path, case: pb.ReviewCase) -> pb.ReviewAnswer:
    """A scripted reviewer's answer: the true boxes of the case's image (a detection case), its true masks (a
    segmentation case whose truth has ``masks``: :func:`truth_masks`) or its true label."""
    truth = read_truths(path).get(image_key(case.image_png))
    if truth is None:
        return pb.ReviewAnswer(reject_reason="no ground truth for this image")
    if case.task_type == pb.TASK_TYPE_SEGMENTATION and "masks" in truth:
        return pb.ReviewAnswer(mask=truth_masks(truth["masks"], case))
    label = str(truth.get("label") or (case.categories[0] if case.categories else "lesion"))
    if case.task_type != pb.TASK_TYPE_DETECTION:
        return pb.ReviewAnswer(label=label)
    boxes = [
        ipb.Detection(label=label, model_box=ipb.Box(x0=b[0], y0=b[1], x1=b[2], y1=b[3]), score=1.0)
        for b in truth.get("boxes", [])
    ]
    return pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=boxes))


def truth_masks(masks: dict[str, str], case: pb.ReviewCase) -> ipb.NDArray:
    """One mask per prompt of a segmentation case, in order: the ground truth's for a prompt it names (a base64 PNG,
    non-zero inside), the model's own mask for the others (left as they are); bit-packed [N, 1024, 1024]."""
    model = array_of(case.masks) if case.HasField("masks") else None
    answer = []
    for index, prompt in enumerate(case.prompts):
        if prompt.prompt in masks:
            png = np.frombuffer(base64.b64decode(masks[prompt.prompt]), np.uint8)
            answer.append(cv2.imdecode(png, cv2.IMREAD_GRAYSCALE) != 0)
        elif model is not None and index < len(model):
            answer.append(model[index] != 0)
        else:
            answer.append(np.zeros((1024, 1024), bool))
    stacked = np.stack(answer).astype(np.uint8)
    return ipb.NDArray(
        data=np.packbits(stacked).tobytes(),
        shape=list(stacked.shape),
        dtype="uint8",
        encoding=ipb.ARRAY_ENCODING_PACKBITS,
    )


def auto_answer(rule: str, case: pb.ReviewCase) -> pb.ReviewAnswer | None:
    """``accept``, ``reject``, ``label:<name>``, ``truth:<file>`` (:func:`truth_answer`), or ``release`` (None)."""
    if rule.startswith("truth:"):
        return truth_answer(Path(rule.removeprefix("truth:")), case)
    if rule == "accept":
        return pb.ReviewAnswer(accept=True)
    if rule == "reject":
        return pb.ReviewAnswer(reject_reason="rejected by rule")
    if rule.startswith("label:"):
        return pb.ReviewAnswer(label=rule.removeprefix("label:"))
    if rule == "release":
        return None
    raise ValueError(f"unknown --auto rule {rule!r}: accept, reject, label:<name>, truth:<file> or release")


def ask(case: pb.ReviewCase) -> pb.ReviewAnswer | None:
    """Keys: a number picks a category, a accepts the model's answer, r rejects, s gives the case back."""
    keys = "  ".join(f"[{i + 1}] {c}" for i, c in enumerate(case.categories))
    while True:
        choice = input(f"{keys}  [a] accept model  [r] reject  [s] skip > ").strip().lower()
        if choice == "a":
            return pb.ReviewAnswer(accept=True)
        if choice == "r":
            return pb.ReviewAnswer(reject_reason=input("reason > ").strip() or "rejected")
        if choice == "s":
            return None
        if choice.isdigit() and 1 <= int(choice) <= len(case.categories):
            label = case.categories[int(choice) - 1]
            if case.task_type == pb.TASK_TYPE_DETECTION:
                boxes = [ipb.Detection(label=label, model_box=d.model_box, score=1.0) for d in case.detections]
                return pb.ReviewAnswer(boxes=pb.LabeledBoxes(boxes=boxes))
            return pb.ReviewAnswer(label=label)
        print("?", file=sys.stderr)


def review(args: argparse.Namespace, target: str) -> int:
    """Stream cases until --limit answers (or forever), reconnecting with backoff after failures."""
    answered = 0
    backoff = 0.5
    claimed = args.reviewer_id or ""  # empty with a token: the server takes the reviewer from it
    announced = ""
    overlay_dir: Path | None = args.overlay_dir
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    security = connect.from_args(args, Role.REVIEWER)
    options = [("grpc.max_receive_message_length", 256 << 20)]
    while args.limit is None or answered < args.limit:
        try:
            with connect.channel(target, security, options) as channel:
                stub = pb_grpc.ReviewStub(channel)
                stream = stub.StreamCases(
                    pb.StreamCasesRequest(
                        reviewer_id=claimed, flow_definitions=args.flow or [], max_in_flight=args.max_in_flight
                    )
                )
                for case in stream:
                    backoff = 0.5
                    reviewer = case.reviewer_id or claimed  # as the server keys us: the token's issuer#subject
                    if reviewer != announced:
                        print(f"reviewing as {reviewer}", flush=True)
                        announced = reviewer
                    print(summary(case), flush=True)
                    with LeaseKeeper(stub, case, claimed):  # the case stays ours while we look at it
                        if overlay_dir is not None:
                            path = overlay_dir / f"{case.human_loop_name}.png"
                            cv2.imwrite(str(path), overlay(case))
                            print(f"  overlay: {path}", flush=True)
                            if args.open:
                                subprocess.Popen(
                                    ["xdg-open", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                                )
                        answer = auto_answer(args.auto, case) if args.auto else ask(case)
                    if answer is None:
                        stub.ReleaseCase(pb.ReleaseCaseRequest(delivery_id=case.delivery_id, reviewer_id=claimed))
                        print("  released", flush=True)
                        continue
                    result = stub.SubmitReview(
                        pb.SubmitReviewRequest(
                            decision_id=decision_id(reviewer, case.human_loop_name),
                            delivery_id=case.delivery_id,
                            reviewer_id=claimed,
                            answer=answer,
                        ),
                        timeout=30,
                    )
                    loop = result.human_loop
                    status = pb.HumanLoopStatus.Name(loop.status).removeprefix("HUMAN_LOOP_STATUS_")
                    print(
                        f"  submitted: loop {status} ({loop.answers}/{loop.task_count})"
                        + (f", output {loop.output_path}" if loop.output_path else ""),
                        flush=True,
                    )
                    answered += 1
                    if args.limit is not None and answered >= args.limit:
                        stream.cancel()
                        break
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.CANCELLED and args.limit is not None and answered >= args.limit:
                break
            if code in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ):
                print(f"error: {code.name}: {exc.details()}", file=sys.stderr)
                return 2
            log.warning("stream to %s failed (%s); reconnecting in %.1f s", target, code, backoff)
            time.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--reviewer-id",
        help="who is reviewing, for a development server without tokens (recorded as workerId); with a token"
        " the reviewer is the token's subject and this, if given, must be it",
    )
    parser.add_argument("--flow", action="append", help="flow definitions to review (default: all)")
    parser.add_argument("--max-in-flight", type=int, default=1, help="cases leased at once")
    parser.add_argument(
        "--auto",
        help="answer by rule: accept, reject, label:<name>, release, or truth:<file> (a scripted reviewer answering"
        " with the boxes, label or masks of a ground-truth file, JSON lines keyed by the image's pixel SHA-256)",
    )
    parser.add_argument("--limit", type=int, help="stop after this many answers")
    parser.add_argument("--overlay-dir", type=Path, help="write each case's overlay PNG here")
    parser.add_argument("--open", action="store_true", help="open each overlay with xdg-open")
    parser.add_argument("--target", help="review service host:port (default: from settings, 127.0.0.1:50052)")
    connect.add_arguments(parser)
