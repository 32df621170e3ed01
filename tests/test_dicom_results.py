"""DICOM results (SEG and TID 1500 SR): dciodvfy-clean, read back by highdicom, exact masks, right references.

The pure builders run on real DICOM from pydicom and pydicom-data (a 2-D radiograph, a CT slice, an
enhanced multi-frame CT and a classic multi-frame ultrasound) without Triton; the end-to-end tests
go through the real gateway and ``medgate infer``/``medgate batch``. dciodvfy (Debian's dicom3tools)
is required in CI; on a workstation without it those checks are skipped.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import cast

import grpc
import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from clients.cli import main as cli_main
from clients.infer import array_of
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.dicom.results import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    DicomResult,
    DicomResultError,
    Segment,
    Verification,
    build_dicom_results,
    build_verified_results,
    codes,
    read_source,
)
from services.gateway.server import GatewayServer
from services.imaging.limits import IngestLimits
from services.imaging.prepare import PreparedImage, prepare
from services.security.identity import Role
from tests.conftest import Clients
from tests.fixtures import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    phantom,
    png_bytes,
    pydicom_data_file,
)

LIMITS = IngestLimits()
CANARIES = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE)
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"

# (file, frame asked for): a 2-D CR without FrameOfReference and with PixelSpacing 0\0, a CT slice, an enhanced
# multi-frame CT (patient coordinates: the frame is found by its plane position), a classic multi-frame US
# (no coordinates: highdicom builds one frame, the references get its frame number).
SOURCES = [
    ("RG1_UNCI.dcm", None),
    ("CT_small.dcm", None),
    ("eCT_Supplemental.dcm", 1),
    ("OBXXXX1A_rle_2frame.dcm", 0),
]


# ---------------------------------------------------------------------------------------------
# Helpers


def dciodvfy_errors(data: bytes, directory: Path) -> list[str]:
    """dciodvfy's "Error" lines for ``data`` (warnings are allowed: copied source values may be dubious)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but dicom3tools' dciodvfy is not installed: DICOM results must be validated in CI")
        pytest.skip("dicom3tools' dciodvfy is not installed (apt-get install -y dicom3tools)")
    path = directory / f"object-{len(list(directory.iterdir()))}.dcm"
    path.write_bytes(data)
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = (run.stdout + run.stderr).splitlines()
    assert any(line.strip() in ("Segmentation", "Comprehensive3DSR") for line in lines), lines[:5]
    return [line for line in lines if line.startswith("Error")]


def read(obj: DicomResult | pb.DicomObject) -> Dataset:
    return pydicom.dcmread(io.BytesIO(obj.data))


def report_of(sr: hd.sr.Comprehensive3DSR) -> hd.sr.MeasurementReport:
    """The TID 1500 root of an SR that highdicom read back."""
    return cast(hd.sr.MeasurementReport, sr.content)


def seg_masks(seg: hd.seg.Segmentation, source: Dataset, frame: int, segments: int) -> np.ndarray:
    """The SEG's masks [N, rows, columns] found through its references to the source (instance, frame)."""
    numbers = list(range(1, segments + 1))
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        pixels = seg.get_pixels_by_source_frame(
            source_sop_instance_uid=source.SOPInstanceUID, source_frame_numbers=[frame + 1], segment_numbers=numbers
        )
    else:
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=numbers
        )
    return np.moveaxis(np.asarray(pixels[0]), -1, 0).astype(np.uint8)


@dataclass(frozen=True)
class Built:
    data: bytes
    source: Dataset
    prepared: PreparedImage
    results: AIResults
    objects: list[DicomResult]


def model_space_masks() -> np.ndarray:
    """Three masks in the 1024 model square: two overlapping rectangles and an empty one (still stated)."""
    masks = np.zeros((3, 1024, 1024), np.uint8)
    masks[0, 200:700, 150:480] = 1
    masks[1, 400:800, 300:900] = 1
    return masks


