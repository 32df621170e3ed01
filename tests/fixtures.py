"""Test inputs made at run time: phantom radiographs as PNG and DICOM bytes, and paths to registry data."""

from __future__ import annotations

import io
import os
from functools import cache
from pathlib import Path
from typing import NoReturn

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from training.phantoms import Phantom, generate


def unavailable(reason: str, tests: str) -> NoReturn:
    """A missing external part (Orthanc, dcmtk): skipped here, a failure under CI=true, where ``tests`` must run."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {reason}: {tests} must run in CI")
    pytest.skip(reason)


PATIENT_NAME = "Doe^Jane^Confidential"
PATIENT_ID = "PID-93412-SECRET"
PATIENT_BIRTH_DATE = "19471103"


@cache
def phantom(seed: int, lesion_probability: float = 0.5) -> Phantom:
    return generate(np.random.default_rng(seed), lesion_probability=lesion_probability)


def png_bytes(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def dicom_bytes(image: np.ndarray, *, modality: str = "DX", photometric: str = "MONOCHROME2") -> bytes:
    """A DX-like DICOM Part 10 file around ``image`` (uint16), with patient data that must never leak."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("phantom.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.Modality = modality
    ds.Rows, ds.Columns = image.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype="<u2").tobytes()
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def pydicom_data_file(name: str) -> Path:
    """A file from the pydicom-data package (real DICOM), e.g. RG1_UNCI.dcm."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"{name} is not in pydicom's or pydicom-data's test files"
    return Path(str(path))


def dicom_series(source: Path, count: int, directory: Path) -> tuple[list[Path], list[str], str]:
    """``count`` copies of ``source`` as one new series of one new study: (files, SOP instance UIDs, study UID)."""
    directory.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths, uids = [], []
    for number in range(1, count + 1):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        path = directory / f"{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(str(ds.SOPInstanceUID))
    return paths, uids, study
