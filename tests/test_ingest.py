"""Ingest: every corpus file, renderings against dcmtk, the malformed corpus, and no patient data in errors or logs."""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import logging
import os
import shutil
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    MPEG2MPML,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

import services.imaging  # noqa: F401  (sets OPENCV_IO_MAX_IMAGE_PIXELS)
from services.imaging.errors import IngestError, InvalidImage, LimitExceeded, UnsupportedCodec
from services.imaging.ingest import (
    DICOM_DECODER_PLUGINS,
    DecodedImage,
    InputKind,
    PixelSpacing,
    SpacingSource,
    decode,
    decode_array,
)
from services.imaging.limits import IngestLimits

LIMITS = IngestLimits()
PYDICOM_DATA = Path(pydicom.data.__file__).parent


def _testdata(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name)
    assert isinstance(path, str), f"{name} is not in pydicom's or pydicom-data's test files"
    return Path(path)


def _read(name: str) -> bytes:
    return _testdata(name).read_bytes()


# ---------------------------------------------------------------------------------------------
# (a) Every file in pydicom's and pydicom-data's test data


def _key(path: Path) -> str:
    text = path.as_posix()
    if "/data_store/data/" in text:
        return "pydicom-data/" + path.name
    return text.split("/pydicom/data/", 1)[1]


def _corpus() -> list[Path]:
    files = [Path(p) for p in pydicom.data.get_testdata_files() if os.path.isfile(p)]
    files += [p for p in (PYDICOM_DATA / "charset_files").iterdir() if p.is_file()]
    files += [p for p in (PYDICOM_DATA / "palettes").iterdir() if p.is_file()]
    return sorted(files, key=_key)


NO_PIXELS = "no Pixel Data element: not an image"
NOT_DICOM = "not an image file at all (text, JSON, ICC profile)"
# Every file expected to fail, with the exact exception and why; everything else must decode.
EXPECTED_ERRORS: dict[str, tuple[type[IngestError], str]] = {
    "test_files/JPEG-lossy.dcm": (
        UnsupportedCodec,
        "a real 12-bit JPEG (NEMA WG04 NM1_JPLY) our codecs cannot decode: libjpeg refuses its sequential SOS "
        "header, Pillow has no 12-bit JPEG; dcmtk's dcmj2pnm and GDCM read it with a warning",
    ),
    "test_files/JPEG2000-embedded-sequence-delimiter.dcm": (
        InvalidImage,
        "4 codestream bytes overwritten with a sequence delimiter; the J2K header no longer matches",
    ),
    "test_files/MR_truncated.dcm": (InvalidImage, "Pixel Data shorter than Rows x Columns"),
    "test_files/badVR.dcm": (InvalidImage, "NumberOfFrames is '1A'"),
    "test_files/meta_missing_tsyntax.dcm": (InvalidImage, "no transfer syntax and no image attributes"),
    "test_files/nested_priv_SQ.dcm": (InvalidImage, "private sequences only, no Rows/Columns"),
    "test_files/no_meta.dcm": (InvalidImage, "a stray byte before the first tag: pydicom cannot parse it either"),
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": (
        InvalidImage,
        "truncated inside the encapsulated Pixel Data: pydicom keeps no elements",
    ),
    "test_files/ExplVR_BigEndNoMeta.dcm": (InvalidImage, NO_PIXELS + " (RT Ion Plan, no meta)"),
    "test_files/ExplVR_LitEndNoMeta.dcm": (InvalidImage, NO_PIXELS + " (RT Ion Plan, no meta)"),
    "test_files/UN_sequence.dcm": (InvalidImage, NO_PIXELS + " (one private UN sequence)"),
    "test_files/empty_charset_LEI.dcm": (InvalidImage, NO_PIXELS),
    "test_files/no_meta_group_length.dcm": (InvalidImage, NO_PIXELS),
    "test_files/priv_SQ.dcm": (InvalidImage, NO_PIXELS),
    "test_files/reportsi.dcm": (InvalidImage, NO_PIXELS + " (Basic Text SR)"),
    "test_files/reportsi_with_empty_number_tags.dcm": (InvalidImage, NO_PIXELS + " (Basic Text SR)"),
    "test_files/test-SR.dcm": (InvalidImage, NO_PIXELS + " (Comprehensive SR)"),
    "test_files/rtplan.dcm": (InvalidImage, NO_PIXELS + " (RT Plan)"),
    "test_files/rtplan_truncated.dcm": (InvalidImage, NO_PIXELS + " (RT Plan, truncated)"),
    "test_files/rtstruct.dcm": (InvalidImage, NO_PIXELS + " (RT Structure Set without meta)"),
    "test_files/waveform_ecg.dcm": (InvalidImage, NO_PIXELS + " (12-lead ECG waveform)"),
    "charset_files/chrJapMulti.dcm": (InvalidImage, NO_PIXELS + " (character-set test, header only)"),
    "charset_files/chrJapMultiExplicitIR6.dcm": (InvalidImage, NO_PIXELS + " (character-set test, header only)"),
    "charset_files/chrKoreanMulti.dcm": (InvalidImage, NO_PIXELS + " (character-set test, header only)"),
    "charset_files/chrSQEncoding.dcm": (InvalidImage, NO_PIXELS + " (character-set test, header only)"),
    "charset_files/chrSQEncoding1.dcm": (InvalidImage, NO_PIXELS + " (character-set test, header only)"),
    "test_files/README.txt": (InvalidImage, NOT_DICOM),
    "test_files/rtplan.dump": (InvalidImage, NOT_DICOM),
    "test_files/rtstruct.dump": (InvalidImage, NOT_DICOM),
    "test_files/test1.json": (InvalidImage, NOT_DICOM),
    "test_files/test_PN.json": (InvalidImage, NOT_DICOM),
    "test_files/crayons.icc": (InvalidImage, NOT_DICOM),
    "test_files/dicomdirtests/README.txt": (InvalidImage, NOT_DICOM),
    "test_files/dicomdirtests/TINY_ALPHA/README": (InvalidImage, NOT_DICOM),
    "charset_files/FileInfo.txt": (InvalidImage, NOT_DICOM),
    "palettes/README.md": (InvalidImage, NOT_DICOM),
}
for _name in ("", "-bigEnd", "-empty.dcm", "-implicit", "-nooffset", "-nopatient", "-reordered"):
    EXPECTED_ERRORS[f"test_files/dicomdirtests/DICOMDIR{_name}"] = (InvalidImage, NO_PIXELS + " (DICOMDIR)")
