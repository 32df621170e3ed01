"""Protobuf <-> domain values for the Inference and Report services: the one module that builds their messages.

Pure translation: no pixel loops here (those run on the executor in :mod:`services.imaging.masks`).
"""

from __future__ import annotations

import numpy as np

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import report_pb2
from services.dicom.results import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    DicomResult,
    Segment,
)
from services.imaging.arrays import WireArray, decode_array
from services.imaging.ingest import InputKind
from services.imaging.masks import Box, MaskSummary
from services.imaging.prepare import PreparedImage
from services.imaging.preprocess import Letterbox
from services.rpc.errors import BadRequest
from services.triton.impression import ImpressionAnswer


def box_tuple(box: pb.Box) -> Box:
    return (box.x0, box.y0, box.x1, box.y1)


def box_proto(values: Box | np.ndarray) -> pb.Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def input_kind(kind: int) -> InputKind:
    """The proto enum to ingest's (the two share their names); unknown numbers never get here (validation)."""
    return InputKind[pb.InputKind.Name(kind).removeprefix("INPUT_KIND_")]


def request_array(array: pb.NDArray) -> np.ndarray:
    try:
        return decode_array(
            array.data, tuple(array.shape), array.dtype, packbits=array.encoding == pb.ARRAY_ENCODING_PACKBITS
        )
    except ValueError as exc:
        raise BadRequest(f"image.array: {exc}") from None


def transform_proto(transform: Letterbox) -> pb.Transform:
    return pb.Transform(
        original_width=transform.original_width,
        original_height=transform.original_height,
        scale=transform.scale,
        pad_left=transform.pad_left,
        pad_top=transform.pad_top,
        resized_width=transform.resized_width,
        resized_height=transform.resized_height,
        model_size=transform.size,
        scale_x=transform.scale_x,
        scale_y=transform.scale_y,
    )


def image_info_proto(prepared: PreparedImage) -> pb.ImageInfo:
    """Every field from ingest's typed record; the enums share their names with ingest's."""
    info = prepared.decoded.info
    identity = info.identity
    message = pb.ImageInfo(
        kind=pb.InputKind.Value(f"INPUT_KIND_{info.kind.name}"),
        width=info.columns,
        height=info.rows,
        frames=info.frames,
        frame=info.frame,
        photometric_interpretation=info.photometric_interpretation,
        transfer_syntax=info.transfer_syntax,
        transfer_syntax_uid=info.transfer_syntax_uid,
        modality=identity.modality,
        window=pb.Window(center=info.window.center, width=info.window.width),
        sop_class_uid=identity.sop_class_uid,
        sop_instance_uid=identity.sop_instance_uid,
        series_instance_uid=identity.series_instance_uid,
        study_instance_uid=identity.study_instance_uid,
        frame_of_reference_uid=identity.frame_of_reference_uid,
    )
    spacing = info.pixel_spacing
    if spacing is not None:
        message.pixel_spacing.CopyFrom(
            pb.PixelSpacing(
                row_mm=spacing.row_mm,
                column_mm=spacing.column_mm,
                source=pb.PixelSpacingSource.Value(f"PIXEL_SPACING_SOURCE_{spacing.source.name}"),
            )
        )
    return message


def ndarray_proto(wire: WireArray) -> pb.NDArray:
    encoding = pb.ARRAY_ENCODING_PACKBITS if wire.packbits else pb.ARRAY_ENCODING_RAW
    return pb.NDArray(data=wire.data, shape=list(wire.shape), dtype=wire.dtype, encoding=encoding)


def prompt_result(
    *, prompt: str, category: str, score: float, summary: MaskSummary, model: str, box: pb.Box | None = None
) -> pb.PromptResult:
    result = pb.PromptResult(
        prompt=prompt,
        category=category,
        score=score,
        area_pixels=summary.area_pixels,
        mask_box=box_proto(summary.original_box) if summary.original_box else pb.Box(),
        model=model,
    )
    if box is not None:
        result.box.CopyFrom(box)
    return result


def ai_results(
    *,
    classification: pb.ClassifyResponse | None = None,
    detection: pb.DetectResponse | None = None,
    segmentation: pb.SegmentResponse | None = None,
    masks: np.ndarray | None = None,
) -> AIResults:
    """An answer's results as the DICOM builders take them; ``masks`` on the original grid [N, H, W]."""
    found_classification = None
    if classification is not None and classification.scores:
        found_classification = Classification(
            label=classification.top_label,
            score=classification.top_score,
            algorithm=Algorithm(classification.model.name, classification.model.version),
        )
    found_detections = None
    if detection is not None:
        found_detections = Detections(
            items=[Detection(box=box_tuple(d.box), label=d.label, score=d.score) for d in detection.detections],
            algorithm=Algorithm(detection.model.name, detection.model.version),
        )
    segments: list[Segment] = []
    if segmentation is not None:
        versions = {model.name: model.version for model in segmentation.models}
        boxes = 0
        for result in segmentation.prompts:
            is_box = result.HasField("box")
            boxes += is_box
            segments.append(
                Segment(
                    label=f"box {boxes}" if is_box else result.prompt,
                    category=result.category,
                    score=result.score,
                    algorithm=Algorithm(result.model, versions.get(result.model, "")),
                    prompt=None if is_box else result.prompt,
                )
            )
    return AIResults(
        classification=found_classification,
        detections=found_detections,
        segments=segments,
        masks=masks if segments else None,
    )


def dicom_object_proto(result: DicomResult) -> pb.DicomObject:
    return pb.DicomObject(
        data=result.data,
        sop_class_uid=result.sop_class_uid,
        sop_instance_uid=result.sop_instance_uid,
        series_instance_uid=result.series_instance_uid,
        kind=result.kind,
    )


def impression_proto(answer: ImpressionAnswer, evidence: int) -> report_pb2.ImpressionResponse:
    return report_pb2.ImpressionResponse(
        impression=answer.impression,
        score=answer.score,
        agreement=answer.agreement,
        top_similarity=answer.top_similarity,
        coverage=answer.coverage,
        evidence=[
            report_pb2.Evidence(
                report_id=int(item.get("report_id", 0)),
                similarity=float(item.get("similarity", 0.0)),
                findings=str(item.get("findings", "")),
                impression=str(item.get("impression", "")),
            )
            for item in answer.evidence[:evidence]
        ],
    )