@cache
def built(name: str, frame: int | None) -> Built:
    """The objects for one source, built as the gateway builds them (masks mapped back with the letterbox)."""
    data = pydicom_data_file(name).read_bytes()
    prepared = prepare(data, frame=frame, limits=LIMITS)
    original = prepared.transform.mask_to_original(model_space_masks())
    width, height = prepared.transform.original_width, prepared.transform.original_height
    text, box = Algorithm("segmenter_text", "1"), Algorithm("segmenter_box", "1")
    results = AIResults(
        classification=Classification("lesion", 0.8734, Algorithm("classifier", "1")),
        detections=Detections(
            [
                Detection((10.5, 20.0, width / 2, height / 3), "lesion", 0.66),
                Detection((0, 0, width, height), "x", 0.1),
            ],
            Algorithm("detector", "1"),
        ),
        segments=[
            Segment("left lung", "lung", 0.97, text, "left lung"),
            Segment("nodule", "tumor", 0.61, text, "nodule"),
            Segment("box 1", "other", 0.5, box, None),
        ],
        masks=original,
    )
    objects = build_dicom_results(data, frame=prepared.decoded.info.frame, results=results, limits=LIMITS)
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return Built(data, source, prepared, results, objects)


SOURCE_IDS = [f"{name}-frame{frame}" if frame is not None else name for name, frame in SOURCES]


# ---------------------------------------------------------------------------------------------
# The builders on real DICOM (no Triton)


@pytest.mark.parametrize(("name", "frame"), SOURCES, ids=SOURCE_IDS)
def test_every_object_passes_dciodvfy(name: str, frame: int | None, tmp_path: Path) -> None:
    b = built(name, frame)
    assert [o.kind for o in b.objects] == ["SEG", "SR"]
    for obj in b.objects:
        assert dciodvfy_errors(obj.data, tmp_path) == [], obj.kind


@pytest.mark.parametrize(("name", "frame"), SOURCES, ids=SOURCE_IDS)
def test_seg_reads_back_with_the_masks_pixel_for_pixel(name: str, frame: int | None) -> None:
    b = built(name, frame)
    seg = hd.seg.Segmentation.from_dataset(read(b.objects[0]))
    masks = b.results.masks
    assert masks is not None and masks.shape[1:] == (b.source.Rows, b.source.Columns)
    assert masks[0].any() and not masks[2].any()
    np.testing.assert_array_equal(seg_masks(seg, b.source, b.prepared.decoded.info.frame, 3), masks)
    assert seg.SegmentationType == "BINARY" and int(seg.NumberOfFrames) == 3  # empty segments are kept
    assert seg.get_segment_numbers() == [1, 2, 3]


@pytest.mark.parametrize(("name", "frame"), SOURCES, ids=SOURCE_IDS)
def test_seg_segments_are_coded_tracked_and_attributed(name: str, frame: int | None) -> None:
    b = built(name, frame)
    seg = read(b.objects[0])
    items = seg.SegmentSequence
    assert [i.SegmentLabel for i in items] == ["left lung", "nodule", "box 1"]
    lung, nodule, box = items
    assert lung.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    assert lung.SegmentedPropertyTypeCodeSequence[0].CodeValue == "39607008"  # Lung
    assert lung.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    assert nodule.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically Abnormal
    assert nodule.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"  # Nodule
    assert box.SegmentedPropertyTypeCodeSequence[0].CodeValue == "123037004"  # Body structure
    assert len({i.TrackingUID for i in items}) == 3 and all(i.TrackingID for i in items)
    for item, model in zip(items, ["segmenter_text", "segmenter_text", "segmenter_box"], strict=True):
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (model, "1")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    equipment = {(e.Manufacturer, e.get("ManufacturerModelName")) for e in seg.ContributingEquipmentSequence}
    assert {("medgate", "segmenter_text"), ("medgate", "segmenter_box")} <= equipment
    assert "not for diagnostic use" in seg.SeriesDescription