EXPECTED_ERRORS["test_files/dicomdirtests/TINY_ALPHA/DICOMDIR"] = (InvalidImage, NO_PIXELS + " (DICOMDIR)")
for _name in ("fall", "hotiron", "hotmetalblue", "pet", "pet20step", "spring", "summer", "winter"):
    EXPECTED_ERRORS[f"palettes/{_name}.dcm"] = (InvalidImage, NO_PIXELS + " (Color Palette IOD)")
# TINY_ALPHA's 50 CT instances are DICOMDIR fixtures whose Pixel Data was stripped.
TINY_ALPHA_SERIES = "test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/"

CORPUS = _corpus()


def _expected(key: str) -> tuple[type[IngestError], str] | None:
    if key.startswith(TINY_ALPHA_SERIES):
        return InvalidImage, NO_PIXELS + " (DICOMDIR fixture, pixels stripped)"
    return EXPECTED_ERRORS.get(key)


def test_corpus_is_installed() -> None:
    """pydicom-data (dev extra) must be present, or the corpus test would silently shrink."""
    keys = {_key(path) for path in CORPUS}
    assert "pydicom-data/RG1_UNCI.dcm" in keys, "install pydicom-data (pip install -e '.[dev]')"
    assert len([k for k in keys if k.startswith("pydicom-data/")]) >= 60
    assert set(EXPECTED_ERRORS) <= keys, f"listed but missing: {sorted(set(EXPECTED_ERRORS) - keys)}"


@functools.cache
def _decode_file(path: Path) -> tuple[str, str] | IngestError:
    """Decode and check a corpus file once per session: (transfer syntax, photometric) or the error."""
    try:
        image = decode(path.read_bytes(), limits=LIMITS)
    except IngestError as exc:
        return exc
    _check_image(image)
    assert image.kind is InputKind.DICOM
    assert (image.height, image.width) == (image.info.rows, image.info.columns)
    return image.transfer_syntax, image.photometric


@pytest.mark.parametrize("path", CORPUS, ids=_key)
def test_corpus_file(path: Path) -> None:
    expected = _expected(_key(path))
    result = _decode_file(path)
    if expected is not None:
        error, reason = expected
        assert type(result) is error, f"{reason}: got {result!r}"
    else:
        assert isinstance(result, tuple), f"expected to decode, got {result!r}"


def _check_image(image: DecodedImage) -> None:
    assert image.pixels_u8.dtype == np.uint8
    assert image.pixels_u8.shape == (image.height, image.width)
    assert image.pixels_u8.flags.c_contiguous
    assert image.source.shape[:2] == (image.height, image.width)
    assert 0 <= image.frame < image.frames
    assert image.window_used.high >= image.window_used.low


def test_corpus_counts() -> None:
    """The classification above covers the corpus: how many decode and how many are refused."""
    failing = [path for path in CORPUS if _expected(_key(path)) is not None]
    assert len(CORPUS) - len(failing) >= 165  # 169 with pydicom 3.0.2 and pydicom-data
    assert len(failing) == len(EXPECTED_ERRORS) + 50  # + TINY_ALPHA's 50 stripped instances


def test_every_transfer_syntax_and_photometric_in_the_corpus_decodes() -> None:
    seen_ts: set[str] = set()
    seen_pi: set[str] = set()
    for path in CORPUS:
        result = _decode_file(path)
        if isinstance(result, tuple):
            seen_ts.add(result[0])
            seen_pi.add(result[1])
    assert {
        "Implicit VR Little Endian",
        "Explicit VR Little Endian",
        "Explicit VR Big Endian",
        "Deflated Explicit VR Little Endian",
        "JPEG Baseline (Process 1)",
        "JPEG Extended (Process 2 and 4)",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
        "JPEG-LS Lossless Image Compression",
        "JPEG-LS Lossy (Near-Lossless) Image Compression",
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG 2000 Image Compression",
        "RLE Lossless",
    } <= seen_ts
    assert {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_ICT",
        "YBR_RCT",
        "PALETTE COLOR",
    } <= seen_pi


