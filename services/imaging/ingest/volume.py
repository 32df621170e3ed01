"""NIfTI, MHA and NRRD volumes: SimpleITK in a child process, one slice back, the header's spacing kept.

ITK never runs in this process (see :mod:`services.imaging.ingest.volume_child`): the child reports
the header, waits for our limit check, then reads the image and saves the one slice as .npy. A
crash, a hang past ``max_volume_read_seconds`` or an error line all become InvalidImage.
"""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from services.imaging.errors import InvalidImage, UnsupportedCodec
from services.imaging.ingest.guards import check_size, choose_frame, native_order
from services.imaging.ingest.image import (
    DecodedImage,
    ImageMetadata,
    InputKind,
    PixelSpacing,
    SpacingSource,
    Window,
)
from services.imaging.ingest.render import default_window, luma, render
from services.imaging.limits import IngestLimits

__all__ = ["CHILD", "decode_mha", "decode_nifti", "decode_nrrd", "decode_volume"]

# Run by path (not ``-m``): ``-I`` then keeps PYTHONPATH, the user's site and the script's folder
# out, and the child imports only NumPy and SimpleITK, not this package's decoders.
CHILD = Path(__file__).with_name("volume_child.py")

_ITK_IO = {
    InputKind.NIFTI: ("NiftiImageIO", ".nii"),
    InputKind.MHA: ("MetaImageIO", ".mha"),
    InputKind.NRRD: ("NrrdImageIO", ".nrrd"),
}


def decode_volume(
    data: bytes, kind: InputKind, *, frame: int | None, window: Window | None, limits: IngestLimits
) -> DecodedImage:
    """Slice ``frame`` (default the middle one) along the third voxel axis; 4-D: of the first volume."""
    _check_volume_header(data, kind)
    io_name, suffix = _ITK_IO[kind]
    with tempfile.TemporaryDirectory(prefix="medgate-ingest-") as folder:
        path, out = Path(folder) / f"input{suffix}", Path(folder) / "slice.npy"
        path.write_bytes(data)
        command = [sys.executable, "-I", str(CHILD), str(path), io_name, str(out)]
        child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=folder
        )
        timer = threading.Timer(limits.max_volume_read_seconds, child.kill)
        timer.start()
        try:
            info = _child_message(child, kind, stage="header")
            size = [int(n) for n in info["size"]]
            components = int(info["components"])
            type_name = str(info["pixel_type"])
            if len(size) < 2:
                raise InvalidImage(f"{kind.name} image has {len(size)} dimension(s); need at least 2")
            width, height = size[0], size[1]
            slices = size[2] if len(size) >= 3 else 1
            others = math.prod(size[3:])
            check_size(
                height,
                width,
                slices * others,
                components,
                _itk_component_bytes(type_name),
                limits,
                what=f"{kind.name} image",
                decoded_frames=slices * others,
            )
            index = choose_frame(frame, slices)
            assert child.stdin is not None
            child.stdin.write(f"read {index}\n".encode())
            child.stdin.flush()
            _child_message(child, kind, stage="pixel data")
            array = native_order(np.load(out, allow_pickle=False))
        finally:
            timer.cancel()
            child.kill()
            child.wait()
    expected = (height, width, components) if components > 1 else (height, width)
    if array.shape != expected:
        raise InvalidImage(f"{kind.name} slice has shape {array.shape}, expected {expected}")
    if components > 1:
        source = array
        grey = luma(array[..., :3]) if components >= 3 else array[..., 0]
        photometric = "RGB" if components >= 3 else "MONOCHROME2"
    else:
        source = grey = array
        photometric = "MONOCHROME2"
    used = window or default_window(grey)
    metadata = ImageMetadata(
        kind=kind,
        rows=height,
        columns=width,
        frames=slices,
        frame=index,
        photometric_interpretation=photometric,
        transfer_syntax=kind.name,
        window=used,
        pixel_spacing=_spacing(info.get("spacing")),
    )
    return DecodedImage(pixels_u8=render(grey, used), source=source, info=metadata)


def _spacing(values: Any) -> PixelSpacing | None:
    """ITK's spacing is (x, y, ...): x between columns, y between rows."""
    if not isinstance(values, list) or len(values) < 2:
        return None
    try:
        column, row = float(values[0]), float(values[1])
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(row) and math.isfinite(column) and row > 0 and column > 0):
        return None
    return PixelSpacing(row_mm=row, column_mm=column, source=SpacingSource.VOLUME_HEADER)


def _check_volume_header(data: bytes, kind: InputKind) -> None:
    """Refuse what would make ITK open other files: detached data in MHA/NRRD, NIfTI .hdr/.img pairs."""
    if kind is InputKind.NIFTI:
        if data[344:347] == b"ni1" or data[4:7] == b"ni2":
            raise UnsupportedCodec("NIfTI header/image pairs (.hdr/.img) are not supported; send one .nii")
        return
    head = data[:65536]
    if kind is InputKind.NRRD:
        text = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        for line in text.splitlines()[1:]:
            key = line.split(b":", 1)[0].strip().lower()
            if key in (b"data file", b"datafile"):
                raise InvalidImage("NRRD with a detached data file is refused; send an attached .nrrd")
        return
    for line in head.splitlines():
        key, _, value = line.partition(b"=")
        if key.strip() == b"ElementDataFile":
            if value.strip() != b"LOCAL":
                raise InvalidImage("MetaImage must hold its data (ElementDataFile = LOCAL); detached data is refused")
            return
    raise InvalidImage("MetaImage header has no ElementDataFile = LOCAL")


def _child_message(child: subprocess.Popen[bytes], kind: InputKind, *, stage: str) -> dict[str, Any]:
    """The child's next JSON line; a crash, a kill by the timer or an error line become InvalidImage."""
    assert child.stdout is not None
    line = child.stdout.readline(65536)
    try:
        message = json.loads(line) if line else None
    except ValueError:
        message = None
    if not isinstance(message, dict):
        reason = "timed out" if child.poll() == -signal.SIGKILL else "the reader crashed"
        raise InvalidImage(f"{kind.name} {stage} could not be read ({reason})")
    if "error" in message:
        raise InvalidImage(f"{kind.name} {stage} could not be read")
    return message


def _itk_component_bytes(type_name: str) -> int:
    match = re.search(r"(\d+)-bit", type_name)
    bits = int(match.group(1)) if match else 64
    return max(1, bits // 8) * (2 if "complex" in type_name else 1)


def decode_nifti(data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    return decode_volume(data, InputKind.NIFTI, frame=frame, window=window, limits=limits)


def decode_mha(data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    return decode_volume(data, InputKind.MHA, frame=frame, window=window, limits=limits)


def decode_nrrd(data: bytes, *, frame: int | None, window: Window | None, limits: IngestLimits) -> DecodedImage:
    return decode_volume(data, InputKind.NRRD, frame=frame, window=window, limits=limits)
