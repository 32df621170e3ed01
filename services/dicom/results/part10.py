"""A built data set as DICOM Part 10 bytes (preamble, file meta, data set)."""

from __future__ import annotations

import io

from pydicom.dataset import Dataset

from services.dicom.results.errors import DicomResultError


def part10(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    try:
        dataset.save_as(buffer, enforce_file_format=True)
    except (ValueError, TypeError, OverflowError) as exc:
        # A value copied from the source that cannot be written; its message may quote it.
        raise DicomResultError(f"DICOM results: the object could not be written ({type(exc).__name__})") from None
    return buffer.getvalue()
