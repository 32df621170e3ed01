"""The one error the DICOM result builders raise; the RPC layer answers it as INVALID_ARGUMENT."""

from __future__ import annotations

from services.imaging.errors import InvalidImage


class DicomResultError(InvalidImage):
    """The source cannot carry DICOM results (not DICOM, or a header a conforming SEG/SR cannot be built from).

    A subclass of :class:`~services.imaging.errors.InvalidImage`, so the status table maps it to
    INVALID_ARGUMENT. Messages name attribute keywords and exception types only, never a value.
    """
