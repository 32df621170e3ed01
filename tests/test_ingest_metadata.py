"""Ingest's typed metadata: UIDs and pixel spacing as pydicom reads them, none for PNG, no patient data anywhere."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import services.imaging  # noqa: F401  (sets OPENCV_IO_MAX_IMAGE_PIXELS)
from services.imaging.ingest import (
    FORMATS,
    HEAD_BYTES,
    DecodedImage,
    DicomIdentity,
    ImageMetadata,
    InputKind,
    PixelSpacing,
    SpacingSource,
    decode,
    decode_array,
    may_be_bare_dicom,
    read_dicom_identity,
    sniff,
    volume_child,
)
from services.imaging.ingest.sniff import SNIFFERS
from services.imaging.limits import IngestLimits

LIMITS = IngestLimits()
UID_KEYWORDS = {
    "sop_class_uid": "SOPClassUID",
    "sop_instance_uid": "SOPInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "study_instance_uid": "StudyInstanceUID",
    "frame_of_reference_uid": "FrameOfReferenceUID",
}


def _testdata(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name)
    assert isinstance(path, str), f"{name} is not in pydicom's or pydicom-data's test files"
    return Path(path)


def _dcmread(path: Path | bytes) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(io.BytesIO(path) if isinstance(path, bytes) else path)


def _spacing_by_pydicom(ds: Dataset, frame: int) -> PixelSpacing | None:
    """The reference: the first of per-frame, shared PixelMeasures, PixelSpacing, ImagerPixelSpacing with values > 0."""
    candidates: list[tuple[Any, SpacingSource]] = []
    for keyword, at in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(keyword)
        if groups and "PixelMeasuresSequence" in groups[at]:
            measures = groups[at].PixelMeasuresSequence[0]
            candidates.append((measures.get("PixelSpacing"), SpacingSource.PIXEL_MEASURES))
    candidates.append((ds.get("PixelSpacing"), SpacingSource.PIXEL_SPACING))
    candidates.append((ds.get("ImagerPixelSpacing"), SpacingSource.IMAGER_PIXEL_SPACING))
    for value, source in candidates:
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return PixelSpacing(float(value[0]), float(value[1]), source)
    return None


# (file, the spacing attribute it carries): CT/MR PixelSpacing, an enhanced CT's shared Pixel
# Measures, a CR with ImagerPixelSpacing only, RG1_UNCI whose PixelSpacing is 0\0 (so: none).
FILES = [
    ("CT_small.dcm", SpacingSource.PIXEL_SPACING),
    ("MR_small.dcm", SpacingSource.PIXEL_SPACING),
    ("RG1_UNCI.dcm", None),
    ("eCT_Supplemental.dcm", SpacingSource.PIXEL_MEASURES),
    ("6278", SpacingSource.IMAGER_PIXEL_SPACING),
    ("image_dfl.dcm", None),
]


@pytest.mark.parametrize(("name", "spacing_source"), FILES)
def test_identity_and_spacing_equal_pydicoms_reading(name: str, spacing_source: SpacingSource | None) -> None:
    path = _testdata(name)
    ds = _dcmread(path)
    image = decode(path.read_bytes(), limits=LIMITS)
    info = image.info
    assert info.kind is InputKind.DICOM
    assert info.identity.modality == ds.Modality
    for field, keyword in UID_KEYWORDS.items():
        assert getattr(info.identity, field) == str(ds.get(keyword, "")), field
    assert info.identity.sop_class_uid and info.identity.sop_instance_uid and info.identity.study_instance_uid
    assert info.pixel_spacing == _spacing_by_pydicom(ds, info.frame)
    assert (info.pixel_spacing.source if info.pixel_spacing else None) == spacing_source
    assert (info.rows, info.columns, info.frames) == (ds.Rows, ds.Columns, int(ds.get("NumberOfFrames", 1)))
    assert info.photometric_interpretation == ds.PhotometricInterpretation
    assert info.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert info.window is image.window_used
    if name == "RG1_UNCI.dcm":
        assert [float(v) for v in ds.PixelSpacing] == [0.0, 0.0]  # present but unusable: no spacing


def test_frame_of_reference_and_pixel_measures_of_an_enhanced_ct() -> None:
    image = decode(_testdata("eCT_Supplemental.dcm").read_bytes(), limits=LIMITS)
    assert image.info.identity.frame_of_reference_uid == "1.3.6.1.4.1.5962.1.4.10.1.1166562673.14401"
    assert image.info.pixel_spacing == PixelSpacing(0.388672, 0.388672, SpacingSource.PIXEL_MEASURES)


def test_per_frame_pixel_measures_win_over_shared_and_follow_the_frame() -> None:
    ds = _dcmread(_testdata("eCT_Supplemental.dcm"))
    for index, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        measures = Dataset()
        measures.PixelSpacing = [0.5 + index, 0.25 + index]
        item.PixelMeasuresSequence = Sequence([measures])
    ds.PixelSpacing = [9.0, 9.0]  # not allowed in an enhanced CT; must lose to the functional groups
    buffer = io.BytesIO()
    ds.save_as(buffer)
    for frame in (0, 1):
        image = decode(buffer.getvalue(), frame=frame, limits=LIMITS)
        assert image.info.frame == frame
        assert image.info.pixel_spacing == PixelSpacing(0.5 + frame, 0.25 + frame, SpacingSource.PIXEL_MEASURES)
        assert image.info.pixel_spacing == _spacing_by_pydicom(ds, frame)


def test_png_and_arrays_have_no_uids_and_no_spacing() -> None:
    ok, png = cv2.imencode(".png", np.arange(64, dtype=np.uint8).reshape(8, 8))
    assert ok
    for image in (decode(png.tobytes(), limits=LIMITS), decode_array(np.zeros((4, 5)), limits=LIMITS)):
        assert image.info.identity == DicomIdentity()
        assert image.info.pixel_spacing is None
        assert image.info.transfer_syntax_uid == ""
    png_info = decode(png.tobytes(), limits=LIMITS).info
    assert (png_info.kind, png_info.rows, png_info.columns, png_info.transfer_syntax) == (InputKind.PNG, 8, 8, "PNG")


def test_volume_spacing_comes_from_its_header(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    volume = sitk.GetImageFromArray(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
    volume.SetSpacing((0.7, 0.9, 2.5))  # x (between columns), y (between rows), z
    for suffix, kind in ((".nii", InputKind.NIFTI), (".mha", InputKind.MHA), (".nrrd", InputKind.NRRD)):
        path = tmp_path / f"volume{suffix}"
        sitk.WriteImage(volume, str(path))
        info = decode(path.read_bytes(), limits=LIMITS).info
        assert info.kind is kind
        assert (info.rows, info.columns, info.frames, info.frame) == (4, 5, 3, 1)
        assert info.pixel_spacing is not None and info.pixel_spacing.source is SpacingSource.VOLUME_HEADER
        assert (info.pixel_spacing.row_mm, info.pixel_spacing.column_mm) == pytest.approx((0.9, 0.7))  # NIfTI: float32
        assert info.identity == DicomIdentity()


def test_malformed_identity_values_are_dropped() -> None:
    ds = _dcmread(_testdata("CT_small.dcm"))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value (and quotes it)
        ds.Modality = "Sentinel^Privacy"
        ds.SOPInstanceUID = "1.2.3.Sentinel"
        ds.StudyInstanceUID = "1." + "2" * 70  # longer than a UID may be
        ds.save_as(buffer)
    identity = decode(buffer.getvalue(), limits=LIMITS).info.identity
    assert (identity.modality, identity.sop_instance_uid, identity.study_instance_uid) == ("", "", "")
    assert identity.series_instance_uid == str(ds.SeriesInstanceUID)


# ---------------------------------------------------------------------------------------------
# No patient attribute anywhere

PATIENT = {
    "PatientName": "Sentinel^Privacy",
    "PatientID": "PID-SENTINEL-4711",
    "PatientBirthDate": "19710203",
    "StudyDate": "20010405",
    "SeriesDate": "20010406",
    "ContentDate": "20010407",
    "AcquisitionDate": "20010408",
    "AccessionNumber": "ACC-SENTINEL-99",
    "OtherPatientIDs": "OTHER-SENTINEL-7",
    "ReferringPhysicianName": "Dr^Sentinel",
    "InstitutionName": "Sentinel Hospital",
}


def _flatten(value: Any) -> list[str]:
    """Every field name and value of a (nested) dataclass, as text."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        texts: list[str] = []
        for field in dataclasses.fields(value):
            texts.append(field.name)
            texts += _flatten(getattr(value, field.name))
        return texts
    return [str(value)]


