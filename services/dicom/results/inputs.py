"""What the builders are given (plain values from an answer) and what they give back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata

import numpy as np
from pydicom.uid import generate_uid

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Algorithm:
    """The model that made a result: its Triton model name and version."""

    name: str
    version: str

    def describe(self) -> str:
        return f"{self.name} {self.version}".strip()


@dataclass(frozen=True)
class Classification:
    """A class with the model's score; a reviewer's class has neither score nor algorithm (None)."""

    label: str
    score: float | None
    algorithm: Algorithm | None


@dataclass(frozen=True)
class Detection:
    """A box in the source frame's pixels: (x0, y0) top-left and (x1, y1) bottom-right, exclusive."""

    box: Box
    label: str
    score: float | None  # None: drawn or corrected by a reviewer


@dataclass(frozen=True)
class Detections:
    items: Sequence[Detection]
    algorithm: Algorithm | None  # None: the reviewer's boxes


@dataclass(frozen=True)
class Segment:
    """One prompt's result; its mask is ``masks[index]`` of :class:`AIResults`.

    ``prompt`` is the text prompt as given (None for a box prompt); ``label`` names the segment
    (the prompt, or ``box N``); ``category`` is MedImageParse's category of the prompt. ``edited``:
    a reviewer corrected the model's mask (SEMIAUTOMATIC; with no algorithm, MANUAL); ``score`` is
    None for a mask a person drew or changed.
    """

    label: str
    category: str
    score: float | None
    algorithm: Algorithm | None
    prompt: str | None = None
    edited: bool = False


@dataclass(frozen=True)
class AIResults:
    """Everything one request found on one source frame. ``masks``: [N, rows, columns] 0/1 on the source's grid."""

    classification: Classification | None = None
    detections: Detections | None = None
    segments: Sequence[Segment] = ()
    masks: np.ndarray | None = None

    def algorithms(self) -> list[Algorithm]:
        candidates = [self.classification.algorithm] if self.classification else []
        candidates += [self.detections.algorithm] if self.detections else []
        candidates += [s.algorithm for s in self.segments]
        found: list[Algorithm] = []
        for algorithm in candidates:
            if algorithm is not None and algorithm not in found:
                found.append(algorithm)
        return found


@dataclass(frozen=True)
class SegReference:
    """A SEG that an SR refers to: its identifiers and, per segment (in order), the tracking ID and UID."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    tracking_ids: tuple[str, ...]
    tracking_uids: tuple[str, ...]


def _medgate_version() -> str:
    try:
        return metadata.version("medgate")
    except metadata.PackageNotFoundError:
        return "0"


@dataclass(frozen=True)
class Device:
    """The equipment that writes the objects: medgate running these models.

    ``uid`` (the SR's device observer UID, also the SEG's DeviceSerialNumber) is derived from the
    manufacturer, the software version and the models, so the same deployment is the same device.
    """

    manufacturer: str
    model_name: str
    software_versions: str
    uid: str

    @classmethod
    def for_algorithms(cls, algorithms: Sequence[Algorithm], *, manufacturer: str = "medgate") -> Device:
        software = _medgate_version()
        names = ", ".join(a.describe() for a in algorithms) or "medgate"
        return cls(
            manufacturer=manufacturer,
            model_name=names[:64],
            software_versions=software,
            uid=generate_uid(entropy_srcs=[manufacturer, software, *(a.describe() for a in algorithms)]),
        )


@dataclass(frozen=True)
class DicomResult:
    """One Part 10 object: ``kind`` is its Modality (SEG or SR)."""

    kind: str
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    build_ms: float = 0.0
    # For a SEG: what an SR needs to refer to its segments (kept, e.g., to verify the result later).
    segments: SegReference | None = None