@pytest.mark.parametrize(("name", "frame"), SOURCES, ids=SOURCE_IDS)
def test_objects_are_a_new_series_in_the_source_study_referencing_the_source(name: str, frame: int | None) -> None:
    b = built(name, frame)
    src = b.source
    seg, sr = (read(o) for o in b.objects)
    multiframe = int(src.get("NumberOfFrames", 1) or 1) > 1
    analysed = b.prepared.decoded.info.frame + 1
    for obj, ds in zip(b.objects, (seg, sr), strict=True):
        assert ds.StudyInstanceUID == src.StudyInstanceUID == obj.study_instance_uid
        assert ds.SeriesInstanceUID == obj.series_instance_uid != src.SeriesInstanceUID
        assert ds.SOPInstanceUID == obj.sop_instance_uid and ds.SOPClassUID == obj.sop_class_uid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.PatientID == src.PatientID and ds.PatientName == src.PatientName  # copied: correct DICOM
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert (seg.SOPClassUID, sr.SOPClassUID) == (SEG_STORAGE, COMPREHENSIVE_3D_SR)
    # SEG: every frame derives from the source instance (and the analysed frame of a multi-frame source).
    referenced = seg.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == src.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    for group in seg.PerFrameFunctionalGroupsSequence:
        item = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert item.ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert item.get("ReferencedFrameNumber") == (analysed if multiframe else None)
    if "ImageOrientationPatient" not in src and "SharedFunctionalGroupsSequence" not in src:
        assert "PatientOrientation" in seg
    # SR: the source and the SEG are its evidence; its regions and segments point at them.
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert evidence == {src.SOPInstanceUID, seg.SOPInstanceUID}


@pytest.mark.parametrize(("name", "frame"), SOURCES, ids=SOURCE_IDS)
def test_sr_reports_every_result_unverified(name: str, frame: int | None) -> None:
    b = built(name, frame)
    src, seg = b.source, read(b.objects[0])
    sr = hd.sr.Comprehensive3DSR.from_dataset(read(b.objects[1]))
    assert (sr.VerificationFlag, sr.CompletionFlag, sr.PreliminaryFlag) == ("UNVERIFIED", "COMPLETE", "PRELIMINARY")
    assert "not for diagnostic use" in sr.SeriesDescription
    assert read(b.objects[1]).ContentTemplateSequence[0].TemplateIdentifier == "1500"
    report = report_of(sr)
    observer = report.get_observer_contexts()
    assert [str(o.observer_type.value) for o in observer] == ["121007"]  # Device
    device = observer[0].observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes) and device.model_name is not None
    assert "classifier 1" in device.model_name and "detector 1" in device.model_name
    # The classification: Classification = Lesion, certainty 87.34 %, on the source image.
    (image_group,) = report.get_image_measurement_groups()
    (evaluation,) = [q for q in image_group.get_qualitative_evaluations() if q.name == codes.CLASSIFICATION]
    assert evaluation.value == codes.LESION
    (certainty,) = image_group.get_measurements()
    assert certainty.name == codes.CERTAINTY_OF_FINDING and abs(certainty.value - 87.34) < 1e-6
    assert image_group.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID
    # Detections: closed polylines in the source's pixel coordinates, with finding type, site and certainty.
    planar = report.get_planar_roi_measurement_groups()
    assert len(planar) == 2
    width, height = b.prepared.transform.original_width, b.prepared.transform.original_height
    first = planar[0].roi
    assert isinstance(first, hd.sr.ImageRegion)
    assert first.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    points = first.value
    np.testing.assert_allclose(points[0], points[-1])
    np.testing.assert_allclose(points.min(axis=0), [10.5, 20.0], atol=1e-3)
    np.testing.assert_allclose(points.max(axis=0), [width / 2, height / 3], atol=1e-2)
    region_source = first.ContentSequence[0].ReferencedSOPSequence[0]
    assert region_source.ReferencedSOPInstanceUID == src.SOPInstanceUID
    if int(src.get("NumberOfFrames", 1) or 1) > 1:
        assert region_source.ReferencedFrameNumber == b.prepared.decoded.info.frame + 1
    assert planar[0].finding_type == codes.LESION and planar[0].finding_sites[0].value == codes.LUNG
    uncoded = planar[1].finding_type  # a label we cannot code is not faked as SNOMED CT
    assert uncoded is not None and uncoded.scheme_designator == "99MEDGATE"
    assert abs(planar[0].get_measurements()[0].value - 66.0) < 1e-6
    # Segments: each points at its segment of the SEG, with the SEG's tracking UID.
    volumetric = report.get_volumetric_roi_measurement_groups()
    for number, (group, item) in enumerate(zip(volumetric, seg.SegmentSequence, strict=True), start=1):
        segment = group.referenced_segment
        assert isinstance(segment, hd.sr.ReferencedSegment)
        assert segment.referenced_segment_numbers == [number]
        assert segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert group.tracking_uid == item.TrackingUID
    assert volumetric[0].finding_sites[0].laterality == codes.LEFT


