"""DICOM's grey pipeline (PS3.4 N.2) for one frame: palette to luma, modality LUT or rescale, VOI LUT or window,
then the Presentation LUT Shape's polarity."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_color_lut

from services.imaging.errors import InvalidImage
from services.imaging.ingest.dicom_attrs import cs, float_value, functional, get
from services.imaging.ingest.guards import native_order
from services.imaging.ingest.image import Window
from services.imaging.ingest.render import auto_window, luma, render

PALETTE = "PALETTE COLOR"


def render_dicom(
    array: np.ndarray,
    ds: Dataset,
    *,
    index: int,
    photometric: str,
    bits_allocated: int,
    bits_stored: int,
    pixel_representation: int,
    window: Window | None,
) -> tuple[np.ndarray, np.ndarray, Window]:
    """(source, pixels_u8, window used): palette/colour to luma, or the grey pipeline of PS3.4 N.2.

    Grey: modality LUT or rescale, then the requested window, else the file's VOI LUT, else its
    window, else the automatic one; inverted in the same pass when :func:`inverts` says so.
    """
    padding: np.ndarray | None = None
    if photometric == PALETTE:
        try:
            _palette_to_little_endian(ds)
            colour = native_order(apply_color_lut(array, ds))
        except Exception as exc:
            raise InvalidImage(f"DICOM palette colour lookup table is malformed ({type(exc).__name__})") from None
        source = colour
        # Some writers put 8-bit entries in a 16-bit table; render those on 0..255 as viewers do.
        full = 255.0 if colour.dtype == np.uint8 or int(colour.max(initial=0)) <= 255 else 65535.0
        grey = luma(colour)
    elif array.ndim == 3:
        source = array
        grey, full = luma(array), float(2**bits_stored - 1)
    else:
        full = 0.0
        padding = _padding_mask(array, ds)
        source = _modality(array, ds, index)
        grey = source

    invert = inverts(ds, photometric)
    if window is not None:
        used, pixels = window, render(grey, window, invert=invert)
    elif full:
        used = Window.from_range(0.0, full, source="full_range")
        pixels = render(grey, used)
    else:
        lut = _voi_lut(ds, pixel_representation)
        if lut is not None:
            used, pixels = _apply_voi_lut(source, *lut, invert=invert)
        else:
            dicom_window = _dicom_window(ds, index)
            if dicom_window is not None:
                used = dicom_window
            elif bits_allocated == 1:
                used = Window.from_range(0.0, 1.0, source="full_range")
            else:
                used = auto_window(source, padding)
            pixels = render(source, used, invert=invert)

    return source, pixels, used


def inverts(ds: Dataset, photometric: str) -> bool:
    """Whether the grey output is inverted for display: the Presentation LUT Shape (2050,0020) decides.

    PS3.3 C.7.6.1 (General Image) and C.11.6.1: IDENTITY means the VOI output already is in
    P-Values (minimum black), INVERSE that it is after inversion (minimum white). A MONOCHROME1
    image is written with INVERSE, so MONOCHROME1 + INVERSE is one inversion (minimum white, as
    MONOCHROME1 always displays), not two. Without a shape, MONOCHROME1 inverts and MONOCHROME2
    does not. dcmtk's dcm2pnm renders all six combinations this way, including the
    non-conformant MONOCHROME1 + IDENTITY (not inverted: the shape wins). Colour images ignore
    the shape (IDENTITY is the only value allowed for them).
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return False
    shape = cs(ds, "PresentationLUTShape")
    if shape == "INVERSE":
        return True
    if shape == "IDENTITY":
        return False
    return photometric == "MONOCHROME1"  # absent, or LIN OD (hardcopy only): the photometric's own polarity


def _palette_to_little_endian(ds: Dataset) -> None:
    """pydicom 3.0 reads non-segmented OW palette tables as little endian whatever the syntax."""
    if ds.original_encoding[1] is not False:
        return
    for colour in ("Red", "Green", "Blue", "Alpha"):
        keyword = f"{colour}PaletteColorLookupTableData"
        element = ds.data_element(keyword) if keyword in ds else None
        if element is not None and element.VR == "OW" and isinstance(element.value, bytes):
            element.value = np.frombuffer(element.value, dtype=">u2").astype("<u2").tobytes()