def test_multiframe_defaults_to_the_middle_frame() -> None:
    data = _read("emri_small.dcm")
    middle = decode(data, limits=LIMITS)
    assert (middle.frames, middle.frame) == (10, 5)
    first = decode(data, frame=0, limits=LIMITS)
    assert first.frame == 0
    assert not np.array_equal(first.source, middle.source)
    expected = pydicom.dcmread(io.BytesIO(data)).pixel_array[5]
    assert np.array_equal(middle.source, expected)
    with pytest.raises(InvalidImage, match="frame 10 is out of range"):
        decode(data, frame=10, limits=LIMITS)


def test_compressed_and_uncompressed_copies_render_alike() -> None:
    reference = decode(_read("RG3_UNCR.dcm"), limits=LIMITS).pixels_u8
    lossless = decode(_read("RG3_J2KR.dcm"), limits=LIMITS).pixels_u8
    assert np.array_equal(reference, lossless)
    colour = decode(_read("US1_UNCR.dcm"), limits=LIMITS).pixels_u8.astype(float)
    rct = decode(_read("US1_J2KR.dcm"), limits=LIMITS).pixels_u8.astype(float)
    assert np.abs(colour - rct).mean() < 1.0


def test_modality_lut_window_and_metadata() -> None:
    ct = decode(_read("CT_small.dcm"), window=(40, 400), limits=LIMITS)
    assert ct.window_used.source == "request"
    assert (ct.window_used.low, ct.window_used.high) == (-160.0, 240.0)
    raw = pydicom.dcmread(_testdata("CT_small.dcm")).pixel_array
    assert np.array_equal(ct.source, raw.astype(np.int32) - 1024)  # RescaleIntercept -1024
    assert ct.info.identity.modality == "CT"
    assert ct.info.pixel_spacing == PixelSpacing(0.661468, 0.661468, SpacingSource.PIXEL_SPACING)
    assert all((ct.info.identity.study_instance_uid, ct.info.identity.sop_instance_uid))
    auto = decode(_read("CT_small.dcm"), limits=LIMITS)
    assert auto.window_used.source == "auto"  # CT_small has no window; its padding (-2000) is excluded
    assert auto.window_used.low > -1100
    mr = decode(_read("MR_small.dcm"), limits=LIMITS)
    assert (mr.window_used.source, mr.window_used.center, mr.window_used.width) == ("dicom", 600.0, 1600.0)
    assert decode(_read("vlut_04.dcm"), limits=LIMITS).window_used.source == "voi_lut"
    mlut = decode(_read("mlut_18.dcm"), limits=LIMITS)
    assert mlut.source.min() >= 0 and mlut.source.max() > 4096  # the LUT maps 12-bit input to 16-bit output
    dfl = decode(_read("image_dfl.dcm"), limits=LIMITS)
    assert dfl.transfer_syntax == "Deflated Explicit VR Little Endian"


def test_monochrome1_renders_inverted() -> None:
    image = decode(_read("RG1_UNCI.dcm"), window=(15000, 30000), limits=LIMITS)
    stored = pydicom.dcmread(_testdata("RG1_UNCI.dcm")).pixel_array.astype(np.float64)
    expected = 255 - np.clip(np.rint(stored / 30000 * 255), 0, 255)
    assert np.abs(image.pixels_u8 - expected).max() <= 1


def test_enhanced_ct_window_from_functional_groups() -> None:
    image = decode(_read("eCT_Supplemental.dcm"), limits=LIMITS)
    assert image.window_used.source == "dicom"
    assert image.frames == 2


# ---------------------------------------------------------------------------------------------
# (b) Renderings against dcmtk's dcm2pnm

DCM2PNM = shutil.which("dcm2pnm")
REFERENCE_CASES = [
    ("CT_small.dcm", ["+Ww", "40", "400"], (40.0, 400.0)),  # CT, rescale, requested window
    ("MR_small.dcm", ["+Wi", "1"], None),  # MR, the file's window
    ("RG1_UNCI.dcm", ["+Wi", "1"], None),  # MONOCHROME1 radiograph
    ("vlut_04.dcm", ["+Wl", "1"], None),  # VOI LUT Sequence
    ("mlut_18.dcm", ["+Wm"], None),  # Modality LUT Sequence; our auto window = min-max here
    ("image_dfl.dcm", ["+Wm"], None),  # Deflated
    ("US1_UNCI.dcm", [], None),  # RGB
    ("OBXXXX1A_expb.dcm", [], None),  # PALETTE COLOR, big endian
]


def _dcm2pnm() -> str:
    """dcm2pnm's path; without it the comparison is skipped on a workstation but fails in CI (CI=true)."""
    if DCM2PNM is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("CI=true but dcmtk's dcm2pnm is not installed: the rendering comparison must run in CI")
        pytest.skip("dcmtk's dcm2pnm is not installed (apt-get install -y dcmtk)")
    return DCM2PNM


