"""``medgate batch`` against the real gateway: outputs, grouping, a corrupt file, resume and interruption."""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import shutil
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from clients import batch
from clients.cli import build_parser
from services.gateway.server import GatewayServer
from services.security.identity import Role
from tests.conftest import Clients
from tests.fixtures import (
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    dicom_bytes,
    png_bytes,
    pydicom_data_file,
)
from training.phantoms import generate

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = "left lung & heart"
SECRETS = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, PATIENT_NAME.split("^")[0])


def small_phantom(seed: int) -> np.ndarray:
    """A small phantom radiograph (uint16): enough for the models, quick to encode and send."""
    return generate(np.random.default_rng(seed), height=640, width=560).image


def one_series(count: int) -> list[bytes]:
    """``count`` phantom DICOMs of one study and one series, carrying patient data that must not leak."""
    files = []
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for index in range(count):
        ds = pydicom.dcmread(io.BytesIO(dicom_bytes(small_phantom(50 + index))))
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
        files.append(out.getvalue())
    return files


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real DICOM without extensions, a two-image series, PNGs and a JPEG, a corrupt DICOM and a text file."""
    root = tmp_path_factory.mktemp("batch-in")
    (root / "dicom").mkdir()
    for name in ("RG1_UNCI.dcm", "CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(pydicom_data_file(name), root / "dicom" / name.removesuffix(".dcm"))
    (root / "series").mkdir()
    for index, data in enumerate(one_series(2)):
        (root / "series" / f"IM{index:04d}").write_bytes(data)
    (root / "png").mkdir()
    for seed in (1, 2):
        (root / "png" / f"chest-{seed}").write_bytes(png_bytes(small_phantom(seed)))
    raw = small_phantom(3).astype(np.float32)
    eight_bit = ((raw - raw.min()) / max(float(np.ptp(raw)), 1.0) * 255).astype(np.uint8)
    (root / "png" / "chest-3.dat").write_bytes(cv2.imencode(".jpg", eight_bit)[1].tobytes())
    (root / "corrupt").write_bytes(dicom_bytes(small_phantom(4))[:400])  # preamble and meta, then cut
    (root / "notes.txt").write_text("not an image\n")
    return root


def bare_dicom(image: np.ndarray) -> bytes:
    """A DICOM data set without preamble or file meta (implicit VR little endian), as some archives store them."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(image)))
    del ds.file_meta
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_discovery_by_content_groups_and_keys(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    (folder / "a" / "b").mkdir(parents=True)
    image = small_phantom(7)
    bare = bare_dicom(image)
    (folder / "a" / "bare").write_bytes(bare)
    (folder / "a" / "b" / "x.png").write_bytes(png_bytes(image))
    (folder / "a" / "b" / "copy-of-x").write_bytes(png_bytes(image))
    (folder / "readme.dcm").write_text("a .dcm name does not make DICOM\n")
    (folder / "out").mkdir()
    (folder / "out" / "old.png").write_bytes(png_bytes(image))  # OUT inside the input: never scanned
    found = batch.discover([folder, folder / "readme.dcm"], folder / "out")
    by_name = {item.name: item for item in found.items}
    assert set(by_name) == {"a/bare", "a/b/copy-of-x", "readme.dcm"}
    sop = pydicom.dcmread(io.BytesIO(bare), force=True).SOPInstanceUID
    assert by_name["a/bare"].kind == "DICOM" and by_name["a/bare"].key == f"sop:{sop}"
    assert by_name["a/b/copy-of-x"].study == "folder:in/a/b" and by_name["a/b/copy-of-x"].key.startswith("sha256:")
    assert by_name["readme.dcm"].error == ("INVALID_ARGUMENT", "not a DICOM, PNG or JPEG file")  # named explicitly
    assert [(d.name, first.name) for d, first in found.duplicates] == [("a/b/x.png", "a/b/copy-of-x")]
    assert found.ignored == 0


def batch_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["batch", *argv, "--no-progress"])


def target(server: GatewayServer) -> str:
    return f"127.0.0.1:{server.port}"


def read_summary(out: Path) -> dict[str, dict[str, str]]:
    with (out / batch.SUMMARY_FILE).open(newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


def state_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / batch.STATE_FILE).read_text().splitlines() if line.strip()]


async def run_batch(server: GatewayServer, *argv: str) -> tuple[int, str]:
    stdout = io.StringIO()
    code = await batch.run_async(batch_args(*argv), target(server), stdout=stdout)
    return code, stdout.getvalue()


