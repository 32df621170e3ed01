"""Comprehensive 3D SR holding a TID 1500 Measurement Report of an answer.

- the classification: a TID 1501 group with the qualitative evaluation Classification = the top label
  (SNOMED CT) and its Certainty of Finding (the score as a percentage), referencing the source image;
- each detection: a TID 1410 planar ROI, its box as a closed POLYLINE in the source frame's pixel
  coordinates (SCOORD: 0\\0 is the top-left corner of the top-left pixel), finding type, finding site
  and certainty;
- each segment: a TID 1411 ROI defined by its segment of the SEG (same tracking UID as the SEG's
  segment), finding category and type, and certainty.

Each group names its algorithm (Triton model name and version, family Artificial Intelligence). The
observer context is the device (medgate with its models). AI results are UNVERIFIED and PRELIMINARY
with a series description saying they are not for diagnostic use; a reviewer's verified result
(:func:`build_sr` with ``verification``) is VERIFIED and FINAL, names the reviewer as the person
observer and verifying observer, and lists the AI SR it verifies as its predecessor document.
"""

from __future__ import annotations

import datetime
import time
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.uid import generate_uid

from services.dicom.results import codes
from services.dicom.results.errors import DicomResultError
from services.dicom.results.inputs import AIResults, Algorithm, Device, DicomResult, SegReference
from services.dicom.results.part10 import part10
from services.dicom.results.seg import contributing_equipment
from services.dicom.results.source import SourceFrame, silenced

SR_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "medgate AI result - not for diagnostic use"
VERIFIED_SR_SERIES_NUMBER = 9903
VERIFIED_SR_SERIES_DESCRIPTION = "medgate AI result verified by a reviewer"


@dataclass(frozen=True)
class Verification:
    """Who verified a result, and what they verified: the AI SR (study, series and SOP instance UIDs)."""

    reviewer_name: str  # a DICOM person name, e.g. "Lee^Dana"
    organization: str
    verified_at: datetime.datetime
    predecessor_study_uid: str
    predecessor_series_uid: str
    predecessor_sop_instance_uid: str
    predecessor_sop_class_uid: str = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR Storage
    reviewer_login: str = ""  # the reviewer's identity (token subject), written as the person's login name


def _algorithm_id(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=codes.safe_text(algorithm.name, 64) or "model",
        version=codes.safe_text(algorithm.version, 64) or "0",
        family=codes.fresh(codes.ARTIFICIAL_INTELLIGENCE),
    )


def _algorithm_or_none(algorithm: Algorithm | None) -> hd.sr.AlgorithmIdentification | None:
    return _algorithm_id(algorithm) if algorithm is not None else None


def _certainty(score: float | None, algorithm: Algorithm | None) -> list[hd.sr.Measurement] | None:
    """The model's score as Certainty of Finding in %; none for what a reviewer stated."""
    if score is None:
        return None
    return [
        hd.sr.Measurement(
            name=codes.fresh(codes.CERTAINTY_OF_FINDING),
            value=round(float(np.clip(score, 0.0, 1.0)) * 100.0, 3),
            unit=codes.fresh(codes.PERCENT),
            algorithm_id=_algorithm_or_none(algorithm),
        )
    ]


def _observation_context(device: Device, verification: Verification | None) -> hd.sr.ObservationContext:
    device_context = hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device.uid,
            name=device.manufacturer,
            manufacturer_name=device.manufacturer,
            model_name=device.model_name,
        ),
    )
    person_context = None
    if verification is not None:
        person_context = hd.sr.ObserverContext(
            observer_type=dicom_codes.DCM.Person,
            observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(
                name=verification.reviewer_name,
                login_name=codes.safe_text(verification.reviewer_login, 64) or None,
                organization_name=codes.safe_text(verification.organization, 64) or None,
            ),
        )
    return hd.sr.ObservationContext(observer_person_context=person_context, observer_device_context=device_context)