@pytest.mark.parametrize(("name", "options", "window"), REFERENCE_CASES, ids=[c[0] for c in REFERENCE_CASES])
def test_rendering_matches_dcmtk(
    name: str, options: list[str], window: tuple[float, float] | None, tmp_path: Path
) -> None:
    dcm2pnm = _dcm2pnm()
    image = decode(_read(name), window=window, limits=LIMITS)
    out = tmp_path / "reference.png"
    command = [dcm2pnm, "--write-png", "+F", str(image.frame + 1), *options, str(_testdata(name)), str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    reference = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    if reference.ndim == 3:
        reference = cv2.cvtColor(reference, cv2.COLOR_BGR2GRAY)
    ours, theirs = image.pixels_u8.astype(np.float64), reference.astype(np.float64)
    assert ours.shape == theirs.shape
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.999
    assert np.abs(ours - theirs).mean() < 1.0


# ---------------------------------------------------------------------------------------------
# PNG, JPEG, volumes and arrays


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, *, depth: int = 8, colour: int = 0, idat: bytes, extra: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + extra
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _encode(image: np.ndarray, ext: str) -> bytes:
    ok, buffer = cv2.imencode(ext, image)
    assert ok
    return buffer.tobytes()


def test_png_grey_8_bit_round_trip() -> None:
    grey = np.random.default_rng(1).integers(0, 256, (37, 53), dtype=np.uint8)
    image = decode(_encode(grey, ".png"), limits=LIMITS)
    _check_image(image)
    assert image.kind is InputKind.PNG and image.photometric == "MONOCHROME2"
    assert np.array_equal(image.pixels_u8, grey)
    assert image.window_used.source == "full_range"


def test_png_16_bit_gets_the_auto_window() -> None:
    ramp = np.tile(np.linspace(1000, 5000, 64).astype(np.uint16), (16, 1))
    image = decode(_encode(ramp, ".png"), limits=LIMITS)
    assert image.source.dtype == np.uint16 and np.array_equal(image.source, ramp)
    assert image.window_used.source == "auto"
    assert image.pixels_u8[:, 0].max() == 0 and image.pixels_u8[:, -1].min() == 255


def test_png_colour_alpha_and_palette() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    bgr = rgb[:, :, ::-1].copy()
    image = decode(_encode(bgr, ".png"), limits=LIMITS)
    assert np.array_equal(image.source, rgb)
    assert np.array_equal(image.pixels_u8, cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))
    bgra = np.dstack([bgr, np.full((20, 30), 7, np.uint8)])
    assert np.array_equal(decode(_encode(bgra, ".png"), limits=LIMITS).pixels_u8, image.pixels_u8)
    rows = b"".join(b"\x00" + bytes([0, 1, 1, 0]) for _ in range(3))
    palette = _png(4, 3, colour=3, idat=zlib.compress(rows), extra=_png_chunk(b"PLTE", bytes([0, 0, 0, 255, 255, 255])))
    decoded = decode(palette, limits=LIMITS)
    assert decoded.photometric == "PALETTE COLOR"
    assert decoded.pixels_u8[0].tolist() == [0, 255, 255, 0]
    rgb16 = (rgb.astype(np.uint16) * 257)[:, :, ::-1].copy()
    assert decode(_encode(rgb16, ".png"), limits=LIMITS).source.dtype == np.uint16


def test_jpeg_grey_and_colour() -> None:
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (32, 1))
    image = decode(_encode(grey, ".jpg"), limits=LIMITS)
    _check_image(image)
    assert image.kind is InputKind.JPEG and image.photometric == "MONOCHROME2"
    assert np.abs(image.pixels_u8.astype(int) - grey).mean() < 3
    colour = decode(_encode(np.dstack([grey, grey, grey]), ".jpg"), limits=LIMITS)
    assert colour.photometric == "RGB" and colour.source.shape == (32, 64, 3)


def _volume_bytes(tmp_path: Path, suffix: str) -> tuple[bytes, np.ndarray]:
    import SimpleITK as sitk

    volume = (np.arange(5)[:, None, None] * 100 + np.arange(7)[None, None, :]).astype(np.int16)
    volume = np.broadcast_to(volume, (5, 6, 7)).copy()
    path = tmp_path / f"volume{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(path))
    return path.read_bytes(), volume


@pytest.mark.parametrize(
    ("suffix", "kind"), [(".nii", InputKind.NIFTI), (".mha", InputKind.MHA), (".nrrd", InputKind.NRRD)]
)
def test_volumes_pick_the_middle_slice(tmp_path: Path, suffix: str, kind: InputKind) -> None:
    data, volume = _volume_bytes(tmp_path, suffix)
    image = decode(data, limits=LIMITS)
    _check_image(image)
    assert image.kind is kind
    assert (image.frames, image.frame, image.width, image.height) == (5, 2, 7, 6)
    assert np.array_equal(image.source, volume[2])
    assert np.array_equal(decode(data, frame=4, limits=LIMITS).source, volume[4])