# ---------------------------------------------------------------------------------------------
# A reviewer's decision as DICOM (VERIFIED SR, a SEG where masks changed)


def _verification(ai_sr: DicomResult) -> Verification:
    return Verification(
        reviewer_name="Lee^Dana",
        organization="Radiology",
        verified_at=datetime.datetime(2026, 12, 1, 9, 30, tzinfo=datetime.UTC),
        predecessor_study_uid=ai_sr.study_instance_uid,
        predecessor_series_uid=ai_sr.series_instance_uid,
        predecessor_sop_instance_uid=ai_sr.sop_instance_uid,
        reviewer_login="issuer#dana",
    )


def _check_verified(sr_object: DicomResult, ai_sr: DicomResult, tmp_path: Path) -> hd.sr.MeasurementReport:
    assert dciodvfy_errors(sr_object.data, tmp_path) == []
    raw = read(sr_object)
    assert (raw.VerificationFlag, raw.CompletionFlag, raw.PreliminaryFlag) == ("VERIFIED", "COMPLETE", "FINAL")
    verifier = raw.VerifyingObserverSequence[0]
    assert str(verifier.VerifyingObserverName) == "Lee^Dana"
    assert verifier.VerificationDateTime.startswith("20261201093000")
    predecessor = raw.PredecessorDocumentsSequence[0]
    assert predecessor.StudyInstanceUID == ai_sr.study_instance_uid
    assert predecessor.ReferencedSeriesSequence[0].SeriesInstanceUID == ai_sr.series_instance_uid
    assert predecessor.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        ai_sr.sop_instance_uid
    )
    assert raw.SeriesInstanceUID != ai_sr.series_instance_uid and raw.StudyInstanceUID == ai_sr.study_instance_uid
    report = report_of(hd.sr.Comprehensive3DSR.from_dataset(raw))
    observers = {str(o.observer_type.value) for o in report.get_observer_contexts()}
    assert observers == {"121006", "121007"}  # the reviewer (Person) and medgate (Device)
    return report


def test_an_accepted_result_is_verified_and_points_at_the_ai_seg(tmp_path: Path) -> None:
    b = built("RG1_UNCI.dcm", None)
    ai_seg, ai_sr = b.objects
    objects = build_verified_results(
        b.data, frame=0, reviewed=b.results, verification=_verification(ai_sr), limits=LIMITS, ai_seg=ai_seg.segments
    )
    assert [o.kind for o in objects] == ["SR"]  # nothing changed: no new SEG
    report = _check_verified(objects[0], ai_sr, tmp_path)
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert {g.referenced_segment.referenced_sop_instance_uid for g in volumetric if g.referenced_segment} == {
        ai_seg.sop_instance_uid
    }
    assert ai_seg.segments is not None and [g.tracking_uid for g in volumetric] == list(ai_seg.segments.tracking_uids)
    (group,) = report.get_image_measurement_groups()
    assert group.get_measurements()[0].value == pytest.approx(87.34)  # the model's score, accepted


