"""Fidelity: our renderings against dcmtk over the whole corpus, Presentation LUT Shape, and the transform on the wire.

Each corpus file that decodes is rendered by dcmtk with the window we used (so the comparison is
of the pipeline, not of two automatic windows): dcm2pnm for native syntaxes, dcmj2pnm for JPEG and
RLE, dcml2pnm for JPEG-LS; dcmtk has no JPEG 2000 codec, so those files are decompressed by GDCM's
gdcmconv first. A file matches when 99% of its pixels are within one grey level of dcmtk's.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest

from medgate.v1 import inference_pb2 as pb
from services.gateway.convert import transform_proto
from services.imaging.ingest import DecodedImage, decode
from services.imaging.preprocess import Letterbox
from tests.test_ingest import CORPUS, LIMITS, _dcm2pnm, _expected, _key, _testdata

MATCH_SHARE = 0.99  # of pixels within one grey level

# Files dcmtk 3.6.7 cannot render at all: nothing to compare against.
DCMTK_CANNOT = {
    "pydicom-data/SC_rgb_32bit.dcm": "32-bit RGB ('PixelData' VR other than OB/OW for BitsAllocated 32)",
    "pydicom-data/SC_rgb_32bit_2frame.dcm": "32-bit RGB",
    "pydicom-data/SC_rgb_expb_32bit.dcm": "32-bit RGB",
    "pydicom-data/SC_rgb_expb_32bit_2frame.dcm": "32-bit RGB",
    "pydicom-data/gdcm-US-ALOKA-16.dcm": "segmented palette colour tables ('not yet supported')",
    "pydicom-data/gdcm-US-ALOKA-16_big.dcm": "segmented palette colour tables",
    "test_files/SC_rgb_jpeg.dcm": "dcmtk stops parsing at an element longer than the file",
}
# Files dcmtk renders differently for a reason of its own: what they are compared with instead.
# dcmtk byte-swaps 32-bit big-endian Pixel Data as 16-bit words (pydicom, GDCM: the values of the
# little-endian copy), so the big-endian copies are compared with dcmtk's rendering of that copy.
DCMTK_TWIN = {
    "test_files/rtdose_expb.dcm": "rtdose.dcm",
    "test_files/rtdose_expb_1frame.dcm": "rtdose_1frame.dcm",
}
# 12-bit lossy JPEG: libjpeg (pylibjpeg) and IJG's 12-bit IDCT round differently (mean 0.25, max 3 levels).
LOSSY_12_BIT = {"test_files/JPGExtended.dcm": 0.35}  # mean absolute difference allowed


def _tool(transfer_syntax_uid: str) -> str:
    if transfer_syntax_uid in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        return "dcml2pnm"
    if transfer_syntax_uid.startswith(("1.2.840.10008.1.2.4.9", "1.2.840.10008.1.2.4.20")):
        return "j2k"
    if transfer_syntax_uid.startswith("1.2.840.10008.1.2.4.") or transfer_syntax_uid == "1.2.840.10008.1.2.5":
        return "dcmj2pnm"
    return "dcm2pnm"


def _gdcmconv() -> str | None:
    beside = Path(sys.executable).parent / "gdcmconv"  # python-gdcm installs it in the venv
    return str(beside) if beside.exists() else shutil.which("gdcmconv")


def _window_options(image: DecodedImage) -> list[str]:
    if image.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return []
    used = image.window_used
    if used.source == "voi_lut":
        return ["+Wl", "1"]
    if used.function == "LINEAR_EXACT":
        # dcm2pnm's +Ww is DICOM's LINEAR function; the LINEAR window reaching 0 at low and 255 at high
        # (PS3.3 C.11.2.1.2.1) has width high - low + 1 and centre (low + high) / 2 + 0.5.
        return ["+Ww", repr((used.low + used.high) / 2 + 0.5), repr(used.high - used.low + 1)]
    options = ["+Ww", repr(used.center), repr(used.width)]
    return [*options, "+Wfs"] if used.function == "SIGMOID" else options


def _dcmtk_render(source: Path, image: DecodedImage, workdir: Path) -> np.ndarray:
    """dcmtk's 8-bit grey rendering of ``source`` with the window ``image`` used (overlays off)."""
    _dcm2pnm()  # skips without dcmtk (fails under CI=true)
    if source.suffix == ".gz":
        plain = workdir / "plain.dcm"
        plain.write_bytes(gzip.decompress(source.read_bytes()))
        source = plain
    tool = _tool(image.info.transfer_syntax_uid)
    if tool == "j2k":
        gdcmconv = _gdcmconv()
        if gdcmconv is None:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail("CI=true but GDCM's gdcmconv is missing (python-gdcm, a dependency, ships it)")
            pytest.skip("GDCM's gdcmconv is not installed (python-gdcm): dcmtk has no JPEG 2000 codec")
        raw = workdir / "raw.dcm"
        subprocess.run([gdcmconv, "--raw", str(source), str(raw)], check=True, capture_output=True, timeout=120)
        source, tool = raw, "dcm2pnm"
    executable = shutil.which(tool)
    assert executable is not None, f"dcmtk's {tool} is missing beside dcm2pnm"
    out = workdir / "dcmtk.png"
    command = [executable, "--write-png", "-O", "+F", str(image.frame + 1), *_window_options(image), str(source)]
    subprocess.run([*command, str(out)], check=True, capture_output=True, timeout=120)
    reference = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    if reference.ndim == 3:
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2GRAY)
    if reference.dtype != np.uint8:
        reference = np.rint(reference / 257.0).astype(np.uint8)
    return np.asarray(reference)