def test_colour_and_4d_nifti(tmp_path: Path) -> None:
    """Vector NIfTI once corrupted the heap through ITK's streamed slice read: it must decode cleanly."""
    import SimpleITK as sitk

    rgb = np.random.default_rng(4).integers(0, 255, (4, 5, 6, 3)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nii"))
    image = decode((tmp_path / "rgb.nii").read_bytes(), limits=LIMITS)
    assert image.photometric == "RGB" and np.array_equal(image.source, rgb[2])
    series = np.random.default_rng(5).integers(0, 1000, (3, 4, 5, 6)).astype(np.int16)  # t, z, y, x
    sitk.WriteImage(sitk.JoinSeries([sitk.GetImageFromArray(v) for v in series]), str(tmp_path / "series.nii"))
    first = decode((tmp_path / "series.nii").read_bytes(), limits=LIMITS)
    assert (first.frames, first.frame) == (4, 2) and np.array_equal(first.source, series[0, 2])


def test_nifti_that_crashes_itk_is_contained(tmp_path: Path) -> None:
    """A fuzzed vector NIfTI makes ITK 5.4 corrupt its heap ("free(): invalid next size").

    SimpleITK runs in a child process, so here the child dies and the caller gets InvalidImage.
    """
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 16, 16, 3), np.uint8), isVector=True), str(tmp_path / "v.nii"))
    data = bytearray((tmp_path / "v.nii").read_bytes()[:353])
    for offset, value in ((10, 240), (30, 135), (114, 178), (117, 36)):
        data[offset] = value
    with contextlib.suppress(IngestError):  # a fixed ITK may read it; the point is that we survive
        decode(bytes(data), limits=LIMITS)
    assert decode((tmp_path / "v.nii").read_bytes(), limits=LIMITS).photometric == "RGB"


def test_gzipped_nifti_and_dicom(tmp_path: Path) -> None:
    data, volume = _volume_bytes(tmp_path, ".nii")
    assert np.array_equal(decode(gzip.compress(data), limits=LIMITS).source, volume[2])
    assert decode(_read("zipMR.gz"), limits=LIMITS).kind is InputKind.DICOM


def test_decode_array_shapes_and_dtypes() -> None:
    grey16 = np.arange(60, dtype=np.uint16).reshape(6, 10) * 100
    image = decode_array(grey16, limits=LIMITS)
    _check_image(image)
    assert image.kind is InputKind.ARRAY and image.window_used.source == "auto"
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 1] = 200
    assert decode_array(rgb, limits=LIMITS).pixels_u8.max() == round(0.587 * 200)
    stack = np.stack([np.full((6, 7), i, np.float32) for i in range(5)])  # (N, H, 3|4) would read as colour
    picked = decode_array(stack, limits=LIMITS)
    assert (picked.frames, picked.frame, picked.source[0, 0]) == (5, 2, 2.0)
    assert decode_array(np.eye(3, dtype=bool), limits=LIMITS).pixels_u8.max() == 255
    with_nan = np.array([[np.nan, 1.0], [2.0, np.inf]], np.float32)
    assert decode_array(with_nan, limits=LIMITS).pixels_u8.dtype == np.uint8
    with pytest.raises(InvalidImage, match="dtype"):
        decode_array(np.zeros((2, 2), np.complex64), limits=LIMITS)
    with pytest.raises(InvalidImage, match="shape"):
        decode_array(np.zeros((2, 2, 2, 2, 2), np.uint8), limits=LIMITS)
    with pytest.raises(LimitExceeded):
        decode_array(np.zeros((10, 10), np.uint8), limits=IngestLimits(max_pixels=50))


# ---------------------------------------------------------------------------------------------
# (c) The malformed corpus