def test_corrections_are_verified_and_a_changed_mask_is_a_new_seg(tmp_path: Path) -> None:
    b = built("CT_small.dcm", None)
    ai_seg, ai_sr = b.objects
    assert b.results.masks is not None and b.results.detections is not None
    masks = b.results.masks.copy()
    masks[1] = 0
    masks[1, 30:60, 40:90] = 1  # the reviewer redrew the nodule
    segments = list(b.results.segments)
    segments[1] = Segment("nodule", "tumor", None, segments[1].algorithm, "nodule", edited=True)
    reviewed = AIResults(
        classification=Classification("normal", None, None),  # the reviewer's class: no score, no algorithm
        detections=Detections([Detection((5.0, 6.0, 50.0, 60.0), "lesion", None)], None),
        segments=segments,
        masks=masks,
    )
    objects = build_verified_results(
        b.data, frame=0, reviewed=reviewed, verification=_verification(ai_sr), limits=LIMITS, ai_seg=ai_seg.segments
    )
    assert [o.kind for o in objects] == ["SEG", "SR"]
    new_seg = objects[0]
    assert dciodvfy_errors(new_seg.data, tmp_path) == []
    seg = hd.seg.Segmentation.from_dataset(read(new_seg))
    np.testing.assert_array_equal(seg_masks(seg, b.source, 0, 3), masks)
    kinds = [item.SegmentAlgorithmType for item in seg.SegmentSequence]
    assert kinds == ["AUTOMATIC", "SEMIAUTOMATIC", "AUTOMATIC"]
    assert new_seg.series_instance_uid != ai_seg.series_instance_uid
    report = _check_verified(objects[1], ai_sr, tmp_path)
    (group,) = report.get_image_measurement_groups()
    (evaluation,) = [q for q in group.get_qualitative_evaluations() if q.name == codes.CLASSIFICATION]
    assert evaluation.value == codes.NORMAL and group.get_measurements() == []
    (box,) = report.get_planar_roi_measurement_groups()
    assert box.get_measurements() == []
    assert "111001" not in {i.ConceptNameCodeSequence[0].CodeValue for i in box[0].ContentSequence}  # no Algorithm
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert {g.referenced_segment.referenced_sop_instance_uid for g in volumetric if g.referenced_segment} == {
        new_seg.sop_instance_uid
    }


# ---------------------------------------------------------------------------------------------
# Codes, errors and patient data


def test_codes_from_prompts_and_categories() -> None:
    assert codes.segment_codes("Right  Lung", "lung").modifier == codes.RIGHT
    assert codes.segment_codes("heart", "heart anatomies").type == codes.HEART
    assert codes.segment_codes("a prompt of a user's own model", "tumor").type == codes.NEOPLASM
    assert codes.segment_codes(None, "other").type == codes.BODY_STRUCTURE
    assert codes.segment_codes("something", "no such category").type == codes.BODY_STRUCTURE
    for category in codes.CATEGORY_CODES.values():
        assert category.category.scheme_designator == category.type.scheme_designator == "SCT"
    assert len(codes.CATEGORY_CODES) == 16  # MedImageParse's 16 categories
    odd = codes.private_code("Ground\\glass\x00 opacity")
    assert odd.scheme_designator == "99MEDGATE" and "\\" not in odd.meaning and "\x00" not in odd.meaning
    # Each use gets its own item: an edit to one data set never reaches another or the table.
    first, second = codes.segment_codes("left lung", "lung"), codes.segment_codes("left lung", "lung")
    assert first.type is not second.type and first.type is not codes.LUNG


def _phantom_dicom(**changes: object) -> bytes:
    data = dicom_bytes(phantom(7, lesion_probability=1.0).image)
    ds = pydicom.dcmread(io.BytesIO(data))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns (quoting them) about the malformed values set here
        for keyword, value in changes.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _classification_only() -> AIResults:
    return AIResults(classification=Classification("normal", 0.9, Algorithm("classifier", "1")))


def test_patient_data_is_copied_into_the_objects_but_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    data = _phantom_dicom()
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        objects = build_dicom_results(data, frame=0, results=_classification_only(), limits=LIMITS)
    (sr,) = objects
    assert str(read(sr).PatientName) == PATIENT_NAME  # the SR belongs to this patient: correct DICOM
    for canary in CANARIES:
        assert canary not in caplog.text
        assert not any(canary in str(w.message) for w in caught)


def test_a_malformed_value_holding_patient_data_never_reaches_logs_warnings_or_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # pydicom warns about (and quotes) an invalid date; highdicom may refuse it: neither may show the value.
    data = _phantom_dicom(StudyDate=PATIENT_ID, AccessionNumber=PATIENT_NAME * 3)
    caplog.clear()  # making the file warned (the test's own pydicom calls); what follows must not
    caplog.set_level(logging.DEBUG)
    message = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build_dicom_results(data, frame=0, results=_classification_only(), limits=LIMITS)
        except DicomResultError as exc:
            message = str(exc)
    for canary in CANARIES:
        assert canary not in caplog.text and canary not in message
        assert not any(canary in str(w.message) for w in caught)