def test_no_patient_attribute_leaks_into_the_decoded_image() -> None:
    ds = _dcmread(_testdata("CT_small.dcm"))
    for keyword, value in PATIENT.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    ds.save_as(buffer)
    image = decode(buffer.getvalue(), limits=LIMITS)
    texts = _flatten(image.info)
    said = " ".join(texts) + repr(image) + repr(image.info)
    for keyword, value in PATIENT.items():
        assert value not in said, keyword
        assert value.split("^")[0] not in said, keyword
    names = {field.name for field in dataclasses.fields(ImageMetadata)} | {
        field.name for field in dataclasses.fields(DicomIdentity)
    }
    assert not {name for name in names if any(word in name for word in ("patient", "date", "accession", "name"))}
    assert {field.name for field in dataclasses.fields(DecodedImage)} == {"pixels_u8", "source", "info"}


# ---------------------------------------------------------------------------------------------
# The public sniffing and header reading the batch client uses


def test_sniff_and_the_format_table_agree() -> None:
    ok, png = cv2.imencode(".png", np.zeros((2, 2), np.uint8))
    ok_jpeg, jpeg = cv2.imencode(".jpg", np.zeros((8, 8), np.uint8))
    assert ok and ok_jpeg
    dicom = _testdata("CT_small.dcm").read_bytes()
    assert sniff(dicom[:HEAD_BYTES]) is InputKind.DICOM
    assert sniff(png.tobytes()[:HEAD_BYTES]) is InputKind.PNG
    assert sniff(jpeg.tobytes()[:HEAD_BYTES]) is InputKind.JPEG
    assert sniff(b"hello, world") is None
    assert may_be_bare_dicom(b"\x08\x00\x05\x00CS\x0a\x00")
    assert list(FORMATS) == list(SNIFFERS)  # one order for sniff() and the table
    for kind, entry in FORMATS.items():
        assert entry.sniff is SNIFFERS[kind] and callable(entry.decode), kind
    assert FORMATS[InputKind.PNG].sniff(png.tobytes())


