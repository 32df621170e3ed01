"""DICOM through pydicom: limits from the header, one frame decoded, the typed identity and pixel spacing.

The pixel pipeline lives beside this module: :mod:`.dicom_codec` (Deflate, transfer syntax,
codestream checks, decoder plugins) and :mod:`.dicom_render` (LUTs and windows); attribute
reading that never leaks a value is :mod:`.dicom_attrs`.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from services.imaging.errors import InvalidImage, UnsupportedCodec
from services.imaging.ingest.dicom_attrs import cs, float_value, functional, get, int_attr, looks_like_cs, uid
from services.imaging.ingest.dicom_codec import (
    DEFLATED,
    DICOM_DECODER_PLUGINS,
    check_codestream,
    decode_frame,
    inflate_dicom,
    scan_file_meta,
    transfer_syntax,
    ts_label,
    ts_name,
)
from services.imaging.ingest.dicom_render import PALETTE, render_dicom
from services.imaging.ingest.guards import check_size, choose_frame, native_order
from services.imaging.ingest.image import (
    DecodedImage,
    DicomIdentity,
    ImageMetadata,
    InputKind,
    PixelSpacing,
    SpacingSource,
    Window,
)
from services.imaging.ingest.quiet import quiet
from services.imaging.ingest.sniff import SUPPORTED_FORMATS
from services.imaging.limits import IngestLimits

__all__ = ["DICOM_DECODER_PLUGINS", "decode_dicom", "dicom_identity", "pixel_spacing", "read_dicom_identity"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_IDENTITY_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
)


def decode_dicom(
    data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits, bare: bool = False
) -> DecodedImage:
    """One frame of a DICOM file (``bare``: a data set without preamble and meta)."""
    original_ts: str | None = None
    if not bare:
        meta_end, original_ts, span = scan_file_meta(data)
        if original_ts == DEFLATED and span is not None:
            data = inflate_dicom(data, meta_end, span, limits)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=bare)
    except Exception as exc:
        raise InvalidImage(f"DICOM data set could not be parsed ({type(exc).__name__})") from None

    pixel_keyword = next((kw for kw in _PIXEL_KEYWORDS if kw in ds), None)
    if pixel_keyword is None:
        if bare and "SOPClassUID" not in ds:
            raise InvalidImage(f"unrecognised input: not {SUPPORTED_FORMATS}")
        if len(ds) == 0:
            raise InvalidImage("DICOM data set is empty or unreadable (the file may be truncated)")
        if "Rows" in ds and "Columns" in ds:
            # pydicom drops a Pixel Data element cut short by the end of the file.
            raise InvalidImage("DICOM image has no usable pixel data (the file may be truncated)")
        raise InvalidImage(f"DICOM object has no pixel data{_sop_class_note(ds)}")

    rows = int_attr(ds, "Rows")
    columns = int_attr(ds, "Columns")
    bits_allocated = int_attr(ds, "BitsAllocated")
    bits_stored = int_attr(ds, "BitsStored", bits_allocated)
    pixel_representation = int_attr(ds, "PixelRepresentation", 0)
    samples = int_attr(ds, "SamplesPerPixel", 1)
    frames = int_attr(ds, "NumberOfFrames", 1) or 1
    photometric = _photometric(ds)
    if bits_allocated not in (1, 8, 16, 32, 64) or not 1 <= bits_stored <= bits_allocated:
        raise InvalidImage(f"DICOM bit depth is invalid (BitsAllocated {bits_allocated}, BitsStored {bits_stored})")
    if pixel_representation not in (0, 1):
        raise InvalidImage(f"DICOM PixelRepresentation {pixel_representation} is invalid")
    expected_samples = 3 if photometric in _COLOUR else 1
    if samples != expected_samples:
        raise InvalidImage(f"DICOM SamplesPerPixel {samples} does not fit {photometric}")
    check_size(rows, columns, frames, samples, max(1, bits_allocated // 8), limits, what="DICOM image")
    index = choose_frame(frame, frames)

    ts = transfer_syntax(ds, bare=bare)
    label = ts_label(ts)
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError:
        raise UnsupportedCodec(f"transfer syntax {label} is not supported") from None
    plugins = () if decoder.is_native else tuple(p for p in DICOM_DECODER_PLUGINS if p in decoder.available_plugins)
    if not (decoder.is_native or plugins):
        raise UnsupportedCodec(f"transfer syntax {label} has no decoder installed")
    if not decoder.is_native:
        check_codestream(ds, index=index, frames=frames, rows=rows, columns=columns, label=label, limits=limits)
    array, _ = decode_frame(decoder, ds, index=index, plugins=plugins, label=label)
    array = native_order(array)
    if array.shape[:2] != (rows, columns):
        raise InvalidImage(f"DICOM pixel data decoded to {array.shape[:2]}, expected {(rows, columns)}")

    source, pixels, used = render_dicom(
        array,
        ds,
        index=index,
        photometric=photometric,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=pixel_representation,
        window=window,
    )
    stated_ts = original_ts or ts
    info = ImageMetadata(
        kind=InputKind.DICOM,
        rows=rows,
        columns=columns,
        frames=frames,
        frame=index,
        photometric_interpretation=photometric,
        transfer_syntax=UID(original_ts).name if original_ts == DEFLATED else ts_name(ts),
        transfer_syntax_uid=stated_ts,
        window=used,
        identity=dicom_identity(ds),
        pixel_spacing=pixel_spacing(ds, index),
    )
    return DecodedImage(pixels_u8=pixels, source=source, info=info)


def dicom_identity(ds: Dataset) -> DicomIdentity:
    """Modality and the instance's UIDs, each only when it looks like one (so free text never leaks)."""
    return DicomIdentity(
        modality=cs(ds, "Modality") or "",
        sop_class_uid=uid(ds, "SOPClassUID") or "",
        sop_instance_uid=uid(ds, "SOPInstanceUID") or "",
        series_instance_uid=uid(ds, "SeriesInstanceUID") or "",
        study_instance_uid=uid(ds, "StudyInstanceUID") or "",
        frame_of_reference_uid=uid(ds, "FrameOfReferenceUID") or "",
    )


