"""Verified results as DICOM: when a human loop completes, the reviewer's decision becomes a VERIFIED SR.

A case that came from a DICOM input whose answer was also written as DICOM carries the source instance
and the AI objects' identifiers (``StartHumanLoopRequest.dicom``; kept as two attachments of the loop,
:func:`dicom_attachments`). The store marks such a loop ``pending`` from its start; once it is Completed,
:class:`VerifiedDicom` builds the reviewer's result with ``build_verified_results`` and hands it to the
DICOM node's inbox (``hand_over``), which sends it on like its own results; then the loop is marked
``sent``. The store's mark is the outbox: a review service that stops (or a node folder that cannot be
written) between the decision and the hand-over leaves the loop ``pending``, and the next round builds
it again. Its UIDs are derived from the loop's name, so building it twice makes the same objects, which
the node sends once. A result that can never be built (a source the builders refuse) is marked
``failed`` with the reason; a case every reviewer rejected is ``skipped``. Nothing here blocks
SubmitReview: it answers once the decision is committed, and this runs after, on its own thread.

How an answer maps onto the verified result (what :func:`reviewed_results` does):

- accept: the AI results as they were (classification, detections with their scores and model; the AI
  SEG referenced, not copied);
- a class: ``Classification(label)`` without score or algorithm (a person said so);
- boxes (the 1024 image the reviewer saw): ``Detections`` in the source's pixels (the letterbox's inverse);
- masks (1024x1024, one per prompt): on the source's grid, in a new SEG; a prompt whose mask the reviewer
  changed is edited (SEMIAUTOMATIC), one left as it was stays the model's (AUTOMATIC, with its score);
  the web page's per-prompt choice keeps the chosen prompts' model masks; a single mask for several
  prompts is one MANUAL segment.

With several reviewers (task_count 2-3): the majority class (the earliest reviewer who chose it), or the
earliest answer that is not a rejection. Logs name the loop and the objects' UIDs, never patient data.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import json_format

from medgate.v1 import review_pb2 as pb
from services.dicom.results import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    Device,
    DicomResult,
    DicomResultError,
    Segment,
    SegReference,
    Verification,
    build_verified_results,
)
from services.imaging.arrays import decode_array
from services.imaging.limits import IngestLimits
from services.imaging.preprocess import Letterbox
from services.metrics import REVIEW_VERIFIED_DICOM
from services.review.convert import MASKS_NAME
from services.review.flows import FlowDefinition, TaskType
from services.review.store import (
    DICOM_CONTEXT_NAME,
    DICOM_SOURCE_NAME,
    Decision,
    Loop,
    LoopStatus,
    NotFound,
    ReviewStoreBase,
)

log = logging.getLogger("medgate.review.dicom")

HANDED_OVER = "handed-over"
FAILED = "failed"
SKIPPED = "skipped"
# Tasks as the gateway names them in ReviewDicomSource.models.
CLASSIFY, DETECT, SEGMENT = "classify", "detect", "segment"
_NOTE_CHARS = 300


class CannotVerify(ValueError):
    """This loop's verified result can never be built (its attachments or answers do not allow it); recorded."""


@dataclass(frozen=True)
class CompletionConfig:
    """Where verified results go (the DICOM node's ``dicom.outbox_dir``) and what building them needs."""

    handover_dir: Path
    limits: IngestLimits
    organization: str = ""
    retry_interval_s: float = 5.0


def config_from(settings: Any, *, node_here: bool) -> CompletionConfig | None:
    """The configuration ``medgate serve`` uses; None when verified DICOM results are off or have nowhere to go.

    ``review.verified_dicom_dir`` names the node's outbox folder; empty means the node that ``medgate serve``
    runs beside this review service (``node_here``: its ``dicom.outbox_dir``). A review service on its own
    (``medgate review serve``) without that setting writes none: its loops stay pending, and it says so.
    """
    review = settings.review
    if not review.verified_dicom:
        return None
    folder = review.verified_dicom_dir.strip()
    if not folder:
        if not (node_here and settings.dicom.enabled):
            log.warning(
                "verified DICOM results wait in the review store: no DICOM node runs beside this review service (set"
                " review.verified_dicom_dir to the node's dicom.outbox_dir, shared, or review.verified_dicom=false)"
            )
            return None
        folder = str(settings.dicom.outbox_dir)
    return CompletionConfig(
        handover_dir=Path(folder),
        limits=settings.ingest,
        organization=review.organization,
        retry_interval_s=review.verified_dicom_retry_interval_s,
    )