def _within_one(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    return float((np.abs(ours.astype(np.int16) - theirs.astype(np.int16)) <= 1).mean())


COMPARED = [path for path in CORPUS if _expected(_key(path)) is None and _key(path) not in DCMTK_CANNOT]


@functools.cache
def _decoded(path: Path) -> DecodedImage:
    return decode(path.read_bytes(), limits=LIMITS)


@pytest.mark.parametrize("path", COMPARED, ids=_key)
def test_corpus_file_renders_like_dcmtk(path: Path, tmp_path: Path) -> None:
    key = _key(path)
    image = _decoded(path)
    source = _testdata(DCMTK_TWIN[key]) if key in DCMTK_TWIN else path
    theirs = _dcmtk_render(source, image, tmp_path)
    ours = image.pixels_u8
    if key in LOSSY_12_BIT:
        difference = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
        assert difference.mean() < LOSSY_12_BIT[key] and difference.max() <= 4
        return
    share = _within_one(ours, theirs)
    assert share >= MATCH_SHARE, f"{share:.2%} of pixels within one grey level of dcmtk"


def test_the_comparison_covers_the_corpus() -> None:
    """Every decodable file is compared, except those dcmtk cannot render (listed with the reason)."""
    decodable = [path for path in CORPUS if _expected(_key(path)) is None]
    assert len(COMPARED) >= 160 and len(decodable) - len(COMPARED) == len(DCMTK_CANNOT)
    assert set(DCMTK_TWIN) | set(LOSSY_12_BIT) <= {_key(path) for path in COMPARED}


# Corpus files with the attribute added, rendered by dcm2pnm with the same window.
POLARITY_CASES = ["CT_small.dcm", "MR_small.dcm", "RG1_UNCI.dcm", "vlut_04.dcm", "mlut_18.dcm"]


@pytest.mark.parametrize("shape", ["IDENTITY", "INVERSE"])
@pytest.mark.parametrize("name", POLARITY_CASES)
def test_presentation_lut_shape_renders_like_dcmtk(name: str, shape: str, tmp_path: Path) -> None:
    """INVERSE was ignored (every INVERSE case was the negative of dcmtk's); MONOCHROME1 (RG1_UNCI) + INVERSE
    is the usual MONOCHROME1 display and + IDENTITY is not inverted, as dcm2pnm renders them."""
    ds = pydicom.dcmread(_testdata(name))
    ds.PresentationLUTShape = shape
    path = tmp_path / name
    ds.save_as(path)
    image = decode(path.read_bytes(), limits=LIMITS)
    theirs = _dcmtk_render(path, image, tmp_path)
    assert _within_one(image.pixels_u8, theirs) >= MATCH_SHARE
    plain = _decoded(_testdata(name))
    inverted = (shape == "INVERSE") != (ds.PhotometricInterpretation == "MONOCHROME1")
    if inverted:  # the attribute changes the display relative to the file without it
        assert np.abs(image.pixels_u8.astype(np.int16) - (255 - plain.pixels_u8)).max() <= 1
    else:
        assert np.array_equal(image.pixels_u8, plain.pixels_u8)


@pytest.mark.parametrize(("h", "w"), [(7, 5000), (5000, 7), (1841, 1955), (64, 48)])
def test_the_transform_on_the_wire_maps_boxes_back_exactly(h: int, w: int) -> None:
    """A caller holding only the proto maps the resized area back onto the whole image with scale_x/scale_y.

    With the one nominal scale, 5000x7's one-pixel strip came back 4.88 px tall instead of 7.
    """
    transform = Letterbox.for_shape(h, w)
    wire = pb.Transform.FromString(transform_proto(transform).SerializeToString())
    assert (wire.scale_x, wire.scale_y, wire.scale) == (transform.scale_x, transform.scale_y, transform.scale)
    assert wire.scale == 1024 / max(h, w)  # kept for existing callers: the long side's factor
    width = wire.resized_width / wire.scale_x
    height = wire.resized_height / wire.scale_y
    assert width == pytest.approx(w, abs=1e-9) and height == pytest.approx(h, abs=1e-9)
    if (h, w) == (7, 5000):
        assert wire.resized_height / wire.scale == pytest.approx(4.8828125)  # what the nominal scale gave
