"""Reading DICOM attributes defensively: a malformed value becomes None or a domain error, never a leak."""

from __future__ import annotations

import math
import re
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from services.imaging.errors import InvalidImage

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CS_RE = re.compile(r"^[A-Z0-9_ ]{1,16}$")


def get(ds: Dataset, keyword: str) -> Any:
    """An element's value, or None; value conversion errors become None, never a leak."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword)
    except Exception:
        raise InvalidImage(f"DICOM attribute {keyword} is malformed") from None
    if value is None or value == "":
        if default is None:
            raise InvalidImage(f"DICOM attribute {keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidImage(f"DICOM attribute {keyword} is not an integer") from None


def float_value(value: Any) -> float | None:
    """A finite number from a DS/FD value (the first of several), else None."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def looks_like_cs(value: str) -> bool:
    return bool(_CS_RE.match(value))


def cs(ds: Dataset, keyword: str) -> str | None:
    """A code string attribute, only when it looks like one (so free text never leaks)."""
    value = get(ds, keyword)
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if looks_like_cs(value) else None


def uid(ds: Dataset, keyword: str) -> str | None:
    """A UID attribute, only when it is digits and dots of at most 64 characters."""
    value = get(ds, keyword)
    if not isinstance(value, str):
        return None
    value = value.strip("\x00 ")
    return value if len(value) <= 64 and _UID_RE.match(value) else None


def functional(ds: Dataset, index: int, sequence: str) -> list[Dataset]:
    """Items of a functional group macro for this frame: per-frame first, then shared."""
    found: list[Dataset] = []
    for groups_keyword, at in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = get(ds, groups_keyword)
        if groups and len(groups) > at:
            items = get(groups[at], sequence)
            if items:
                found.append(items[0])
    return found