def dicom_attachments(source: pb.ReviewDicomSource) -> dict[str, bytes]:
    """A case's DICOM source as loop attachments: the bytes, and the rest as JSON (never shown to reviewers)."""
    context = pb.ReviewDicomSource()
    context.CopyFrom(source)
    context.ClearField("data")
    document = json_format.MessageToDict(context, preserving_proto_field_name=True)
    document["frame"] = source.frame
    return {DICOM_SOURCE_NAME: bytes(source.data), DICOM_CONTEXT_NAME: json.dumps(document, sort_keys=True).encode()}


# --- from a loop to the builder's inputs (pure) ------------------------------------------------


@dataclass(frozen=True)
class VerifiedInputs:
    data: bytes
    frame: int
    reviewed: AIResults
    verification: Verification
    ai_seg: SegReference | None
    device: Device


def _algorithm(model: Mapping[str, Any] | None) -> Algorithm | None:
    if not model or not model.get("name"):
        return None
    return Algorithm(str(model["name"]), str(model.get("version", "")))


def letterbox_of(content: Mapping[str, Any]) -> Letterbox:
    """The case's letterbox (the routing's ``transform``): model space (1024) back to the source's pixels."""
    t = content.get("transform")
    if not isinstance(t, Mapping):
        raise CannotVerify("the case has no transform to map the reviewer's answer back to the source")
    width, height = int(t["originalWidth"]), int(t["originalHeight"])
    size = int(t.get("modelSize", 1024))
    scale_x, scale_y = float(t.get("scaleX", t["scale"])), float(t.get("scaleY", t["scale"]))
    return Letterbox(
        original_height=height,
        original_width=width,
        scale=float(t["scale"]),
        pad_top=int(t.get("padTop", 0)),
        pad_left=int(t.get("padLeft", 0)),
        resized_height=max(1, round(scale_y * height)),
        resized_width=max(1, round(scale_x * width)),
        size=size,
    )


def _reference(item: Mapping[str, Any] | None) -> tuple[str, str, str, str] | None:
    if not item:
        return None
    values = tuple(str(item.get(k, "")) for k in ("study_instance_uid", "series_instance_uid", "sop_instance_uid"))
    if not all(values):
        return None
    return (*values, str(item.get("sop_class_uid", "")))  # type: ignore[return-value]


def _ai_seg(context: Mapping[str, Any]) -> SegReference | None:
    found = _reference(context.get("ai_seg"))
    if found is None:
        return None
    study, series, instance, sop_class = found
    return SegReference(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=instance,
        sop_class_uid=sop_class,
        tracking_ids=tuple(context.get("seg_tracking_ids", ())),
        tracking_uids=tuple(context.get("seg_tracking_uids", ())),
    )


def chosen_decision(task_type: TaskType, decisions: Sequence[Decision]) -> Decision | None:
    """The answer the verified result states: the majority class, else the earliest that is not a rejection."""
    answered = [d for d in decisions if not d.answer.get("rejected")]
    if not answered:
        return None
    if task_type is TaskType.CLASSIFICATION:
        votes = Counter(str(d.answer.get("label", "")) for d in answered)
        label, _ = votes.most_common(1)[0]
        return next(d for d in answered if str(d.answer.get("label", "")) == label)
    return answered[0]


def person_name(text: str) -> str:
    """A token subject or reviewer id as a DICOM person name (PN): no component or group separators, 64 at most."""
    cleaned = "".join("_" if ch in "^=\\" or not ch.isprintable() else ch for ch in text).strip()
    return cleaned[:64] or "reviewer"


