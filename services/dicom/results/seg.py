"""DICOM Segmentation (BINARY) of an answer's masks, on the source frame's own pixel grid.

One segment per prompt, in the answer's order, one frame per segment (empty ones are kept, so frame
N is segment N and a mask the model left empty is still stated). Each segment carries its label,
SNOMED CT category and type (:mod:`.codes`), the algorithm that made it (name and version of the
Triton model, family Artificial Intelligence), a tracking ID and tracking UID; Contributing
Equipment names medgate and the models. Patient, study and equipment context, PatientOrientation
and the frame of reference are the source's; the series is new, in the source's study; every frame
references the source instance (and, for a multi-frame source, the frame that was analysed).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from services.dicom.results import codes
from services.dicom.results.errors import DicomResultError
from services.dicom.results.inputs import Algorithm, Device, DicomResult, Segment, SegReference
from services.dicom.results.part10 import part10
from services.dicom.results.source import SourceFrame, silenced

SEG_SERIES_NUMBER = 9901
SEG_SERIES_DESCRIPTION = "medgate AI segmentation - not for diagnostic use"
SEG_CONTENT_LABEL = "AI_RESULT"  # CS: upper case, digits, space, underscore; 16 at most
SEG_CONTENT_DESCRIPTION = "AI segmentation, unverified, not for diagnostic use"
# Recommended display colours (RGB, shown by viewers as CIELab), in the order of `medgate infer --overlay`.
PALETTE = ((255, 200, 0), (0, 120, 255), (0, 255, 0), (255, 0, 255), (255, 0, 0), (0, 255, 255))


def contributing_equipment(device: Device, algorithms: Sequence[Algorithm]) -> list[hd.ContributingEquipment]:
    return [
        hd.ContributingEquipment(
            manufacturer=device.manufacturer,
            purpose_of_reference=codes.fresh(codes.PROCESSING_EQUIPMENT),
            manufacturer_model_name=codes.safe_text(algorithm.name, 64) or "model",
            software_versions=codes.safe_text(algorithm.version, 64) or "0",
            contribution_description=f"AI model {codes.safe_text(algorithm.describe(), 64)} run by medgate",
        )
        for algorithm in algorithms
    ]


def segment_description(number: int, segment: Segment, tracking_uid: str) -> hd.seg.SegmentDescription:
    coded = codes.segment_codes(segment.prompt, segment.category)
    label = codes.safe_text(segment.label, 64) or f"segment {number}"
    algorithm = segment.algorithm
    identification = None
    kind = hd.seg.SegmentAlgorithmTypeValues.MANUAL  # a reviewer's own mask
    if algorithm is not None:
        edited = hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC  # the model's mask, corrected by a reviewer
        kind = edited if segment.edited else hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = hd.AlgorithmIdentificationSequence(
            name=codes.safe_text(algorithm.name, 64) or "model",
            family=codes.fresh(codes.ARTIFICIAL_INTELLIGENCE),
            version=codes.safe_text(algorithm.version, 64) or "0",
        )
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=coded.category,
        segmented_property_type=coded.type,
        algorithm_type=kind,
        algorithm_identification=identification,
        tracking_uid=tracking_uid,
        tracking_id=f"segment {number}: {label}",
        display_color=hd.color.CIELabColor.from_rgb(*PALETTE[(number - 1) % len(PALETTE)]),
    )
    if coded.modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [coded.modifier]
    return description


def build_seg(
    source: SourceFrame,
    segments: Sequence[Segment],
    masks: np.ndarray,
    *,
    device: Device,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = SEG_SERIES_DESCRIPTION,
    content_description: str = SEG_CONTENT_DESCRIPTION,
    uids: tuple[str, str] | None = None,
) -> tuple[DicomResult, Dataset]:
    """The SEG as Part 10 bytes, and its data set (the SR references it). ``masks``: [N, rows, columns], 0/1.

    ``uids``: its (series, SOP instance) UIDs when the caller derives them (see :func:`.sr.build_sr`).
    """
    series_uid, instance_uid = uids or (generate_uid(), generate_uid())
    started = time.perf_counter()
    src = source.dataset
    if masks.ndim != 3 or masks.shape[0] != len(segments) or len(segments) == 0:
        raise ValueError(f"masks {masks.shape} do not match {len(segments)} segments")
    if masks.shape[1:] != (src.Rows, src.Columns):
        raise DicomResultError(
            f"DICOM results: masks of {masks.shape[2]}x{masks.shape[1]} do not fit the source's "
            f"{src.Columns}x{src.Rows} grid"
        )
    tracking_uids = [generate_uid() for _ in segments]
    descriptions = [segment_description(i + 1, s, tracking_uids[i]) for i, s in enumerate(segments)]
    # highdicom takes (frames, rows, columns, segments); one frame: the analysed one.
    pixel_array = np.ascontiguousarray(np.moveaxis(masks.astype(bool, copy=False), 0, -1)[np.newaxis])
    algorithms = list(dict.fromkeys(s.algorithm for s in segments if s.algorithm is not None))
    with silenced():
        coordinates = hd.spatial.get_image_coordinate_system(src)
        source_image = src
        plane_positions = None
        if source.multiframe and coordinates is not None:
            # The analysed frame's plane position; highdicom matches it to that source frame.
            plane_positions = [hd.utils.get_plane_positions_of_image(src)[source.frame]]
        elif source.multiframe:
            source_image = source.single_frame_view()
        try:
            seg = hd.seg.Segmentation(
                source_images=[source_image],
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=instance_uid,
                instance_number=1,
                manufacturer=device.manufacturer,
                manufacturer_model_name=device.model_name,
                software_versions=device.software_versions,
                device_serial_number=device.uid,
                omit_empty_frames=False,
                content_label=SEG_CONTENT_LABEL,
                content_description=content_description,
                series_description=series_description,
                contributing_equipment=contributing_equipment(device, algorithms),
                plane_positions=plane_positions,
            )
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise DicomResultError(
                f"DICOM results: no conforming SEG can be built from this source's header ({type(exc).__name__})"
            ) from None
        _finish(seg, source, coordinates is not None)
        data = part10(seg)
    result = DicomResult(
        kind="SEG",
        data=data,
        sop_class_uid=str(seg.SOPClassUID),
        sop_instance_uid=str(seg.SOPInstanceUID),
        series_instance_uid=str(seg.SeriesInstanceUID),
        study_instance_uid=str(seg.StudyInstanceUID),
        build_ms=(time.perf_counter() - started) * 1000.0,
        segments=SegReference(
            study_instance_uid=str(seg.StudyInstanceUID),
            series_instance_uid=str(seg.SeriesInstanceUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            sop_class_uid=str(seg.SOPClassUID),
            tracking_ids=tuple(str(item.TrackingID) for item in seg.SegmentSequence),
            tracking_uids=tuple(str(item.TrackingUID) for item in seg.SegmentSequence),
        ),
    )
    return result, seg


def _finish(seg: hd.seg.Segmentation, source: SourceFrame, has_coordinates: bool) -> None:
    """What highdicom leaves to us: the frame number of a single-frame view, a 2-D source's orientation, spacing."""
    src = source.dataset
    if source.multiframe and not has_coordinates:
        frame_number = source.frame + 1
        # highdicom shares these items with the Referenced Instance Sequence, where a frame number does not belong.
        seg.SourceImageSequence = [copy.deepcopy(item) for item in seg.get("SourceImageSequence", [])]
        for item in seg.SourceImageSequence:
            item.ReferencedFrameNumber = frame_number
        for group in seg.PerFrameFunctionalGroupsSequence:
            for derivation in group.get("DerivationImageSequence", []):
                for item in derivation.get("SourceImageSequence", []):
                    item.ReferencedFrameNumber = frame_number
    if not has_coordinates and "PatientOrientation" not in seg:
        # General Image, Type 2C: required when the image has no patient orientation of its own.
        seg.PatientOrientation = src.get("PatientOrientation", "") or ""
    shared = seg.SharedFunctionalGroupsSequence[0]
    measures = shared.get("PixelMeasuresSequence")
    if measures is not None and not has_coordinates:
        spacing = measures[0].get("PixelSpacing") if len(measures) else None
        if spacing is None or len(spacing) != 2 or not all(_positive(v) for v in spacing):
            # A 2-D source stating PixelSpacing 0\0 (pydicom-data's RG1_UNCI.dcm) would be copied as it is,
            # and a classic multi-frame source's view has a stand-in without spacing.
            del shared.PixelMeasuresSequence


def _positive(value: object) -> bool:
    try:
        return float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