def _modality(stored: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Modality LUT or rescale (incl. enhanced multi-frame's Pixel Value Transformation)."""
    sequence = get(ds, "ModalityLUTSequence")
    if sequence:
        lut = _lut(sequence[0], ds, signed=stored.dtype.kind == "i")
        if lut is not None:
            table, first = lut
            indices = np.clip(stored.astype(np.int64) - first, 0, len(table) - 1)
            return table.astype(np.int32)[indices]
    slope, intercept = 1.0, 0.0
    for item in [*functional(ds, index, "PixelValueTransformationSequence"), ds]:
        if "RescaleSlope" in item or "RescaleIntercept" in item:
            slope_value = float_value(get(item, "RescaleSlope"))
            intercept_value = float_value(get(item, "RescaleIntercept"))
            if slope_value is None or slope_value == 0 or (intercept_value is None and "RescaleIntercept" in item):
                raise InvalidImage("DICOM RescaleSlope/RescaleIntercept are not usable numbers")
            slope, intercept = slope_value, intercept_value or 0.0
            break
    if slope == 1.0 and intercept == 0.0:
        return stored
    if (
        stored.dtype.kind in "iu"
        and stored.dtype.itemsize <= 2
        and slope.is_integer()
        and intercept.is_integer()
        and abs(slope) <= 2**14
        and abs(intercept) <= 2**30
    ):
        return stored.astype(np.int32) * int(slope) + int(intercept)
    rescaled = stored.astype(np.float64 if stored.dtype.itemsize > 2 else np.float32)
    np.multiply(rescaled, slope, out=rescaled)
    np.add(rescaled, intercept, out=rescaled)
    return rescaled


def _lut(item: Dataset, ds: Dataset, *, signed: bool) -> tuple[np.ndarray, int] | None:
    """(table, first mapped value) of a Modality/VOI LUT item; None if it is malformed."""
    descriptor = get(item, "LUTDescriptor")
    data = get(item, "LUTData")
    if descriptor is None or data is None or len(descriptor) != 3:
        return None
    entries, first = int(descriptor[0]) or 65536, int(descriptor[1])
    if signed and first >= 2**15:
        first -= 2**16  # first-mapped value stored as US although the pixels are signed
    if isinstance(data, bytes):
        little = bool(ds.original_encoding[1]) if ds.original_encoding[1] is not None else True
        table = np.frombuffer(data[: len(data) // 2 * 2], dtype="<u2" if little else ">u2").astype(np.uint16)
    else:
        table = np.asarray(list(data) if not isinstance(data, int) else [data], dtype=np.int64)
        if table.size and (table.min() < 0 or table.max() > 65535):
            return None
        table = table.astype(np.uint16)
    if table.size < entries or entries < 1:
        return None
    return table[:entries], first


def _voi_lut(ds: Dataset, pixel_representation: int) -> tuple[np.ndarray, int, int] | None:
    """The first VOI LUT Sequence item as (table, first mapped, bits per entry), or None."""
    sequence = get(ds, "VOILUTSequence")
    if not sequence:
        return None
    lut = _lut(sequence[0], ds, signed=pixel_representation == 1)
    descriptor = get(sequence[0], "LUTDescriptor")
    if lut is None or descriptor is None:
        return None
    bits = int(descriptor[2])
    if not 8 <= bits <= 16:
        return None
    table, first = lut
    return table, first, bits


def _apply_voi_lut(
    source: np.ndarray, table: np.ndarray, first: int, bits: int, *, invert: bool
) -> tuple[Window, np.ndarray]:
    # The LUT's output spans 0 .. 2**bits - 1 (PS3.3 C.11.2.1.1); map that range to 0..255 first.
    table_u8 = np.clip(np.rint(table.astype(np.float64) * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    if invert:
        table_u8 = 255 - table_u8
    values = np.rint(source).astype(np.int64) if source.dtype.kind == "f" else source.astype(np.int64)
    pixels = table_u8[np.clip(values - first, 0, len(table) - 1)]
    entries = len(table)
    used = Window(first + entries / 2, float(entries), float(first), float(first + entries - 1), "LUT", "voi_lut")
    return used, pixels


def _dicom_window(ds: Dataset, index: int) -> Window | None:
    for item in [*functional(ds, index, "FrameVOILUTSequence"), ds]:
        if "WindowCenter" not in item or "WindowWidth" not in item:
            continue
        center = float_value(get(item, "WindowCenter"))
        width = float_value(get(item, "WindowWidth"))
        if center is None or width is None or width <= 0:
            return None
        function = cs(item, "VOILUTFunction") or "LINEAR"
        if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID") or (function == "LINEAR" and width < 1):
            function = "LINEAR_EXACT"
        return Window.from_center_width(center, width, function=function, source="dicom")
    return None


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels equal to (or between) Pixel Padding Value and Range Limit, excluded from the auto window."""
    pad = get(ds, "PixelPaddingValue")
    if not isinstance(pad, int):
        return None
    limit = get(ds, "PixelPaddingRangeLimit")
    if isinstance(limit, int):
        low, high = min(pad, limit), max(pad, limit)
        return (stored >= low) & (stored <= high)
    return stored == pad