def _model_masks(images: Mapping[str, bytes], content: Mapping[str, Any]) -> np.ndarray:
    shape = content.get("masksShape")
    if MASKS_NAME not in images or not shape:
        raise CannotVerify("the case has no model masks")
    return decode_array(images[MASKS_NAME], tuple(shape), "uint8", packbits=True)


def _answer_masks(answer: Mapping[str, Any]) -> np.ndarray:
    """The reviewer's mask answer as [K, 1024, 1024] 0/1: one mask, or one per prompt."""
    mask = answer["mask"]
    packbits = mask.get("encoding") == "ARRAY_ENCODING_PACKBITS"
    array = decode_array(
        base64.b64decode(mask["data"]), tuple(mask["shape"]), mask.get("dtype") or "uint8", packbits=packbits
    )
    return (array.reshape(-1, *array.shape[-2:]) > 0).astype(np.uint8)


def reviewed_results(
    flow: FlowDefinition,
    loop: Loop,
    answer: Mapping[str, Any],
    images: Mapping[str, bytes],
    models: Mapping[str, Any],
    ai_seg: SegReference | None,
) -> tuple[AIResults, SegReference | None]:
    """The reviewer's answer as the builder's values, and the AI SEG the SR may point at (None: write a new SEG)."""
    content = loop.input_content
    accepted = bool(answer.get("accepted"))
    if flow.task_type is TaskType.CLASSIFICATION:
        section = content.get("classification", {})
        scores = section.get("scores") or []
        label = str(answer.get("label", ""))
        if not label:
            raise CannotVerify("the answer names no class")
        top = scores[0] if scores else {}
        if accepted and top.get("label") == label:
            algorithm = _algorithm(section.get("model")) or _algorithm(models.get(CLASSIFY))
            return AIResults(classification=Classification(label, float(top.get("score", 0.0)), algorithm)), None
        return AIResults(classification=Classification(label, None, None)), None
    letterbox = letterbox_of(content)
    if flow.task_type is TaskType.DETECTION:
        section = content.get("detection", {})
        if accepted:
            algorithm = _algorithm(section.get("model")) or _algorithm(models.get(DETECT))
            items = [
                Detection(
                    box=tuple(float(d.get("box", {}).get(k, 0.0)) for k in ("x0", "y0", "x1", "y1")),  # type: ignore[arg-type]
                    label=str(d.get("label", "")),
                    score=float(d.get("score", 0.0)),
                )
                for d in section.get("detections", [])
            ]
            return AIResults(detections=Detections(items, algorithm)), None
        boxes = answer.get("annotatedResult", {}).get("boundingBoxes", [])
        model_boxes = np.array(
            [[b["left"], b["top"], b["left"] + b["width"], b["top"] + b["height"]] for b in boxes], dtype=np.float64
        ).reshape(-1, 4)
        original = letterbox.boxes_to_original(model_boxes)
        items = [
            Detection(box=tuple(float(v) for v in row), label=str(b.get("label", "")), score=None)  # type: ignore[arg-type]
            for row, b in zip(original, boxes, strict=True)
        ]
        return AIResults(detections=Detections(items, None)), None
    # Segmentation.
    prompts = content.get("segmentation", {}).get("prompts", [])
    version = str((models.get(SEGMENT) or {}).get("version", ""))
    segments: list[Segment] = []
    boxes_seen = 0
    for prompt in prompts:
        is_box = "box" in prompt
        boxes_seen += is_box
        segments.append(
            Segment(
                label=f"box {boxes_seen}" if is_box else str(prompt.get("prompt", "")),
                category=str(prompt.get("category", "other")),
                score=float(prompt.get("score", 0.0)),
                algorithm=Algorithm(str(prompt.get("model", "")), version) if prompt.get("model") else None,
                prompt=None if is_box else str(prompt.get("prompt", "")),
            )
        )
    if accepted:
        masks = letterbox.mask_to_original(_model_masks(images, content))
        return AIResults(segments=segments, masks=masks), ai_seg
    decisions = answer.get("maskDecisions")
    if isinstance(decisions, list) and len(decisions) == len(segments):
        kept = [i for i, d in enumerate(decisions) if isinstance(d, Mapping) and d.get("accepted")]
        if not kept:
            return AIResults(), None
        masks = letterbox.mask_to_original(_model_masks(images, content)[kept])
        return AIResults(segments=[segments[i] for i in kept], masks=masks), None
    answered = _answer_masks(answer)
    if len(answered) == len(segments):  # one mask per prompt: those that differ from the model's are edited
        model = _model_masks(images, content) if MASKS_NAME in images else None
        corrected = []
        for i, s in enumerate(segments):
            same = model is not None and np.array_equal(answered[i], model[i] != 0)
            corrected.append(s if same else Segment(s.label, s.category, None, s.algorithm, s.prompt, edited=True))
        return AIResults(segments=corrected, masks=letterbox.mask_to_original(answered)), None
    # One mask for several prompts: the reviewer's own segment, drawn by hand (MANUAL).
    manual = Segment("corrected mask", "other", None, None, None, edited=True)
    drawn = letterbox.mask_to_original(answered[:1])
    return AIResults(segments=[manual], masks=drawn), None