async def test_batch_writes_every_output_reports_the_corrupt_file_and_resumes(
    gateway: GatewayServer,
    clients: Clients,
    inputs: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    argv = (str(inputs), "--out", str(out), "--tasks", "classify,detect,segment", "--prompts", PROMPTS)
    argv += tuple(clients.flags(Role.INFERENCE))
    code, printed = await run_batch(gateway, *argv, "--mask-space", "both", "--overlays", "--concurrency", "3")
    assert code == 1  # the corrupt file failed; everything else went through

    rows = read_summary(out)
    expected = {
        "dicom/RG1_UNCI",
        "dicom/CT_small",
        "dicom/MR_small",
        "series/IM0000",
        "series/IM0001",
        "png/chest-1",
        "png/chest-2",
        "png/chest-3.dat",
        "corrupt",
    }
    assert set(rows) == expected  # found by content, not extension; notes.txt ignored
    assert rows["corrupt"]["status"] == "failed"
    assert rows["corrupt"]["error"].startswith("INVALID_ARGUMENT: ")
    assert all(rows[name]["status"] == "ok" for name in expected - {"corrupt"})
    for row in rows.values():
        if row["status"] == "ok":
            assert row["top_label"] in {"normal", "lesion"} and 0.0 <= float(row["top_score"]) <= 1.0
            assert int(row["detections"]) >= 0 and row["routed_to_review"] in {"yes", "no"}

    # Grouped by StudyInstanceUID/SeriesInstanceUID; PNG/JPEG by folder.
    rg1 = pydicom.dcmread(inputs / "dicom" / "RG1_UNCI", stop_before_pixels=True)
    assert rows["dicom/RG1_UNCI"]["study"] == rg1.StudyInstanceUID
    assert rows["series/IM0000"]["study"] == rows["series/IM0001"]["study"]
    assert rows["series/IM0000"]["series"] == rows["series/IM0001"]["series"] != ""
    assert rows["png/chest-1"]["study"] == rows["png/chest-3.dat"]["study"] == f"folder:{inputs.name}/png"
    assert f"study {rows['series/IM0000']['study']}" in printed
    assert "failed: corrupt: INVALID_ARGUMENT" in printed

    # RG1: the response as JSON without mask bytes, the masks in NPZ in both spaces, an overlay.
    stem = out / f"{rg1.StudyInstanceUID}/{rg1.SeriesInstanceUID}/{rg1.SOPInstanceUID}"
    assert (
        rows["dicom/RG1_UNCI"]["output"] == f"{rg1.StudyInstanceUID}/{rg1.SeriesInstanceUID}/{rg1.SOPInstanceUID}.json"
    )
    document = json.loads(stem.with_name(stem.name + ".json").read_text())
    assert document["request_id"] == f"sop:{rg1.SOPInstanceUID}"
    features = document["segmentation"]["image_features"]
    assert "data" not in features and features["npz_key"] == "masks" and features["shape"] == [2, 1024, 1024]
    assert "data" not in document["segmentation"]["original_masks"]
    assert document["classification"]["scores"] and "top_label" in document["classification"]
    with np.load(stem.with_name(stem.name + ".npz")) as npz:
        assert npz["masks"].shape == (2, 1024, 1024) and npz["masks"].dtype == np.uint8
        assert npz["original_masks"].shape == (2, 1955, 1841)
        assert list(npz["prompts"]) == ["left lung", "heart"]
    overlay = cv2.imread(str(stem.with_name(stem.name + ".overlay.png")))
    assert overlay is not None and overlay.shape == (1024, 1024, 3)
    png_json = json.loads((out / "files/png/chest-1.json").read_text())
    assert png_json["image"]["kind"] == "INPUT_KIND_PNG"
    with np.load(out / "files/png/chest-1.npz") as npz:
        assert npz["masks"].shape == (2, 1024, 1024) and npz["original_masks"].shape == (2, 640, 560)

    # No patient data anywhere we print or write.
    captured = capsys.readouterr()
    written = "".join(p.read_text() for p in out.rglob("*") if p.suffix in {".json", ".jsonl", ".csv"})
    for secret in SECRETS:
        for text in (printed, captured.out, captured.err, written):
            assert secret not in text

    # A second run redoes nothing that finished: only the failed file is tried again.
    finished = {p: p.stat().st_mtime_ns for p in out.rglob("*.json")}
    lines_before = len(state_lines(out))
    code, printed = await run_batch(gateway, *argv, "--mask-space", "both", "--overlays")
    assert code == 1
    assert "8 already done, 1 to process" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.json")} == finished
    retried = state_lines(out)[lines_before:]
    assert [r["file"] for r in retried] == ["corrupt"]
    assert read_summary(out) == rows


async def test_an_interrupted_batch_resumes_to_completion(
    gateway: GatewayServer, clients: Clients, tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    count = 12
    for seed in range(count):
        (folder / f"img{seed:02d}.png").write_bytes(png_bytes(small_phantom(100 + seed)))
    out = tmp_path / "out"
    argv = (str(folder), "--out", str(out), "--tasks", "classify", "--concurrency", "1", *clients.flags(Role.INFERENCE))

    # Stopped by the --limit hook: three done, the rest pending.
    code, printed = await run_batch(gateway, *argv, "--limit", "3")
    assert code == 0
    assert [r["status"] for r in read_summary(out).values()].count("pending") == count - 3
    assert len(state_lines(out)) == 3

    # Ctrl-C on a real process once it has finished at least one more file.
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "clients.cli",
        "batch",
        *argv,
        "--no-progress",
        "--target",
        target(gateway),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        for _ in range(1200):
            if len(state_lines(out)) >= 4 or process.returncode is not None:
                break
            await asyncio.sleep(0.025)
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
    done_at_interrupt = len(state_lines(out))
    assert process.returncode == 130, stderr.decode()[-2000:]
    assert 4 <= done_at_interrupt < count
    assert b"run again to resume" in stderr
    assert not list(out.rglob(f"*{batch.PARTIAL_SUFFIX}"))
    for record in state_lines(out):  # every recorded file has its complete outputs
        assert all((out / o).exists() for o in record["outputs"])
        json.loads((out / record["outputs"][-1]).read_text())

    # The next run finishes the rest, each file exactly once.
    code, printed = await run_batch(gateway, *argv)
    assert code == 0
    records = state_lines(out)
    assert len(records) == count and len({r["key"] for r in records}) == count
    assert all(row["status"] == "ok" for row in read_summary(out).values())
    assert f"{count} rows" in printed and "0 pending" in printed
    assert len(list((out / "files").glob("*.json"))) == count
