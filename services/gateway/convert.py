"""Protobuf <-> domain values for the Inference and Report services: the one module that builds their messages.

Pure translation: no pixel loops here (those run on the executor in :mod:`services.imaging.masks`).
"""

from __future__ import annotations

import numpy as np

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import report_pb2
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