def verified_inputs(
    flow: FlowDefinition,
    loop: Loop,
    decisions: Sequence[Decision],
    images: Mapping[str, bytes],
    *,
    organization: str = "",
) -> VerifiedInputs | None:
    """Everything ``build_verified_results`` takes for this loop; None when every reviewer rejected the case (or
    kept no mask)."""
    if DICOM_SOURCE_NAME not in images or DICOM_CONTEXT_NAME not in images:
        raise CannotVerify("the loop has no DICOM source")
    try:
        context = json.loads(images[DICOM_CONTEXT_NAME])
    except ValueError:
        raise CannotVerify("the loop's DICOM context is not JSON") from None
    ai_sr = _reference(context.get("ai_sr"))
    if ai_sr is None:
        raise CannotVerify("the loop names no AI SR to verify")
    decision = chosen_decision(flow.task_type, decisions)
    if decision is None:
        return None
    models = context.get("models") or {}
    ai_seg = _ai_seg(context)
    reviewed, seg = reviewed_results(flow, loop, decision.answer, images, models, ai_seg)
    if reviewed.classification is None and reviewed.detections is None and not reviewed.segments:
        return None  # the reviewer kept none of the model's masks and drew none: nothing to state as verified
    login = decision.subject or decision.reviewer_id
    study, series, instance, sop_class = ai_sr
    verification = Verification(
        reviewer_name=person_name(login),
        organization=organization,
        verified_at=datetime.fromtimestamp(decision.submitted_at, UTC),
        predecessor_study_uid=study,
        predecessor_series_uid=series,
        predecessor_sop_instance_uid=instance,
        predecessor_sop_class_uid=sop_class or "1.2.840.10008.5.1.4.1.1.88.34",
        reviewer_login=login,
    )
    algorithms = [a for a in (_algorithm(models.get(k)) for k in (CLASSIFY, DETECT, SEGMENT)) if a is not None]
    return VerifiedInputs(
        data=images[DICOM_SOURCE_NAME],
        frame=int(context.get("frame", 0)),
        reviewed=reviewed,
        verification=verification,
        ai_seg=seg,
        device=Device.for_algorithms(algorithms or reviewed.algorithms()),
    )


# --- the worker ----------------------------------------------------------------------------------


@dataclass
class Round:
    """What one pass over the pending loops did."""

    handed_over: int = 0
    failed: int = 0
    skipped: int = 0
    waiting: int = 0  # could not be handed over now; tried again next round


