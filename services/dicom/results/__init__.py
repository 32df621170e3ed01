"""An answer as DICOM result objects (IHE AI Results): a SEG of the masks and a TID 1500 Comprehensive 3D SR.

A reviewer's decision becomes a VERIFIED SR (and a SEG where masks changed) through
:func:`build_verified_results` (:mod:`.verified`).

Pure, no gRPC: the gateway calls :func:`build_dicom_results` on its executor with the request's
bytes and plain values from its answer; the DICOM node can call the same function. Built with
highdicom, the library of record; every object passes dciodvfy with 0 errors (tests/test_dicom_results.py).

>>> results = AIResults(classification=Classification("lesion", 0.93, Algorithm("classifier", "1")))  # doctest: +SKIP
>>> [obj.kind for obj in build_dicom_results(data, frame=0, results=results, limits=IngestLimits())]  # doctest: +SKIP
['SR']
"""

from __future__ import annotations

from services.dicom.results.errors import DicomResultError
from services.dicom.results.inputs import (
    AIResults,
    Algorithm,
    Classification,
    Detection,
    Detections,
    Device,
    DicomResult,
    Segment,
    SegReference,
)
from services.dicom.results.seg import build_seg
from services.dicom.results.source import SourceFrame, read_source
from services.dicom.results.sr import Verification, build_sr
from services.dicom.results.verified import build_verified_results
from services.imaging.limits import IngestLimits

__all__ = [
    "AIResults",
    "Algorithm",
    "Classification",
    "Detection",
    "Detections",
    "Device",
    "DicomResult",
    "DicomResultError",
    "SegReference",
    "Segment",
    "SourceFrame",
    "Verification",
    "build_dicom_results",
    "build_seg",
    "build_sr",
    "build_verified_results",
    "read_source",
]


def build_dicom_results(
    data: bytes, *, frame: int, results: AIResults, limits: IngestLimits, device: Device | None = None
) -> list[DicomResult]:
    """The SEG (when there are segments) and the SR of ``results`` on frame ``frame`` (0-based) of the DICOM ``data``.

    ``results.masks`` are the answer's original-space masks [N, rows, columns]. Raises
    :class:`DicomResultError` (INVALID_ARGUMENT) when the source cannot carry them.
    """
    source = read_source(data, frame=frame, limits=limits)
    device = device or Device.for_algorithms(results.algorithms())
    objects: list[DicomResult] = []
    segments = None
    if results.segments:
        if results.masks is None:
            raise ValueError("segments without masks")
        seg, _ = build_seg(source, results.segments, results.masks, device=device)
        objects.append(seg)
        segments = seg.segments
    objects.append(build_sr(source, results, device=device, seg=segments))
    return objects
