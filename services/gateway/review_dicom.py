"""What a routed case keeps for the reviewer's verified DICOM result: the source's header and the AI objects.

The gateway hands the answer's SEG and SR (``output.dicom_results``) to routing; each case then carries
:class:`ReviewDicomSource` (the source's header bytes, the frame, the AI SR and SEG identifiers, the models) to the
review service, which builds the VERIFIED SR from it when the loop completes (services/review/completion.py).
Pure: no gRPC.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import pydicom

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import review_pb2 as rpb
from services.dicom.results.source import header_bytes
from services.imaging.ingest.quiet import quiet
from services.imaging.prepare import PreparedImage


def review_dicom_source(
    data: bytes,
    *,
    frame: int,
    study_instance_uid: str,
    objects: Sequence[pb.DicomObject],
    models: Mapping[str, pb.ModelRef],
) -> rpb.ReviewDicomSource | None:
    """What a routed case keeps for its verified DICOM result: the source's header (its bytes up to the pixel
    data, :func:`~services.dicom.results.source.header_bytes`: the verified SR and SEG copy attributes, never
    pixels), the frame, the AI SR (and SEG, with its segments' tracking IDs and UIDs read from its header) of this
    answer, the models per task ("classify", "detect", "segment"). None without an AI SR (the answer was not
    written as DICOM)."""
    source = rpb.ReviewDicomSource(data=header_bytes(data), frame=frame)
    for item in objects:
        reference = rpb.DicomReference(
            study_instance_uid=study_instance_uid,
            series_instance_uid=item.series_instance_uid,
            sop_instance_uid=item.sop_instance_uid,
            sop_class_uid=item.sop_class_uid,
        )
        if item.kind == "SR":
            source.ai_sr.CopyFrom(reference)
        elif item.kind == "SEG":
            source.ai_seg.CopyFrom(reference)
            with quiet():
                seg = pydicom.dcmread(io.BytesIO(item.data), stop_before_pixels=True)
            for segment in seg.get("SegmentSequence", []):
                source.seg_tracking_ids.append(str(segment.get("TrackingID", "")))
                source.seg_tracking_uids.append(str(segment.get("TrackingUID", "")))
    if not source.HasField("ai_sr"):
        return None
    for task, model in models.items():
        if model.name:
            source.models[task].CopyFrom(model)
    return source


def case_dicom_source(
    image: pb.ImageInput,
    prepared: PreparedImage,
    dicom_results: Sequence[pb.DicomObject],
    classification: pb.ClassifyResponse | None,
    detection: pb.DetectResponse | None,
    segmentation: pb.SegmentResponse | None,
) -> rpb.ReviewDicomSource | None:
    """:func:`review_dicom_source` of one answer; None when it was not written as DICOM."""
    if not dicom_results:
        return None
    models = {}
    if classification is not None:
        models["classify"] = classification.model
    if detection is not None:
        models["detect"] = detection.model
    if segmentation is not None and segmentation.models:
        models["segment"] = segmentation.models[0]
    info = prepared.decoded.info
    return review_dicom_source(
        image.data,
        frame=info.frame,
        study_instance_uid=info.identity.study_instance_uid,
        objects=dicom_results,
        models=models,
    )
