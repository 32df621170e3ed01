"""A reviewer's decision as DICOM: a VERIFIED SR (and a SEG where the masks changed) that points at the AI SR.

When a human loop completes, what the reviewer confirmed or corrected is written as a new
Comprehensive 3D SR in a new series of the same study: ``VerificationFlag`` VERIFIED and FINAL, the
reviewer as the person observer and the verifying observer (Verifying Observer Sequence with the
verification time), and the AI result it verifies in the Predecessor Documents Sequence (PS3.3
C.17.2.3: an instance whose content this document includes, with or without changes). What the
reviewer accepted keeps the model's algorithm and score; what they changed has neither (a corrected
class, redrawn boxes) or is a new SEG whose segments are SEMIAUTOMATIC (the model's mask, corrected)
or MANUAL (drawn). Masks the reviewer left alone are referenced in the AI SEG, not copied.

How a review answer maps onto ``reviewed`` (values the review service holds for the case):

- accept: the AI results as they were (``reviewed`` = the AI's :class:`AIResults`, ``ai_seg`` its SEG);
- a class: ``Classification(label, score=None, algorithm=None)``;
- boxes: ``Detections([Detection(box, label, score=None)...], algorithm=None)`` in source pixels;
- a mask: the segment with ``edited=True`` and ``score=None``, its mask on the source grid
  (``Letterbox.mask_to_original`` of the model-space answer), so a new SEG is written.
"""

from __future__ import annotations

from pydicom.uid import generate_uid

from services.dicom.results.inputs import AIResults, Device, DicomResult, SegReference
from services.dicom.results.seg import build_seg
from services.dicom.results.source import read_source
from services.dicom.results.sr import Verification, build_sr
from services.imaging.limits import IngestLimits

VERIFIED_SEG_SERIES_NUMBER = 9904
VERIFIED_SEG_SERIES_DESCRIPTION = "medgate AI segmentation corrected by a reviewer"


def build_verified_results(
    data: bytes,
    *,
    frame: int,
    reviewed: AIResults,
    verification: Verification,
    limits: IngestLimits,
    ai_seg: SegReference | None = None,
    device: Device | None = None,
    uid_seed: str | None = None,
) -> list[DicomResult]:
    """The reviewer's SEG (only when a mask changed or there is no AI SEG to point at) and the VERIFIED SR.

    ``uid_seed`` (e.g. the human loop's name): the objects' series and SOP instance UIDs are derived from
    it, so building the same review again (a retry after a crash) gives the same objects, sent once.
    """
    source = read_source(data, frame=frame, limits=limits)
    device = device or Device.for_algorithms(reviewed.algorithms())
    objects: list[DicomResult] = []
    segments = ai_seg
    changed = any(s.edited or s.algorithm is None for s in reviewed.segments)
    if reviewed.segments and (changed or ai_seg is None):
        if reviewed.masks is None:
            raise ValueError("reviewed segments without masks")
        seg, _ = build_seg(
            source,
            reviewed.segments,
            reviewed.masks,
            device=device,
            series_number=VERIFIED_SEG_SERIES_NUMBER,
            series_description=VERIFIED_SEG_SERIES_DESCRIPTION,
            content_description="AI segmentation corrected by a reviewer",
            uids=_uids(uid_seed, "seg"),
        )
        objects.append(seg)
        segments = seg.segments
    elif not reviewed.segments:
        segments = None
    objects.append(
        build_sr(source, reviewed, device=device, seg=segments, verification=verification, uids=_uids(uid_seed, "sr"))
    )
    return objects


def _uids(seed: str | None, kind: str) -> tuple[str, str] | None:
    if seed is None:
        return None
    return (
        generate_uid(entropy_srcs=["medgate verified", seed, kind, "series"]),
        generate_uid(entropy_srcs=["medgate verified", seed, kind, "instance"]),
    )