def pixel_spacing(ds: Dataset, index: int) -> PixelSpacing | None:
    """Spacing of frame ``index`` from the first attribute that has a usable one, in this order:

    the Pixel Measures Sequence (per-frame, then shared functional groups), PixelSpacing, then
    ImagerPixelSpacing (at the detector: what a projection radiograph may carry alone).
    """
    candidates = [
        (item, "PixelSpacing", SpacingSource.PIXEL_MEASURES) for item in functional(ds, index, "PixelMeasuresSequence")
    ]
    candidates += [
        (ds, "PixelSpacing", SpacingSource.PIXEL_SPACING),
        (ds, "ImagerPixelSpacing", SpacingSource.IMAGER_PIXEL_SPACING),
    ]
    for item, keyword, source in candidates:
        value = get(item, keyword)
        if value is None or isinstance(value, str | bytes) or len(value) != 2:
            continue
        row, column = (float_value(v) for v in value)
        if row is not None and column is not None and row > 0 and column > 0:
            return PixelSpacing(row_mm=row, column_mm=column, source=source)
    return None


def read_dicom_identity(path: Path, *, bare: bool = False) -> DicomIdentity | None:
    """The identity from the header alone (no pixels are read), or None when it does not parse as DICOM.

    For the batch client's grouping. A Deflated data set is not inflated here (pydicom would
    inflate all of it, without a bound): it returns an empty identity. ``bare`` reads a data set
    without preamble, which counts as DICOM only when it has a SOP instance or study UID.
    """
    with quiet():
        try:
            if not bare:
                meta = read_file_meta_info(path)
                if str(meta.get("TransferSyntaxUID", "")) == DEFLATED:
                    return DicomIdentity()
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_IDENTITY_KEYWORDS), force=bare)
            identity = dicom_identity(ds)
        except Exception:  # pydicom raises many types on malformed headers; none may leave
            return None
    if bare and not (identity.sop_instance_uid or identity.study_instance_uid):
        return None  # force=True reads nearly anything
    return identity


def _photometric(ds: Dataset) -> str:
    value = get(ds, "PhotometricInterpretation")
    if not isinstance(value, str) or not value.strip():
        raise InvalidImage("DICOM attribute PhotometricInterpretation is missing")
    value = value.strip()
    if value in _MONOCHROME or value in _COLOUR or value == PALETTE:
        return value
    if looks_like_cs(value):
        raise UnsupportedCodec(f"photometric interpretation {value} is not supported")
    raise InvalidImage("DICOM attribute PhotometricInterpretation is malformed")


def _sop_class_note(ds: Dataset) -> str:
    sop = uid(ds, "SOPClassUID")
    if sop is None:
        return ""
    name = UID(sop).name
    return f" (SOP class {name})" if name != sop else f" (SOP class {sop})"
