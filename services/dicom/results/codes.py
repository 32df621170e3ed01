"""Coded concepts for our results: SNOMED CT for what was found, DCM for how, UCUM for units.

Segments get a segmented property category (CID 7150) and type (CID 7151) from the prompt when we
know it (``left lung`` is Lung with the laterality modifier Left, ``nodule`` is Nodule), else from
MedImageParse's category of the prompt (16 categories, :data:`CATEGORY_CODES`). Every code here is a
real SNOMED CT or DICOM code; labels a user's own model brings that we cannot code go into the
private scheme ``99MEDGATE`` (PS3.16 8.2: a ``99`` prefix marks a local scheme), never invented SNOMED.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from highdicom.sr import CodedConcept


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "DCM", meaning)


# CID 7150 Segmentation Property Categories
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
BODY_SUBSTANCE = _sct("91720002", "Body Substance")

# CID 7151 Segmentation Property Types (and the SNOMED CT top concept for what a box prompt outlined)
LUNG = _sct("39607008", "Lung")
HEART = _sct("80891009", "Heart")
LIVER = _sct("10200004", "Liver")
KIDNEY = _sct("64033007", "Kidney")
PANCREAS = _sct("15776009", "Pancreas")
BRAIN = _sct("12738006", "Brain")
EYE = _sct("81745001", "Eye")
BLOOD_VESSEL = _sct("59820001", "Blood Vessel")
ORGAN = _sct("91772007", "Organ")
NEOPLASM = _sct("108369006", "Neoplasm")
LESION = _sct("52988006", "Lesion")
NODULE = _sct("27925004", "Nodule")
MASS = _sct("4147007", "Mass")
INFLAMMATION = _sct("409774005", "Inflammation")
BODY_FLUID = _sct("32457005", "Body fluid")
BODY_STRUCTURE = _sct("123037004", "Body structure")

# CID 244 Laterality (segmented property type modifiers, finding site laterality)
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")
BILATERAL = _sct("51440002", "Right and left")

NORMAL = _sct("17621005", "Normal")

# How the results were made and what they measure.
ARTIFICIAL_INTELLIGENCE = _dcm("123110", "Artificial Intelligence")  # CID 7162 Algorithm Family
PROCESSING_EQUIPMENT = _dcm("109102", "Processing Equipment")  # Contributing Equipment purpose
# The concept name of a classification (a qualitative evaluation whose value is the class).
CLASSIFICATION = _sct("278201002", "Classification")
# A score in [0, 1] is written as a percentage, as DICOM's CAD templates write certainty (TID 4101).
CERTAINTY_OF_FINDING = _dcm("111012", "Certainty of Finding")
PERCENT = CodedConcept("%", "UCUM", "Percent")
IMAGING_PROCEDURE = _sct("363679005", "Imaging procedure")
# A detection task that found nothing (or a reviewer who removed every box): Finding = Absent, stated.
FINDING = _dcm("121071", "Finding")
ABSENT = _sct("272519000", "Absent")

PRIVATE_SCHEME = "99MEDGATE"


@dataclass(frozen=True)
class SegmentCodes:
    """A segment's coded meaning: category (CID 7150), type (CID 7151), optional laterality modifier."""

    category: CodedConcept
    type: CodedConcept
    modifier: CodedConcept | None = None


_AS, _MAS = ANATOMICAL_STRUCTURE, MORPHOLOGICALLY_ABNORMAL_STRUCTURE

# MedImageParse's 16 categories (as the models answer them, lower case).
CATEGORY_CODES: dict[str, SegmentCodes] = {
    "liver": SegmentCodes(_AS, LIVER),
    "lung": SegmentCodes(_AS, LUNG),
    "kidney": SegmentCodes(_AS, KIDNEY),
    "pancreas": SegmentCodes(_AS, PANCREAS),
    "heart anatomies": SegmentCodes(_AS, HEART),
    "brain anatomies": SegmentCodes(_AS, BRAIN),
    "eye anatomies": SegmentCodes(_AS, EYE),
    "vessel": SegmentCodes(_AS, BLOOD_VESSEL),
    "other organ": SegmentCodes(_AS, ORGAN),
    "tumor": SegmentCodes(_MAS, NEOPLASM),
    "infection": SegmentCodes(_MAS, INFLAMMATION),
    "other lesion": SegmentCodes(_MAS, LESION),
    "fluid disturbance": SegmentCodes(BODY_SUBSTANCE, BODY_FLUID),
    "other abnormality": SegmentCodes(_MAS, LESION),
    "histology structure": SegmentCodes(TISSUE, TISSUE),
    # Box prompts answer "other": the box segmenter does not say what it outlined.
    "other": SegmentCodes(_AS, BODY_STRUCTURE),
}