def test_read_dicom_identity_matches_decode_without_reading_pixels(tmp_path: Path) -> None:
    path = _testdata("CT_small.dcm")
    assert read_dicom_identity(path) == decode(path.read_bytes(), limits=LIMITS).info.identity
    assert read_dicom_identity(_testdata("image_dfl.dcm")) == DicomIdentity()  # Deflated: never inflated here
    text = tmp_path / "notes.txt"
    text.write_text("not DICOM at all")
    assert read_dicom_identity(text) is None
    assert read_dicom_identity(text, bare=True) is None


# ---------------------------------------------------------------------------------------------
# The SimpleITK child program, in this process


def test_volume_child_reports_the_header_then_saves_the_slice(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    volume = sitk.GetImageFromArray(np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4))
    volume.SetSpacing((1.5, 2.0, 3.0))
    path, out = tmp_path / "v.mha", tmp_path / "slice.npy"
    sitk.WriteImage(volume, str(path))
    stdout = io.StringIO()
    assert volume_child.main([str(path), "MetaImageIO", str(out)], io.StringIO("read 1\n"), stdout) == 0
    header, saved = (json.loads(line) for line in stdout.getvalue().splitlines())
    assert header == {
        "size": [4, 3, 2],
        "components": 1,
        "pixel_type": "8-bit unsigned integer",
        "spacing": [1.5, 2.0, 3.0],
    }
    assert saved == {"saved": True}
    assert np.array_equal(np.load(out), np.arange(12, 24, dtype=np.uint8).reshape(3, 4))
    stopped = io.StringIO()
    assert volume_child.main([str(path), "MetaImageIO", str(out)], io.StringIO("stop\n"), stopped) == 0
    assert len(stopped.getvalue().splitlines()) == 1
    broken = io.StringIO()
    (tmp_path / "bad.mha").write_bytes(b"ObjectType = Image\nNDims = banana\n")
    assert volume_child.main([str(tmp_path / "bad.mha"), "MetaImageIO", str(out)], io.StringIO(), broken) == 0
    assert json.loads(broken.getvalue()) == {"error": "header"}