class VerifiedDicom:
    """Builds and hands over the verified results of completed loops; :meth:`run_once` is one pass (blocking)."""

    def __init__(
        self,
        store: ReviewStoreBase,
        flows: Mapping[str, FlowDefinition],
        config: CompletionConfig,
        *,
        hand_over: Callable[[Sequence[DicomResult], Path], object] | None = None,
    ) -> None:
        from services.dicom.node.handover import hand_over as node_hand_over

        self.store = store
        self.flows = dict(flows)
        self.config = config
        self._hand_over = hand_over or node_hand_over

    def build(self, loop: Loop) -> list[DicomResult] | None:
        """The loop's verified objects (None: nothing to verify). Raises CannotVerify / DicomResultError for good."""
        return self._build(loop, self.store.decisions(loop.name), self.store.images(loop.name, with_dicom=True))

    def _build(
        self, loop: Loop, decisions: Sequence[Decision], images: Mapping[str, bytes]
    ) -> list[DicomResult] | None:
        flow = self.flows.get(loop.flow)
        if flow is None:
            raise CannotVerify("the loop's flow is no longer defined")
        inputs = verified_inputs(flow, loop, decisions, images, organization=self.config.organization)
        if inputs is None:
            return None
        return build_verified_results(
            inputs.data,
            frame=inputs.frame,
            reviewed=inputs.reviewed,
            verification=inputs.verification,
            limits=self.config.limits,
            ai_seg=inputs.ai_seg,
            device=inputs.device,
            uid_seed=loop.name,
        )

    def process(self, loop: Loop) -> str | None:
        """Build and hand over one loop's result; the state recorded, or None when it waits for the next round."""
        started = time.perf_counter()
        if loop.status is not LoopStatus.COMPLETED:  # expired or stopped: no decision to verify, no source to keep
            self.store.mark_dicom(
                loop.name, SKIPPED, f"the loop ended {loop.status} without a decision", drop_source=True
            )
            return SKIPPED
        try:  # the store's errors (a database away, a locked file) end the round: the loop stays pending
            decisions = self.store.decisions(loop.name)
            images = self.store.images(loop.name, with_dicom=True)
        except NotFound:  # deleted (DeleteHumanLoop) since it was listed: nothing left to verify
            return SKIPPED
        try:
            objects = self._build(loop, decisions, images)
        except (CannotVerify, DicomResultError) as exc:
            note = str(exc)[:_NOTE_CHARS]  # our own messages: they name what is missing, never a value
            self.store.mark_dicom(loop.name, FAILED, note)
            log.error("verified DICOM result of %s cannot be built: %s", loop.name, note)
            return FAILED
        except Exception as exc:  # a value the mapping or a library did not expect: never retried in a loop
            note = f"the loop's values cannot be mapped ({type(exc).__name__})"
            self.store.mark_dicom(loop.name, FAILED, note)
            log.error("verified DICOM result of %s cannot be built: %s", loop.name, note)
            return FAILED
        if objects is None:
            note = "nothing to verify: the case was rejected, or no mask was kept"
            self.store.mark_dicom(loop.name, SKIPPED, note, drop_source=True)
            log.info("verified DICOM result of %s skipped: %s", loop.name, note)
            return SKIPPED
        try:
            self._hand_over(objects, self.config.handover_dir)
        except OSError as exc:
            log.warning(
                "verified DICOM result of %s not handed over yet (%s); tried again in %.0f s",
                loop.name,
                exc.strerror or type(exc).__name__,
                self.config.retry_interval_s,
            )
            return None
        note = " ".join(f"{o.kind} {o.sop_instance_uid}" for o in objects)
        self.store.mark_dicom(loop.name, HANDED_OVER, note, drop_source=True)  # the node has it now
        log.info(
            "verified DICOM result of %s handed to the DICOM node: %s (%.0f ms)",
            loop.name,
            ", ".join(f"{o.kind} {o.sop_instance_uid}" for o in objects),
            (time.perf_counter() - started) * 1000.0,
        )
        return HANDED_OVER

    def run_once(self) -> Round:
        """Every pending loop, oldest first, until none is left or the node's folder cannot be written now."""
        done = Round()
        while not done.waiting:
            batch = self.store.pending_dicom()
            if not batch:
                break
            for loop in batch:
                state = self.process(loop)
                REVIEW_VERIFIED_DICOM.labels(outcome=state or "waiting").inc()
                if state == HANDED_OVER:
                    done.handed_over += 1
                elif state == FAILED:
                    done.failed += 1
                elif state == SKIPPED:
                    done.skipped += 1
                else:
                    done.waiting += 1
                    break  # the rest would fail alike: the next round tries again
        return done