def measurement_groups(
    source: SourceFrame, results: AIResults, seg: SegReference | None
) -> list[
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
]:
    src = source.dataset
    frames = source.frame_numbers
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = []
    if results.classification is not None:
        c = results.classification
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=generate_uid(), identifier=f"classification: {codes.safe_text(c.label, 64)}"
                ),
                algorithm_id=_algorithm_or_none(c.algorithm),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.fresh(codes.CLASSIFICATION), codes.label_code(c.label))
                ],
                measurements=_certainty(c.score, c.algorithm),
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src, frames)],
            )
        )
    if results.detections is not None and not results.detections.items:
        # Nothing detected is a result too (and TID 1500 needs at least one group): Finding = Absent.
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="detection: none"),
                algorithm_id=_algorithm_or_none(results.detections.algorithm),
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(codes.fresh(codes.FINDING), codes.fresh(codes.ABSENT))
                ],
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(src, frames)],
            )
        )
    if results.detections is not None:
        algorithm = results.detections.algorithm
        for number, d in enumerate(results.detections.items, start=1):
            x0, y0, x1, y1 = (float(v) for v in d.box)
            polyline = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)
            site = codes.label_site(d.label)
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=generate_uid(), identifier=f"detection {number}: {codes.safe_text(d.label, 64)}"
                    ),
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=polyline,
                        source_image=hd.sr.SourceImageForRegion.from_source_image(src, frames),
                    ),
                    finding_type=codes.label_code(d.label),
                    finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
                    algorithm_id=_algorithm_or_none(algorithm),
                    measurements=_certainty(d.score, algorithm),
                )
            )
    if seg is not None:
        tracking = zip(results.segments, seg.tracking_ids, seg.tracking_uids, strict=True)
        for number, (segment, tracking_id, tracking_uid) in enumerate(tracking, start=1):
            coded = codes.segment_codes(segment.prompt, segment.category)
            sites = [hd.sr.FindingSite(coded.type, laterality=coded.modifier)] if coded.modifier is not None else None
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=tracking_id),
                    referenced_segment=hd.sr.ReferencedSegment(
                        sop_class_uid=seg.sop_class_uid,
                        sop_instance_uid=seg.sop_instance_uid,
                        segment_number=number,
                        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(src, frames)],
                    ),
                    finding_category=coded.category,
                    finding_type=coded.type,
                    finding_sites=sites,
                    algorithm_id=_algorithm_or_none(segment.algorithm),
                    measurements=_certainty(segment.score, segment.algorithm),
                )
            )
    return groups


def build_sr(
    source: SourceFrame,
    results: AIResults,
    *,
    device: Device,
    seg: SegReference | None = None,
    verification: Verification | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
    uids: tuple[str, str] | None = None,
) -> DicomResult:
    """The TID 1500 report as a Comprehensive 3D SR (Part 10 bytes); ``seg`` is the SEG it references, if any.

    ``uids``: its (series, SOP instance) UIDs, when the caller derives them (the same verified result built
    twice is then the same object, which the DICOM node sends once); new ones otherwise.
    """
    series_uid, instance_uid = uids or (generate_uid(), generate_uid())
    started = time.perf_counter()
    verified = verification is not None
    with silenced():
        try:
            report = hd.sr.MeasurementReport(
                observation_context=_observation_context(device, verification),
                procedure_reported=codes.fresh(codes.IMAGING_PROCEDURE),
                imaging_measurements=measurement_groups(source, results, seg) or None,
                title=dicom_codes.DCM.ImagingMeasurementReport,
            )
            evidence = [source.dataset] + ([_stand_in(seg)] if seg is not None else [])
            observer = verification.reviewer_name if verification is not None else None
            organization = (codes.safe_text(verification.organization, 64) or "unknown") if verification else None
            previous = [_predecessor(verification)] if verification is not None else None
            sr = hd.sr.Comprehensive3DSR(
                evidence=evidence,
                content=report,
                series_instance_uid=series_uid,
                series_number=series_number or (VERIFIED_SR_SERIES_NUMBER if verified else SR_SERIES_NUMBER),
                sop_instance_uid=instance_uid,
                instance_number=1,
                manufacturer=device.manufacturer,
                is_complete=True,
                is_final=verified,
                is_verified=verified,
                series_description=series_description
                or (VERIFIED_SR_SERIES_DESCRIPTION if verified else SR_SERIES_DESCRIPTION),
                manufacturer_model_name=device.model_name,
                software_versions=device.software_versions,
                device_serial_number=device.uid,
                contributing_equipment=contributing_equipment(device, results.algorithms()),
                verifying_observer_name=observer,
                verifying_organization=organization,
                previous_versions=previous,
            )
        except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
            raise DicomResultError(
                f"DICOM results: no conforming SR can be built from this source's header ({type(exc).__name__})"
            ) from None
        if verification is not None:
            _set_verification_datetime(sr, verification.verified_at)
        data = part10(sr)
    return DicomResult(
        kind="SR",
        data=data,
        sop_class_uid=str(sr.SOPClassUID),
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        study_instance_uid=str(sr.StudyInstanceUID),
        build_ms=(time.perf_counter() - started) * 1000.0,
    )


def _identifiers(study: str, series: str, instance: str, sop_class: str) -> Dataset:
    """A stand-in for an object with the four identifiers highdicom's evidence and previous versions read."""
    ds = Dataset()
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.SOPInstanceUID = instance
    ds.SOPClassUID = sop_class
    return ds


def _stand_in(seg: SegReference) -> Dataset:
    return _identifiers(seg.study_instance_uid, seg.series_instance_uid, seg.sop_instance_uid, seg.sop_class_uid)


def _predecessor(verification: Verification) -> Dataset:
    return _identifiers(
        verification.predecessor_study_uid,
        verification.predecessor_series_uid,
        verification.predecessor_sop_instance_uid,
        verification.predecessor_sop_class_uid,
    )


def _set_verification_datetime(sr: Dataset, when: datetime.datetime) -> None:
    for item in sr.get("VerifyingObserverSequence", []):
        item.VerificationDateTime = when.astimezone(datetime.UTC).strftime("%Y%m%d%H%M%S+0000")