def test_a_source_without_a_study_uid_is_refused_naming_the_attribute() -> None:
    data = _phantom_dicom(StudyInstanceUID=None)
    with pytest.raises(DicomResultError, match="StudyInstanceUID") as raised:
        build_dicom_results(data, frame=0, results=_classification_only(), limits=LIMITS)
    assert not any(canary in str(raised.value) for canary in CANARIES)


def test_masks_off_the_source_grid_are_refused() -> None:
    data = pydicom_data_file("CT_small.dcm").read_bytes()
    results = AIResults(
        segments=[Segment("heart", "heart anatomies", 0.9, Algorithm("segmenter_text", "1"), "heart")],
        masks=np.zeros((1, 64, 64), np.uint8),
    )
    with pytest.raises(DicomResultError, match="do not fit"):
        build_dicom_results(data, frame=0, results=results, limits=LIMITS)


# ---------------------------------------------------------------------------------------------
# Through the real gateway and the command line


async def test_gateway_analyze_answers_with_a_seg_equal_to_its_original_masks(
    stub: pb_grpc.InferenceStub, tmp_path: Path
) -> None:
    data = pydicom_data_file("RG1_UNCI.dcm").read_bytes()
    request = pb.AnalyzeRequest(
        image=pb.ImageInput(data=data),
        tasks=[pb.TASK_CLASSIFY, pb.TASK_DETECT, pb.TASK_SEGMENT],
        prompts="left lung & right lung & heart",
        output=pb.OutputOptions(mask_space=pb.MASK_SPACE_BOTH, dicom_results=True),
    )
    response = await stub.Analyze(request)
    assert [o.kind for o in response.dicom_results] == ["SEG", "SR"]
    assert response.timings.dicom_ms > 0
    source = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    seg_object, sr_object = response.dicom_results
    seg = hd.seg.Segmentation.from_dataset(read(seg_object))
    original = array_of(response.segmentation.original_masks)
    assert original.shape == (3, source.Rows, source.Columns) and original.any()
    np.testing.assert_array_equal(seg_masks(seg, source, 0, 3), original)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["left lung", "right lung", "heart"]
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    model = response.segmentation.models[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (model.name, model.version)
    report = report_of(hd.sr.Comprehensive3DSR.from_dataset(read(sr_object)))
    detections = response.detection.detections
    assert len(report.get_planar_roi_measurement_groups()) == len(detections)
    assert len(report.get_volumetric_roi_measurement_groups()) == 3
    (group,) = report.get_image_measurement_groups()
    assert group.get_measurements()[0].value == pytest.approx(100 * response.classification.top_score, abs=1e-3)
    for obj in response.dicom_results:
        assert obj.series_instance_uid != response.image.series_instance_uid
        assert dciodvfy_errors(obj.data, tmp_path) == [], obj.kind


async def test_gateway_segment_and_classify_answer_with_their_objects(stub: pb_grpc.InferenceStub) -> None:
    data = pydicom_data_file("CT_small.dcm").read_bytes()
    segment = await stub.Segment(
        pb.SegmentRequest(
            image=pb.ImageInput(data=data),
            prompts="heart",
            boxes=[pb.Box(x0=20, y0=20, x1=90, y1=100)],
            output=pb.OutputOptions(dicom_results=True),
        )
    )
    assert [o.kind for o in segment.dicom_results] == ["SEG", "SR"]
    assert [s.SegmentLabel for s in read(segment.dicom_results[0]).SegmentSequence] == ["heart", "box 1"]
    classify = await stub.Classify(
        pb.ClassifyRequest(image=pb.ImageInput(data=data), output=pb.OutputOptions(dicom_results=True))
    )
    assert [o.kind for o in classify.dicom_results] == ["SR"]
    without = await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=data)))
    assert not without.dicom_results and without.timings.dicom_ms == 0