def _deflate_zeros(total_bytes: int) -> bytes:
    """A raw deflate stream of ``total_bytes`` zeros, built from one repeated 1 MiB block (~1 KB each)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = compressor.compress(b"\x00" * (1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return block * (total_bytes >> 20) + final.compress(b"") + final.flush()


def _dicom_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _small_image(rows: int = 8, columns: int = 8, **attributes: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(rows * columns)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_deflate_bomb_is_stopped_at_the_bound() -> None:
    """A 1 MB Deflated file that would inflate to 1 GiB: refused after max_inflated_bytes, not after 1 GiB."""
    ds = _small_image()
    header = _dicom_bytes(ds, DeflatedExplicitVRLittleEndian)
    meta_end = 132 + 12 + struct.unpack_from("<I", header, 140)[0]  # (0002,0000) holds the group's length
    bomb = header[:meta_end] + _deflate_zeros(1 << 30)
    assert len(bomb) < 2 * 1024 * 1024
    with pytest.raises(LimitExceeded) as caught:
        decode(bomb, limits=LIMITS)
    assert caught.value.limit == "max_inflated_bytes"
    gzip_bomb = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + _deflate_zeros(1 << 30)
    with pytest.raises(LimitExceeded, match="max_inflated_bytes"):
        decode(gzip_bomb, limits=IngestLimits(max_inflated_bytes=16 * 1024 * 1024))


def test_a_real_deflated_file_within_the_bound() -> None:
    data = _dicom_bytes(_small_image(), DeflatedExplicitVRLittleEndian)
    assert decode(data, limits=LIMITS).transfer_syntax == "Deflated Explicit VR Little Endian"
    with pytest.raises(InvalidImage, match="truncated"):
        decode(data[:-10], limits=LIMITS)


def test_png_bomb_is_refused_from_its_header() -> None:
    """A tiny PNG whose IHDR declares 30000x30000: refused before OpenCV allocates anything."""
    rows = zlib.compressobj(9)
    idat = rows.compress(b"\x00" * (30001 * 64)) + rows.flush()
    bomb = _png(30000, 30000, idat=idat)
    assert len(bomb) < 100_000
    with pytest.raises(LimitExceeded) as caught:
        decode(bomb, limits=LIMITS)
    assert caught.value.limit == "max_pixels"
    assert caught.value.value == 900_000_000


def test_65535_square_headers() -> None:
    with pytest.raises(LimitExceeded, match="max_dimension_pixels"):
        decode(_png(65535, 65535, idat=zlib.compress(b"\x00" * 100)), limits=LIMITS)
    sof = b"\xff\xd8\xff\xc0" + struct.pack(">HBHHB", 11, 8, 65535, 65535, 1) + b"\x01\x11\x00"
    with pytest.raises(LimitExceeded, match="max_dimension_pixels"):
        decode(sof + b"\xff\xd9", limits=LIMITS)
    dicom = _dicom_bytes(_small_image(Rows=65535, Columns=65535))
    with pytest.raises(LimitExceeded, match="max_dimension_pixels"):
        decode(dicom, limits=LIMITS)


def test_dicom_frame_and_pixel_limits() -> None:
    many = _dicom_bytes(_small_image(NumberOfFrames=5000))
    with pytest.raises(LimitExceeded, match="max_frames"):
        decode(many, limits=LIMITS)
    with pytest.raises(LimitExceeded, match="max_pixels"):
        decode(_read("RG1_UNCI.dcm"), limits=IngestLimits(max_pixels=1_000_000))
    with pytest.raises(LimitExceeded, match="max_input_bytes"):
        decode(_read("RG1_UNCI.dcm"), limits=IngestLimits(max_input_bytes=1_000_000))


def test_codestream_that_disagrees_with_the_header() -> None:
    """A J2K codestream declaring 40000x40000 in a DICOM saying 8x8: refused before openjpeg allocates."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, 40000, 40000, 0, 0, 40000, 40000, 0, 0, 1) + b"\x07\x01\x01"
    codestream = b"\xff\x4f\xff\x51" + siz + b"\xff\xd9"
    ds = _small_image(Rows=8, Columns=8, BitsAllocated=8)
    ds.PixelData = encapsulate([codestream])
    ds["PixelData"].VR = "OB"
    with pytest.raises(InvalidImage, match="codestream is 40000x40000"):
        decode(_dicom_bytes(ds, JPEG2000Lossless), limits=LIMITS)


@pytest.mark.timeout(30)
def test_jp2_box_of_length_zero_does_not_hang() -> None:
    """pydicom 3.0's JP2 box walk never advances past a zero-length box: found by fuzzing."""
    signature = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
    ds = _small_image()
    ds.PixelData = encapsulate([signature + b"\x00\x00\x00\x00ftyp" + b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    with pytest.raises(InvalidImage, match="JP2"):
        decode(_dicom_bytes(ds, JPEG2000Lossless), limits=LIMITS)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", InvalidImage),
        (np.random.default_rng(0).bytes(4096), InvalidImage),
        (b"\x00" * 128 + b"DICM" + np.random.default_rng(1).bytes(512), InvalidImage),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, InvalidImage),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, InvalidImage),
        (b"II*\x00" + b"\x00" * 40, UnsupportedCodec),
        (b"%PDF-1.4 hello", UnsupportedCodec),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 20, InvalidImage),
    ],
    ids=["empty", "garbage", "garbage-after-DICM", "png-without-ihdr", "jpeg-without-sof", "tiff", "pdf", "bad-gzip"],
)
def test_bad_bytes(data: bytes, error: type[IngestError]) -> None:
    with pytest.raises(IngestError) as caught:
        decode(data, limits=LIMITS)
    assert type(caught.value) is error