# ---------------------------------------------------------------------------------------------
# The answer's ImageInfo carries every typed field (it was empty: the converter read other keys)


def test_image_info_proto_fills_every_field_from_the_typed_record() -> None:
    from medgate.v1 import inference_pb2 as pb
    from services.gateway.convert import image_info_proto
    from services.imaging.prepare import prepare

    path = _testdata("eCT_Supplemental.dcm")
    ds = _dcmread(path)
    message = image_info_proto(prepare(path.read_bytes(), limits=LIMITS))
    assert message.kind == pb.INPUT_KIND_DICOM
    assert message.modality == "CT"
    for field, keyword in UID_KEYWORDS.items():
        assert getattr(message, field) == str(ds[keyword].value), field
    assert message.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    assert (message.width, message.height, message.frames, message.frame) == (512, 512, 2, 1)
    assert message.pixel_spacing == pb.PixelSpacing(
        row_mm=0.388672, column_mm=0.388672, source=pb.PIXEL_SPACING_SOURCE_PIXEL_MEASURES
    )
    assert (message.window.center, message.window.width) == (49.0, 102.0)
    for name, source in (
        ("6278", pb.PIXEL_SPACING_SOURCE_IMAGER_PIXEL_SPACING),
        ("MR_small.dcm", pb.PIXEL_SPACING_SOURCE_PIXEL_SPACING),
    ):
        spacing = image_info_proto(prepare(_testdata(name).read_bytes(), limits=LIMITS)).pixel_spacing
        assert spacing.source == source, name
    ok, png = cv2.imencode(".png", np.zeros((3, 4), np.uint8))
    assert ok
    plain = image_info_proto(prepare(png.tobytes(), limits=LIMITS))
    assert not plain.HasField("pixel_spacing")
    assert (plain.sop_instance_uid, plain.study_instance_uid, plain.modality, plain.transfer_syntax_uid) == (
        "",
        "",
        "",
        "",
    )


PROCESS_CHECK = """
import sys
import numpy as np
from services.imaging.ingest import decode
from services.imaging.limits import IngestLimits
data = open(sys.argv[1], "rb").read()
info = decode(data, limits=IngestLimits()).info
print(info.kind.name, info.rows, info.columns, "grpc" in sys.modules, "SimpleITK" in sys.modules)
"""


def test_the_package_is_pure_and_itk_stays_in_the_child(tmp_path: Path) -> None:
    """No gRPC import in ingest, and SimpleITK never loaded into the caller's process."""
    import subprocess
    import sys

    sitk = pytest.importorskip("SimpleITK")
    path = tmp_path / "v.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16)), str(path))
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", PROCESS_CHECK, str(path)], capture_output=True, text=True, timeout=120, cwd=root
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["NIFTI", "4", "5", "False", "False"]