async def test_gateway_refuses_dicom_results_for_a_png_naming_the_option(stub: pb_grpc.InferenceStub) -> None:
    request = pb.SegmentRequest(
        image=pb.ImageInput(data=png_bytes(phantom(3).image)),
        prompts="heart",
        output=pb.OutputOptions(dicom_results=True),
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.Segment(request)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "output.dicom_results" in (raised.value.details() or "") and "PNG" in (raised.value.details() or "")


async def test_cli_infer_writes_the_objects_and_logs_no_patient_data(
    gateway: GatewayServer, clients: Clients, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = tmp_path / "phantom.dcm"
    source.write_bytes(_phantom_dicom())
    out = tmp_path / "dicom"
    caplog.set_level(logging.DEBUG)
    argv = [
        "infer",
        str(source),
        "--task",
        "classify",
        "--task",
        "detect",
        "--task",
        "segment",
        "--prompts",
        "left lung & right lung & heart",
        "--dicom-out",
        str(out),
        "--target",
        f"127.0.0.1:{gateway.port}",
        *clients.flags(Role.INFERENCE),
    ]
    assert await asyncio.to_thread(cli_main, argv) == 0
    files = sorted(out.glob("*.dcm"))
    datasets = [pydicom.dcmread(f) for f in files]
    assert sorted(d.Modality for d in datasets) == ["SEG", "SR"]
    for path, ds in zip(files, datasets, strict=True):
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert str(ds.PatientName) == PATIENT_NAME
    for canary in CANARIES:
        assert canary not in caplog.text


async def test_cli_batch_writes_dicom_results_for_dicom_files_only(
    gateway: GatewayServer, clients: Clients, tmp_path: Path
) -> None:
    studies = tmp_path / "in"
    studies.mkdir()
    (studies / "ct.dcm").write_bytes(pydicom_data_file("CT_small.dcm").read_bytes())
    (studies / "chest.png").write_bytes(png_bytes(phantom(5).image))
    out, dicom_out = tmp_path / "out", tmp_path / "dicom"
    argv = [
        "batch",
        str(studies),
        "--out",
        str(out),
        "--tasks",
        "classify,segment",
        "--prompts",
        "heart",
        "--dicom-out",
        str(dicom_out),
        "--no-progress",
        "--target",
        f"127.0.0.1:{gateway.port}",
        *clients.flags(Role.INFERENCE),
    ]
    assert await asyncio.to_thread(cli_main, argv) == 0
    datasets = [pydicom.dcmread(f) for f in sorted(dicom_out.glob("*.dcm"))]
    assert sorted(d.Modality for d in datasets) == ["SEG", "SR"]
    assert all(d.StudyInstanceUID == pydicom.dcmread(studies / "ct.dcm").StudyInstanceUID for d in datasets)
    entries = [e for p in out.rglob("*.json") for e in json.loads(p.read_text()).get("dicom_results", [])]
    assert sorted(e["kind"] for e in entries) == ["SEG", "SR"]
    for entry in entries:
        assert "data" not in entry  # the bytes live in the .dcm the entry names
        assert (out / entry["file"]).name == f"{entry['sop_instance_uid']}.dcm" and (out / entry["file"]).exists()


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "CT_small.dcm", "emri_small.dcm", "JPEG2000.dcm"])
def test_a_routed_case_keeps_the_source_header_without_its_pixels(name: str) -> None:
    """What a routed case carries to the review store for its verified result: the header only, byte for byte."""
    from services.dicom.results.source import header_bytes

    data = pydicom_data_file(name).read_bytes()
    kept = header_bytes(data)
    assert len(kept) < min(64 * 1024, len(data))  # RG1_UNCI.dcm: 2 KiB of 7.2 MB
    assert data.startswith(kept)
    whole = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    cut = pydicom.dcmread(io.BytesIO(kept))
    assert "PixelData" not in cut
    assert [(e.tag, e.value) for e in cut] == [(e.tag, e.value) for e in whole]
    assert cut.file_meta.TransferSyntaxUID == whole.file_meta.TransferSyntaxUID
    # The builders read it as they read the whole file: the same identity, grid and frames.
    assert read_source(kept, frame=0, limits=IngestLimits()).frames == read_source(
        data, frame=0, limits=IngestLimits()
    ).frames


def test_a_source_that_cannot_be_cut_safely_is_kept_whole() -> None:
    import gzip

    from services.dicom.results.source import header_bytes

    data = pydicom_data_file("CT_small.dcm").read_bytes()
    wrapped = gzip.compress(data)
    assert header_bytes(wrapped) == wrapped
    deflated = io.BytesIO()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    ds.save_as(deflated, enforce_file_format=True)
    assert header_bytes(deflated.getvalue()) == deflated.getvalue()
    assert header_bytes(b"not DICOM at all") == b"not DICOM at all"