def test_truncated_dicom_png_and_jpeg() -> None:
    ct = _read("CT_small.dcm")
    with pytest.raises(InvalidImage):
        decode(ct[: len(ct) // 2], limits=LIMITS)
    png = _encode(np.zeros((50, 50), np.uint8), ".png")
    with pytest.raises(InvalidImage):
        decode(png[: len(png) // 2], limits=LIMITS)
    jpeg = _encode(np.zeros((50, 50), np.uint8), ".jpg")
    with pytest.raises(IngestError):
        decode(jpeg[:200], limits=LIMITS)


def test_unsupported_transfer_syntax_and_photometric() -> None:
    ds = _small_image()
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UnsupportedCodec, match="MPEG2"):
        decode(_dicom_bytes(ds, MPEG2MPML), limits=LIMITS)
    with pytest.raises(UnsupportedCodec, match="ARGB"):
        decode(_dicom_bytes(_small_image(PhotometricInterpretation="ARGB")), limits=LIMITS)


def test_a_codec_that_cannot_decode_names_the_transfer_syntax() -> None:
    """Every plugin refusing for a reason of its own is FAILED_PRECONDITION, not INVALID_ARGUMENT.

    JPEG-lossy.dcm was INVALID_ARGUMENT ("corrupt") although dcmtk renders it: the data is fine,
    our decoders are the limit. Bytes that really are bad stay InvalidImage.
    """
    with pytest.raises(UnsupportedCodec) as caught:
        decode(_read("JPEG-lossy.dcm"), limits=LIMITS)
    message = str(caught.value)
    assert "JPEG Extended (Process 2 and 4)" in message and "1.2.840.10008.1.2.4.51" in message
    assert "pylibjpeg" in message and "pillow" in message
    # The fixed copy's header with junk for scan data: libjpeg says the data is bad, so it is.
    ds = pydicom.dcmread(_testdata("JPGExtended.dcm"))
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    sos = frame.find(b"\xff\xda")
    scan = sos + 2 + int.from_bytes(frame[sos + 2 : sos + 4], "big")
    junk = np.random.default_rng(0).integers(0, 255, 200, dtype=np.uint8).tobytes().replace(b"\xff", b"\xfe")
    ds.PixelData = encapsulate([frame[:scan] + junk + b"\xff\xd9"])
    with pytest.raises(InvalidImage, match="could not be decoded"):
        decode(_dicom_bytes(ds, ds.file_meta.TransferSyntaxUID), limits=LIMITS)


def _polarity_image(photometric: str, shape: str | None, **attributes: object) -> bytes:
    ds = _small_image(1, 4, PhotometricInterpretation=photometric, **attributes)
    ds.PixelData = bytes([0, 85, 170, 255])
    if shape is not None:
        ds.PresentationLUTShape = shape
    return _dicom_bytes(ds)


RAMP = [0, 85, 170, 255]
INVERTED = [255, 170, 85, 0]


@pytest.mark.parametrize(
    ("photometric", "shape", "expected"),
    [
        ("MONOCHROME2", None, RAMP),
        ("MONOCHROME2", "IDENTITY", RAMP),
        ("MONOCHROME2", "INVERSE", INVERTED),  # was ignored: shown as RAMP
        ("MONOCHROME1", None, INVERTED),
        ("MONOCHROME1", "INVERSE", INVERTED),  # the conformant pair (PS3.3 C.7.6.1.1.x): one inversion
        ("MONOCHROME1", "IDENTITY", RAMP),  # non-conformant; the shape wins, as in dcm2pnm
        ("MONOCHROME2", "LIN OD", RAMP),  # hardcopy only: the photometric's own polarity
    ],
)
def test_presentation_lut_shape_decides_the_polarity(photometric: str, shape: str | None, expected: list[int]) -> None:
    data = _polarity_image(photometric, shape)
    assert decode(data, limits=LIMITS).pixels_u8[0].tolist() == expected
    requested = decode(data, window=(127.5, 255), limits=LIMITS).pixels_u8[0].astype(int)
    assert np.abs(requested - expected).max() <= 1


def test_presentation_lut_shape_with_a_voi_lut_and_on_colour() -> None:
    voi = Dataset()
    voi.LUTDescriptor = [2, 0, 12]
    voi.LUTData = struct.pack("<2H", 0, 4095)  # 2 entries, 12 bits: 0 -> black, 1 and above -> white
    data = _polarity_image("MONOCHROME2", "INVERSE", VOILUTSequence=pydicom.Sequence([voi]))
    image = decode(data, limits=LIMITS)
    assert image.window_used.source == "voi_lut"
    assert image.pixels_u8[0].tolist() == [255, 0, 0, 0]
    rgb = _small_image(1, 2, PhotometricInterpretation="RGB", SamplesPerPixel=3, PlanarConfiguration=0)
    rgb.PixelData = bytes([0, 0, 0, 255, 255, 255])
    rgb.PresentationLUTShape = "INVERSE"  # not allowed on colour (IDENTITY only): ignored
    assert decode(_dicom_bytes(rgb), limits=LIMITS).pixels_u8[0].tolist() == [0, 255]


def test_non_image_dicom_is_named() -> None:
    with pytest.raises(InvalidImage, match=r"no pixel data.*Comprehensive SR"):
        decode(_read("test-SR.dcm"), limits=LIMITS)


def test_declared_kind_must_match() -> None:
    png = _encode(np.zeros((4, 4), np.uint8), ".png")
    with pytest.raises(InvalidImage, match="declared as DICOM"):
        decode(png, kind=InputKind.DICOM, limits=LIMITS)
    assert decode(png, kind=InputKind.PNG, limits=LIMITS).kind is InputKind.PNG
    with pytest.raises(InvalidImage, match="window"):
        decode(png, window=(10, 0), limits=LIMITS)


def test_volumes_that_would_read_other_files() -> None:
    mha = b"ObjectType = Image\nNDims = 2\nDimSize = 2 2\nElementType = MET_UCHAR\nElementDataFile = /etc/passwd\n"
    with pytest.raises(InvalidImage, match="LOCAL"):
        decode(mha, limits=LIMITS)
    nrrd = b"NRRD0004\ntype: uchar\ndimension: 2\nsizes: 2 2\nencoding: raw\ndata file: /etc/passwd\n\n"
    with pytest.raises(InvalidImage, match="detached"):
        decode(nrrd, limits=LIMITS)
    huge = (
        b"ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 4000\nElementType = MET_UCHAR\nElementDataFile = LOCAL\n"
    )
    with pytest.raises(LimitExceeded):
        decode(huge, limits=LIMITS)


def _mutations(data: bytes, count: int, seed: int) -> Iterator[bytes]:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        mutated = bytearray(data)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 16))):
            mutated[position] = int(rng.integers(0, 256))
        cut = int(rng.integers(len(data) // 2, len(data) + 1))
        yield bytes(mutated[:cut])


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm"]
)
def test_fuzzed_files_raise_only_domain_errors(name: str) -> None:
    """Flipped bytes and cut tails: each either decodes or raises one of the three domain errors."""
    for mutated in _mutations(_read(name), 60, seed=len(name)):
        with contextlib.suppress(IngestError):
            _check_image(decode(mutated, limits=LIMITS))


GDCM_ABORT = """
import numpy as np, pydicom.data
from services.imaging.errors import IngestError
from services.imaging.ingest import decode
from services.imaging.limits import IngestLimits
data = bytearray(open(pydicom.data.get_testdata_file("SC_rgb_small_odd_jpeg.dcm"), "rb").read())
rng = np.random.default_rng(312)
for _ in range(8):
    position = int(rng.integers(0, len(data)))
    data[position] = int(rng.integers(0, 256))
try:
    decode(bytes(data), limits=IngestLimits())
except IngestError as exc:
    print(type(exc).__name__)
"""


def test_input_that_aborted_gdcm_is_refused_cleanly() -> None:
    """Eight flipped bytes (seed 312) made GDCM throw through SWIG and abort the process.

    That is why GDCM is not among the decoder plugins; a child process runs it, so a regression
    fails this test instead of killing the test run.
    """
    assert "gdcm" not in DICOM_DECODER_PLUGINS
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", GDCM_ABORT], capture_output=True, text=True, timeout=120, cwd=root, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "InvalidImage"


def test_fuzzed_png_and_jpeg_raise_only_domain_errors() -> None:
    picture = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    for ext in (".png", ".jpg"):
        for mutated in _mutations(_encode(picture, ext), 60, seed=7):
            with contextlib.suppress(IngestError):
                _check_image(decode(mutated, limits=LIMITS))


# ---------------------------------------------------------------------------------------------
# (d) No patient data in messages, logs or warnings

SENTINELS = ("Sentinel^Privacy", "PID-SENTINEL-4711", "19X1-02-30", "Dr^Sentinel")


@pytest.fixture
def pydicom_debugging() -> Iterator[None]:
    """pydicom's debug mode logs every element value: the harshest setting for a leak test."""
    pydicom.config.debug(True)
    try:
        yield
    finally:
        pydicom.config.debug(False)


@functools.cache
def _identifying(variant: str = "decodes") -> bytes:
    """CT_small with names, an ID and an invalid birth date, broken as ``variant`` says."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(_testdata("CT_small.dcm"))
        ds.PatientName = SENTINELS[0]
        ds.PatientID = SENTINELS[1]
        ds.PatientBirthDate = SENTINELS[2]
        ds.ReferringPhysicianName = SENTINELS[3]
        if variant == "bad-photometric":
            ds.PhotometricInterpretation = SENTINELS[0]  # a header value we do parse
        if variant == "bad-rescale":
            ds.RescaleSlope = "nan"  # pydicom warns 'Value "nan" is not valid' when it reads this
        buffer = io.BytesIO()
        ds.save_as(buffer)
    data = buffer.getvalue()
    return data[:-10_000] if variant == "truncated" else data  # cuts into Pixel Data


def _assert_clean(*texts: str) -> None:
    for text in texts:
        for sentinel in SENTINELS:
            assert sentinel not in text


def test_the_leak_test_can_see_a_leak(caplog: pytest.LogCaptureFixture, pydicom_debugging: None) -> None:
    """Plain pydicom logs the names and the birth date, so the checks below are meaningful."""
    data = _identifying()
    caplog.set_level(logging.DEBUG)
    ds = pydicom.dcmread(io.BytesIO(data))
    _ = ds.PatientBirthDate
    assert all(sentinel in caplog.text for sentinel in SENTINELS[:3])


@pytest.mark.usefixtures("pydicom_debugging")
@pytest.mark.parametrize("variant", ["decodes", "truncated", "bad-photometric", "bad-rescale"])
def test_no_patient_data_in_errors_logs_or_warnings(
    variant: str,
    caplog: pytest.LogCaptureFixture,
    recwarn: pytest.WarningsRecorder,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _identifying(variant)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    recwarn.clear()
    capsys.readouterr()
    warnings.simplefilter("always")
    try:
        image = decode(data, limits=LIMITS)
    except IngestError as exc:
        assert variant != "decodes"
        assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
        said = f"{exc} {exc!r}"
    else:
        assert variant == "decodes"
        said = repr(image.info)
    captured = capsys.readouterr()
    _assert_clean(said, caplog.text, captured.out, captured.err, *(str(w.message) for w in recwarn.list))


def test_quiet_is_thread_safe_and_restores_warnings() -> None:
    before = list(warnings.filters)
    errors: list[BaseException] = []
    data, truncated = _identifying(), _identifying("truncated")

    def work() -> None:
        try:
            for _ in range(10):
                decode(data, limits=LIMITS)
                with pytest.raises(InvalidImage):
                    decode(truncated, limits=LIMITS)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert warnings.filters == before


def test_opencv_pixel_limit_is_set_before_cv2() -> None:
    assert int(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"]) > 0


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        IngestLimits(max_pixels=0)
