"""A2I's output.json for completed loops, and SageMaker augmented manifests of reviewed cases for retraining."""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from services.durable import write_durable
from services.review.flows import FlowDefinition, InvalidArgument, TaskType
from services.review.masks import BACKGROUND
from services.review.store import Decision, InvalidState, Loop, LoopStatus, ReviewStoreBase

logger = logging.getLogger("medgate.review.output")

OUTPUT_FILE = "output.json"
MANIFEST_FILE = "output.manifest"
TYPE_DETECTION = "groundtruth/object-detection"
TYPE_CLASSIFICATION = "groundtruth/image-classification"
TYPE_SEGMENTATION = "groundtruth/semantic-segmentation"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG colour type -> channels (grey, -, RGB, palette, grey+alpha, -, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# A2I's identityProviderType for a private workforce is "Cognito"; ours are OIDC issuers.
IDENTITY_PROVIDER_TYPE = "OIDC"


def iso_time(epoch_s: float) -> str:
    """A2I's timestamp format: ISO 8601, UTC, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def flow_definition_arn(flow_name: str) -> str:
    """An ARN-like id whose last path element is the flow name, as tools parsing A2I output expect."""
    return f"medgate:flow-definition/{flow_name}"


def output_key(loop: Loop) -> PurePosixPath:
    """A loop's output.json relative to its flow's output directory, as A2I lays keys out under S3OutputPath.

    ``<flow>/YYYY/MM/DD/hh/mm/ss/<loop>/output.json`` (UTC, the loop's creation time). This, never the
    server's own path, is what HumanLoop.output_path answers.
    """
    created = datetime.fromtimestamp(loop.created_at, UTC)
    return PurePosixPath(loop.flow, created.strftime("%Y/%m/%d/%H/%M/%S"), loop.name, OUTPUT_FILE)


def output_path(output_dir: Path, loop: Loop) -> Path:
    """Where A2I would put a loop's output.json: ``<output_dir>/`` + :func:`output_key`.

    Every file is written atomically (temporary file, fsync, rename), so a reader or a crash never sees
    half a file. :func:`flush_outputs` is the outbox: it writes every Completed loop whose output is not
    yet recorded, so a crash between a decision and its output.json only delays the file.
    """
    return Path(output_dir, *output_key(loop).parts)


def human_answer(decision: Decision) -> dict[str, Any]:
    """One entry of A2I's humanAnswers; a reviewer verified by a token has A2I's workerMetadata too."""
    answer: dict[str, Any] = {
        "acceptanceTime": iso_time(decision.accepted_at),
        "answerContent": decision.answer,
        "submissionTime": iso_time(decision.submitted_at),
        "timeSpentInSeconds": round(decision.time_spent_s),
        "workerId": decision.worker_id,
    }
    if decision.issuer is not None and decision.subject is not None:
        answer["workerMetadata"] = {
            "identityData": {
                "identityProviderType": IDENTITY_PROVIDER_TYPE,
                "issuer": decision.issuer,
                "sub": decision.subject,
            }
        }
    return answer


def output_document(loop: Loop, decisions: Sequence[Decision]) -> dict[str, Any]:
    """The output.json object for a loop and its decisions (in submission order)."""
    return {
        "flowDefinitionArn": flow_definition_arn(loop.flow),
        "humanAnswers": [human_answer(decision) for decision in decisions],
        "humanLoopName": loop.name,
        "inputContent": loop.input_content,
    }


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part; durable
    on return (:func:`services.durable.write_durable`), readable by other users as ``open()`` makes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, data, temporary_prefix=f".{path.name}.", mode=0o666)


def _json_bytes(document: Any) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=2) + "\n").encode()


def write_output(store: ReviewStoreBase, loop_name: str, output_dir: Path) -> Path:
    """Write a Completed loop's output.json and record its path in the store."""
    loop = store.describe(loop_name)
    if loop.status is not LoopStatus.COMPLETED:
        raise InvalidState(f"human loop {loop_name} is {loop.status}; output is written for Completed loops")
    path = output_path(output_dir, loop)
    atomic_write(path, _json_bytes(output_document(loop, store.decisions(loop_name))))
    store.mark_output(loop_name, str(path))
    return path


def flush_outputs(store: ReviewStoreBase, flows: Mapping[str, FlowDefinition]) -> list[Path]:
    """Write output.json for every Completed loop not yet written whose flow has an output directory."""
    written: list[Path] = []
    for loop in store.pending_outputs():
        flow = flows.get(loop.flow)
        if flow is None or flow.output_dir is None:
            continue
        written.append(write_output(store, loop.name, flow.output_dir))
    return written


# ---------------------------------------------------------------------------------------------
# Augmented manifest.


def image_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, depth) from a PNG header; ``None`` for anything else."""
    if len(data) < 26 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return None
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    return width, height, _PNG_CHANNELS.get(data[25], 3)


def _completed_loops(
    store: ReviewStoreBase, flow: str, created_after: float | None, created_before: float | None
) -> Iterator[Loop]:
    token: str | None = None
    while True:
        page, token = store.list(
            flow=flow,
            status=LoopStatus.COMPLETED,
            created_after=created_after,
            created_before=created_before,
            ascending=True,
            next_token=token,
        )
        yield from page
        if token is None:
            return


def _detection_line(
    flow: FlowDefinition, loop: Loop, decisions: Sequence[Decision], size: tuple[int, int, int]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The earliest answer's boxes (A2I's humanAnswers[0]), scaled to the exported image if needed."""
    decision = decisions[0]
    result = decision.answer["annotatedResult"]
    width, height, depth = size
    answered = result.get("inputImageProperties") or {}
    scale_x = width / float(answered.get("width") or width)
    scale_y = height / float(answered.get("height") or height)
    annotations = [
        {
            "class_id": flow.class_id(box["label"]),
            "left": round(box["left"] * scale_x),
            "top": round(box["top"] * scale_y),
            "width": round(box["width"] * scale_x),
            "height": round(box["height"] * scale_y),
        }
        for box in result["boundingBoxes"]
    ]
    value = {"annotations": annotations, "image_size": [{"width": width, "height": height, "depth": depth}]}
    metadata = {
        "objects": [{"confidence": 1.0} for _ in annotations],
        "class-map": {str(i): name for i, name in enumerate(flow.categories)},
        "type": TYPE_DETECTION,
        "human-annotated": "yes",
        "creation-date": iso_time(decision.submitted_at),
        "job-name": f"a2i/{loop.name}",
    }
    return value, metadata


def _classification_line(flow: FlowDefinition, loop: Loop, decisions: Sequence[Decision]) -> tuple[int, dict[str, Any]]:
    """The majority label (ties: the earliest answer's); confidence is the share of reviewers agreeing."""
    votes = Counter(decision.answer["label"] for decision in decisions)
    label, count = votes.most_common(1)[0]
    first = next(decision for decision in decisions if decision.answer["label"] == label)
    metadata = {
        "class-name": label,
        "class-map": {str(i): name for i, name in enumerate(flow.categories)},
        "confidence": count / len(decisions),
        "type": TYPE_CLASSIFICATION,
        "human-annotated": "yes",
        "creation-date": iso_time(first.submitted_at),
        "job-name": f"a2i/{loop.name}",
    }
    return flow.class_id(label), metadata


def _segmentation_line(loop: Loop, decisions: Sequence[Decision]) -> tuple[bytes, dict[str, Any]]:
    """The earliest answer's labeledImage PNG (A2I's humanAnswers[0]) and Ground Truth's colour map for it: index 0
    BACKGROUND, then each prompt in the order it was painted (a later one over an earlier one)."""
    decision = decisions[0]
    result = decision.answer["annotatedResult"]
    png = base64.b64decode(result["labeledImage"]["pngImageData"], validate=True)
    colours = [("BACKGROUND", BACKGROUND)] + [(label, m["color"]) for label, m in result["labelMappings"].items()]
    metadata = {
        "internal-color-map": {str(i): {"class-name": n, "hex-color": c} for i, (n, c) in enumerate(colours)},
        "type": TYPE_SEGMENTATION,
        "human-annotated": "yes",
        "creation-date": iso_time(decision.submitted_at),
        "job-name": f"a2i/{loop.name}",
    }
    return png, metadata


def _manifest_lines(
    store: ReviewStoreBase,
    flow: FlowDefinition,
    out_dir: Path,
    attribute: str,
    source_prefix: str,
    loops: Iterable[Loop],
) -> Iterator[dict[str, Any]]:
    for loop in loops:
        decisions = store.decisions(loop.name)
        images = store.images(loop.name)
        if not decisions or not images:
            logger.warning("manifest: skipping %s (no %s)", loop.name, "decisions" if not decisions else "image")
            continue
        image_name, data = next(iter(images.items()))
        size = image_size(data)
        suffix = Path(image_name).suffix or ".png"
        file_name = f"{loop.name}{suffix}"
        try:
            value: Any
            if flow.task_type is TaskType.DETECTION:
                if size is None:
                    raise InvalidArgument(f"image {image_name} is not a PNG; its size is unknown")
                value, metadata = _detection_line(flow, loop, decisions, size)
            elif flow.task_type is TaskType.SEGMENTATION:
                label_png, metadata = _segmentation_line(loop, decisions)
                value = f"{source_prefix}{loop.name}-label.png"
                atomic_write(out_dir / f"{loop.name}-label.png", label_png)
                key = f"{attribute}-ref"  # Ground Truth's semantic-segmentation attribute names the label image
                atomic_write(out_dir / file_name, data)
                yield {"source-ref": f"{source_prefix}{file_name}", key: value, f"{key}-metadata": metadata}
                continue
            else:
                value, metadata = _classification_line(flow, loop, decisions)
        except (InvalidArgument, KeyError, TypeError, ValueError, binascii.Error) as exc:
            logger.warning("manifest: skipping %s: %s", loop.name, exc)
            continue
        atomic_write(out_dir / file_name, data)
        yield {"source-ref": f"{source_prefix}{file_name}", attribute: value, f"{attribute}-metadata": metadata}


def export_manifest(
    store: ReviewStoreBase,
    flow: FlowDefinition,
    out_dir: str | Path,
    *,
    attribute: str | None = None,
    source_prefix: str = "",
    created_after: float | None = None,
    created_before: float | None = None,
) -> Path:
    """Write ``out_dir/output.manifest`` (JSON Lines) and each case's image beside it; return the manifest path.

    One line per Completed loop of ``flow`` (oldest first), in SageMaker's augmented-manifest shape:
    detection flows as ``groundtruth/object-detection`` (the earliest answer's boxes, in the
    exported image's pixels), classification flows as ``groundtruth/image-classification`` (the
    majority label), segmentation flows as ``groundtruth/semantic-segmentation`` (``<attribute>-ref``: the
    earliest answer's labeledImage PNG, written beside the image as ``<loop>-label.png``). ``attribute``
    (default: the flow name) is the label attribute name to give SageMaker's ``AttributeNames``; ``source-ref``
    is ``source_prefix`` + the image file name (pass the ``s3://`` prefix the folder will be uploaded to).
    Loops without an image or with an answer the flow cannot map are skipped with a warning.
    """
    attribute = attribute or flow.name
    if not attribute or attribute == "source-ref" or attribute.endswith("-metadata"):
        raise InvalidArgument(f"attribute {attribute!r} cannot name a label attribute")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    loops = _completed_loops(store, flow.name, created_after, created_before)
    lines = [
        json.dumps(line, ensure_ascii=False, separators=(",", ":"))
        for line in _manifest_lines(store, flow, out, attribute, source_prefix, loops)
    ]
    manifest = out / MANIFEST_FILE
    atomic_write(manifest, "".join(f"{line}\n" for line in lines).encode())
    return manifest