# Prompts we know more precisely than their category (normalised: lower case, single spaces).
PROMPT_CODES: dict[str, SegmentCodes] = {
    "left lung": SegmentCodes(_AS, LUNG, LEFT),
    "right lung": SegmentCodes(_AS, LUNG, RIGHT),
    "lung": SegmentCodes(_AS, LUNG),
    "lungs": SegmentCodes(_AS, LUNG, BILATERAL),
    "both lungs": SegmentCodes(_AS, LUNG, BILATERAL),
    "lung fields": SegmentCodes(_AS, LUNG, BILATERAL),
    "heart": SegmentCodes(_AS, HEART),
    "cardiac silhouette": SegmentCodes(_AS, HEART),
    "liver": SegmentCodes(_AS, LIVER),
    "kidney": SegmentCodes(_AS, KIDNEY),
    "pancreas": SegmentCodes(_AS, PANCREAS),
    "brain": SegmentCodes(_AS, BRAIN),
    "lesion": SegmentCodes(_MAS, LESION),
    "lesions": SegmentCodes(_MAS, LESION),
    "opacity": SegmentCodes(_MAS, LESION),
    "opacities": SegmentCodes(_MAS, LESION),
    "nodule": SegmentCodes(_MAS, NODULE),
    "nodules": SegmentCodes(_MAS, NODULE),
    "mass": SegmentCodes(_MAS, MASS),
    "masses": SegmentCodes(_MAS, MASS),
    "tumor": SegmentCodes(_MAS, NEOPLASM),
    "tumors": SegmentCodes(_MAS, NEOPLASM),
    "tumour": SegmentCodes(_MAS, NEOPLASM),
    "tumours": SegmentCodes(_MAS, NEOPLASM),
}

# Labels of classifiers and detectors: what the finding is, and where (the reference detector finds lung lesions).
LABEL_CODES: dict[str, CodedConcept] = {
    "normal": NORMAL,
    "lesion": LESION,
    "nodule": NODULE,
    "mass": MASS,
    "tumor": NEOPLASM,
}
LABEL_SITES: dict[str, CodedConcept] = {"lesion": LUNG, "nodule": LUNG, "mass": LUNG}


def normalise(text: str) -> str:
    return " ".join(text.split()).lower()


def fresh(concept: CodedConcept) -> CodedConcept:
    """A new item for each use: highdicom puts the object itself into the data set, which later edits would share."""
    return CodedConcept(concept.value, concept.scheme_designator, concept.meaning)


def segment_codes(prompt: str | None, category: str) -> SegmentCodes:
    """The codes of a text prompt (None for a box prompt) answered with a MedImageParse category."""
    known = PROMPT_CODES.get(normalise(prompt)) if prompt is not None else None
    if known is None:
        known = CATEGORY_CODES.get(normalise(category), CATEGORY_CODES["other"])
    modifier = fresh(known.modifier) if known.modifier is not None else None
    return SegmentCodes(fresh(known.category), fresh(known.type), modifier)


def label_code(label: str) -> CodedConcept:
    """A classifier's or detector's label as a code: SNOMED CT when we know it, else the private scheme."""
    known = LABEL_CODES.get(normalise(label))
    if known is not None:
        return fresh(known)
    return private_code(label)


def label_site(label: str) -> CodedConcept | None:
    known = LABEL_SITES.get(normalise(label))
    return fresh(known) if known is not None else None


def private_code(label: str) -> CodedConcept:
    """A local code for a model's own label: code value = the label as a short code string, meaning = the label."""
    meaning = safe_text(label, 64) or "unnamed"
    value = re.sub(r"[^A-Za-z0-9_.-]+", "_", meaning)[:16] or "unnamed"
    return CodedConcept(value, PRIVATE_SCHEME, meaning)


def safe_text(text: str, limit: int) -> str:
    """Text for an LO/SH-like value: no backslash (the value separator) or control characters, at most ``limit``."""
    cleaned = "".join(ch if ch.isprintable() and ch != "\\" else " " for ch in text)
    return " ".join(cleaned.split())[:limit]
