"""A2I output.json and SageMaker augmented manifests, checked field by field on real files."""

from __future__ import annotations

import json
import os
import stat
import struct
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.review.flows import FlowDefinition, InvalidArgument, TaskType
from services.review.output import (
    MANIFEST_FILE,
    atomic_write,
    export_manifest,
    flush_outputs,
    image_size,
    iso_time,
    output_document,
    output_path,
    write_output,
)
from services.review.store import InvalidState, ReviewStore

T0 = datetime(2024, 3, 5, 6, 7, 8, 250_000, tzinfo=UTC).timestamp()


class FakeClock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def png(width: int, height: int, channels: int = 1) -> bytes:
    """A real, minimal PNG (grey or RGB), so sizes come from a genuine header."""
    color_type = {1: 0, 3: 2}[channels]
    rows = b"".join(b"\x00" + bytes(width * channels) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def boxes(*items: tuple[str, float, float, float, float], width: int = 64, height: int = 48) -> dict[str, Any]:
    return {
        "annotatedResult": {
            "boundingBoxes": [
                {"label": label, "left": left, "top": top, "width": w, "height": h} for label, left, top, w, h in items
            ],
            "inputImageProperties": {"width": width, "height": height},
        }
    }


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[ReviewStore]:
    with ReviewStore(tmp_path / "review.db", now=clock) as opened:
        yield opened


def answer_all(store: ReviewStore, clock: FakeClock, flow: str, answers: dict[str, dict[str, Any]]) -> None:
    """Each reviewer leases one case and answers it 7 s later."""
    for reviewer, answer in answers.items():
        (delivery,) = store.lease(reviewer, [flow])
        clock.advance(7)
        store.submit(f"{reviewer}-{delivery.loop.name}", reviewer, answer, delivery_id=delivery.delivery_id)


def test_iso_time_is_a2i_style() -> None:
    assert iso_time(T0) == "2024-03-05T06:07:08.250Z"


def test_output_json_is_written_in_a2i_shape_and_layout(store: ReviewStore, clock: FakeClock, tmp_path: Path) -> None:
    flow = FlowDefinition("chest", TaskType.CLASSIFICATION, ("normal", "abnormal"), task_count=2)
    store.start_loop(flow, "case-1", {"taskObject": "case-1.png", "scores": {"normal": 0.55}}, "h1")
    clock.advance(2)
    answer_all(store, clock, "chest", {"alice": {"label": "normal"}, "bob": {"label": "abnormal"}})
    out = tmp_path / "a2i"
    path = write_output(store, "case-1", out)
    assert path == out / "chest/2024/03/05/06/07/08/case-1/output.json"
    document = json.loads(path.read_text())
    assert list(document) == ["flowDefinitionArn", "humanAnswers", "humanLoopName", "inputContent"]
    assert document["flowDefinitionArn"] == "medgate:flow-definition/chest"
    assert document["humanLoopName"] == "case-1"
    assert document["inputContent"] == {"taskObject": "case-1.png", "scores": {"normal": 0.55}}
    alice, bob = document["humanAnswers"]
    assert alice == {
        "acceptanceTime": "2024-03-05T06:07:10.250Z",
        "answerContent": {"label": "normal"},
        "submissionTime": "2024-03-05T06:07:17.250Z",
        "timeSpentInSeconds": 7,
        "workerId": "alice",
    }
    assert bob["workerId"] == "bob" and bob["answerContent"] == {"label": "abnormal"}
    assert bob["acceptanceTime"] == "2024-03-05T06:07:17.250Z" and bob["submissionTime"] == "2024-03-05T06:07:24.250Z"
    assert store.describe("case-1").output_path == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["output.json"]  # no temporary files left


def test_flush_outputs_is_an_outbox(store: ReviewStore, clock: FakeClock, tmp_path: Path) -> None:
    with_output = FlowDefinition("chest", TaskType.CLASSIFICATION, ("normal",), output_dir=tmp_path / "out")
    without_output = FlowDefinition("brain", TaskType.CLASSIFICATION, ("normal",))
    flows = {"chest": with_output, "brain": without_output}
    store.start_loop(with_output, "case-1", {}, "h1")
    store.start_loop(with_output, "case-2", {}, "h2")
    store.start_loop(without_output, "case-3", {}, "h3")
    answer_all(store, clock, "chest", {"alice": {"label": "normal"}})
    answer_all(store, clock, "brain", {"alice": {"label": "normal"}})
    written = flush_outputs(store, flows)
    assert [p.parent.name for p in written] == ["case-1"]
    assert flush_outputs(store, flows) == []  # already recorded
    with pytest.raises(InvalidState, match="InProgress"):
        write_output(store, "case-2", tmp_path / "out")
    answer_all(store, clock, "chest", {"bob": {"label": "normal"}})
    assert [p.parent.name for p in flush_outputs(store, flows)] == ["case-2"]


def test_output_path_uses_the_loop_creation_time_in_utc(store: ReviewStore, clock: FakeClock) -> None:
    flow = FlowDefinition("chest", TaskType.CLASSIFICATION, ("normal",))
    loop = store.start_loop(flow, "case-1", {}, "h")
    assert output_path(Path("/out"), loop) == Path("/out/chest/2024/03/05/06/07/08/case-1/output.json")
    assert output_document(loop, [])["humanAnswers"] == []


def test_atomic_write_replaces_whole_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "file.json"
    atomic_write(target, b"first")
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # readable as open() makes it, not mkstemp's 0600


def test_image_size_reads_png_headers() -> None:
    assert image_size(png(64, 48)) == (64, 48, 1)
    assert image_size(png(5, 7, channels=3)) == (5, 7, 3)
    assert image_size(b"\xff\xd8\xff\xe0 not a png") is None


DETECTION = FlowDefinition("lesions", TaskType.DETECTION, ("nodule", "mass"), task_count=2)


def test_detection_manifest_field_by_field(store: ReviewStore, clock: FakeClock, tmp_path: Path) -> None:
    first_image, second_image = png(64, 48), png(32, 32, channels=3)
    store.start_loop(DETECTION, "case-1", {}, "h1", images={"image.png": first_image})
    store.start_loop(DETECTION, "case-2", {}, "h2", images={"image.png": second_image})
    store.start_loop(DETECTION, "case-3", {}, "h3", images={"image.png": png(8, 8)})  # never completed
    store.start_loop(DETECTION, "case-4", {}, "h4")  # no image: skipped
    # case-1: two reviewers; the earliest answer is exported, as A2I's humanAnswers[0].
    answer_all(store, clock, "lesions", {"alice": boxes(("mass", 10, 5, 20, 15), ("nodule", 1, 2, 3, 4))})
    answer_all(store, clock, "lesions", {"bob": boxes(("mass", 11, 6, 20, 15))})
    # case-2: answered on a 64x64 view of the 32x32 image, so boxes scale down by 2.
    answer_all(store, clock, "lesions", {"alice": boxes(("nodule", 10, 20, 8, 6), width=64, height=64)})
    answer_all(store, clock, "lesions", {"bob": boxes(width=64, height=64)})
    for reviewer in ("carol", "dave"):
        for delivery in store.lease(reviewer, ["lesions"], max_in_flight=5, count=5):
            if delivery.loop.name == "case-4":
                store.submit(f"{reviewer}-4", reviewer, boxes(), delivery_id=delivery.delivery_id)
    out = tmp_path / "manifest"
    manifest = export_manifest(store, DETECTION, out, attribute="a2i-retraining", source_prefix="s3://bucket/x/")
    assert manifest == out / MANIFEST_FILE
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert list(first) == ["source-ref", "a2i-retraining", "a2i-retraining-metadata"]
    assert first["source-ref"] == "s3://bucket/x/case-1.png"
    assert first["a2i-retraining"] == {
        "annotations": [
            {"class_id": 1, "left": 10, "top": 5, "width": 20, "height": 15},
            {"class_id": 0, "left": 1, "top": 2, "width": 3, "height": 4},
        ],
        "image_size": [{"width": 64, "height": 48, "depth": 1}],
    }
    decisions = store.decisions("case-1")
    assert first["a2i-retraining-metadata"] == {
        "objects": [{"confidence": 1.0}, {"confidence": 1.0}],
        "class-map": {"0": "nodule", "1": "mass"},
        "type": "groundtruth/object-detection",
        "human-annotated": "yes",
        "creation-date": iso_time(decisions[0].submitted_at),
        "job-name": "a2i/case-1",
    }
    second = lines[1]
    assert second["source-ref"] == "s3://bucket/x/case-2.png"
    assert second["a2i-retraining"] == {
        "annotations": [{"class_id": 0, "left": 5, "top": 10, "width": 4, "height": 3}],
        "image_size": [{"width": 32, "height": 32, "depth": 3}],
    }
    assert (out / "case-1.png").read_bytes() == first_image
    assert (out / "case-2.png").read_bytes() == second_image
    assert sorted(p.name for p in out.iterdir()) == ["case-1.png", "case-2.png", MANIFEST_FILE]


def test_classification_manifest_uses_the_majority_label(store: ReviewStore, clock: FakeClock, tmp_path: Path) -> None:
    flow = FlowDefinition("triage", TaskType.CLASSIFICATION, ("normal", "pneumonia", "effusion"), task_count=3)
    store.start_loop(flow, "case-1", {}, "h1", images={"image.png": png(16, 16)})
    answer_all(
        store,
        clock,
        "triage",
        {"alice": {"label": "normal"}, "bob": {"label": "effusion"}, "carol": {"label": "effusion"}},
    )
    (line,) = [json.loads(text) for text in export_manifest(store, flow, tmp_path / "m").read_text().splitlines()]
    bob = next(d for d in store.decisions("case-1") if d.reviewer_id == "bob")
    assert line == {
        "source-ref": "case-1.png",
        "triage": 2,
        "triage-metadata": {
            "class-name": "effusion",
            "class-map": {"0": "normal", "1": "pneumonia", "2": "effusion"},
            "confidence": pytest.approx(2 / 3),
            "type": "groundtruth/image-classification",
            "human-annotated": "yes",
            "creation-date": iso_time(bob.submitted_at),
            "job-name": "a2i/case-1",
        },
    }


def test_manifest_skips_answers_the_flow_cannot_map(store: ReviewStore, clock: FakeClock, tmp_path: Path) -> None:
    flow = FlowDefinition("triage", TaskType.CLASSIFICATION, ("normal",))
    store.start_loop(flow, "case-1", {}, "h1", images={"image.png": png(4, 4)})
    answer_all(store, clock, "triage", {"alice": {"label": "retired-category"}})
    assert export_manifest(store, flow, tmp_path / "m").read_text() == ""


def test_manifest_refuses_bad_attributes(store: ReviewStore, tmp_path: Path) -> None:
    # (segmentation flows are exported: tests/test_retrain_segmenter.py reads their lines back)
    with pytest.raises(InvalidArgument, match="attribute"):
        export_manifest(store, DETECTION, tmp_path, attribute="labels-metadata")
