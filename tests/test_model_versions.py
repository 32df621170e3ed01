"""Model versions without servers: the versions file, promotion's evidence rule, shadow agreement, landing, weights."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from clients.models import judge, promote, rollback
from services.gateway.shadow import compare_classes, compare_detections, summarize
from services.gateway.versions import RoleVersions, ServingVersions, VersionsFileError, read_versions, write_versions
from services.settings import PROJECT_ROOT, load_settings
from training import model_repository
from training.train_from_review import is_heldout, read_manifest


def _report(parent: str, before: tuple[float, float], after: tuple[float, float]) -> dict[str, object]:
    keys = ("reviewed_heldout_ap50", "phantom_heldout_ap50")
    return {
        "parent_version": parent,
        "evaluation": {
            "parent": dict(zip(keys, before, strict=True)),
            "candidate": dict(zip(keys, after, strict=True)),
        },
    }


def test_a_candidate_not_worse_on_either_set_is_accepted_and_a_worse_one_is_refused_with_numbers() -> None:
    assert judge(_report("1", (0.2, 0.95), (0.6, 0.945)), "1", 0.01).ok
    worse = judge(_report("1", (0.2, 0.95), (0.6, 0.90)), "1", 0.01)
    assert not worse.ok and worse.reasons == [
        "phantom_heldout_ap50 0.9000 is worse than the serving version's 0.9500 (tolerance 0.01)"
    ]
    assert not judge(_report("1", (0.6, 0.95), (0.5, 0.95)), "1", 0.01).ok  # worse on the reviewed cases
    stale = judge(_report("1", (0.2, 0.95), (0.6, 0.95)), "2", 0.01)
    assert not stale.ok and "compares it with version 1, but version 2 is serving" in stale.reasons[0]
    assert not judge(None, "1", 0.01).ok
    assert not judge(_report("1", (float("nan"), 0.95), (0.6, 0.95)), "1", 0.01).ok


def test_the_gateway_view_follows_the_file_without_a_restart_and_a_pin_wins(tmp_path: Path) -> None:
    path = tmp_path / "versions.json"
    view = ServingVersions(path, {}, reload_interval_s=0.0, loaded={"detector": "1"})
    assert view.serving("detector") == "1" and view.candidate("detector") == ""
    write_versions(path, {"detector": RoleVersions(serving="1", candidate="2")})
    assert (view.serving("detector"), view.candidate("detector")) == ("1", "2")
    time.sleep(0.01)
    write_versions(path, {"detector": RoleVersions(serving="2", history=["1"])})
    assert (view.serving("detector"), view.candidate("detector")) == ("2", "")
    path.write_text("{not json")  # a bad edit keeps the last good state
    os.utime(path, ns=(time.time_ns(), time.time_ns()))
    assert view.serving("detector") == "2"
    with pytest.raises(VersionsFileError):
        read_versions(path)
    pinned = ServingVersions(path, {"detector": "1"}, reload_interval_s=0.0)
    assert pinned.serving("detector") == "1"


def test_shadow_agreement_counts_boxes_a_reviewer_would_see() -> None:
    box = np.array([[10.0, 10.0, 50.0, 50.0]])
    same = compare_detections((box, np.array([0.9])), (box + 2, np.array([0.7])), iou=0.5, min_score=0.5)
    assert same.agree and same.matched == 1
    missed = compare_detections((box, np.array([0.9])), (box, np.array([0.3])), iou=0.5, min_score=0.5)
    assert not missed.agree and (missed.serving_count, missed.candidate_count) == (1, 0)
    extra = compare_detections((np.zeros((0, 4)), np.zeros(0)), (box, np.array([0.8])), iou=0.5, min_score=0.5)
    assert not extra.agree
    assert compare_classes(np.array([0.2, 0.8]), np.array([0.4, 0.6])).agree
    assert not compare_classes(np.array([0.2, 0.8]), np.array([0.6, 0.4])).agree


def test_the_shadow_report_sums_up_per_version_pair(tmp_path: Path) -> None:
    path = tmp_path / "shadow.jsonl"
    rows = [("agree", 5.0), ("disagree", 7.0), ("error", 9.0), ("agree", 6.0)]
    path.write_text(
        "".join(
            json.dumps({"role": "detector", "serving": "1", "candidate": "2", "outcome": o, "ms": ms}) + "\n"
            for o, ms in rows
        )
    )
    summary = summarize(path, "detector")["1->2"]
    assert (summary["compared"], summary["agree"], summary["disagree"], summary["error"]) == (4, 2, 1, 1)
    assert summary["agreement"] == round(2 / 3, 4)


def _repository(tmp_path: Path) -> Path:
    repository = tmp_path / "models"
    model_repository.init_repository(repository, PROJECT_ROOT / "triton_models", ["detector"])
    return repository


def test_versions_land_whole_in_an_overlay_and_promotion_switches_the_file(tmp_path: Path) -> None:
    repository = _repository(tmp_path)
    assert (repository / "medgate_model_base.py").resolve() == (
        PROJECT_ROOT / "triton_models" / "medgate_model_base.py"
    )
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes((PROJECT_ROOT / "triton_models" / "detector" / "1" / "model.onnx").read_bytes())
    version = model_repository.land_version(
        repository, "detector", "1", {"model.onnx": onnx}, _report("1", (0.2, 0.95), (0.6, 0.95))
    )
    assert version == "2" and (repository / "detector" / "2" / "model.py").is_file()
    assert not [p for p in (repository / "detector").iterdir() if p.name.startswith(".")]  # no staging left
    assert model_repository.latest_policy(repository, "detector") == 2
    assert model_repository.unloads(repository, "detector", "1")  # a third version would unload version 1

    versions_file = tmp_path / "versions.json"
    write_versions(versions_file, {"detector": RoleVersions(serving="1", candidate="2")})
    settings = load_settings(None, triton={"model_repository": repository}, versions={"file": versions_file})
    verdict = promote(settings, "detector", "2", check_loaded=False)
    assert verdict.ok, verdict.reasons
    assert read_versions(versions_file)["detector"] == RoleVersions(serving="2", candidate="", history=["1"])
    assert not promote(settings, "detector", "2", check_loaded=False).ok  # serving already
    assert rollback(settings, "detector", check_loaded=False).ok
    assert read_versions(versions_file)["detector"].serving == "1"
    pinned = load_settings(
        None, triton={"model_repository": repository}, versions={"file": versions_file, "detector": "1"}
    )
    assert "unpin" in promote(pinned, "detector", "2", check_loaded=False).reasons[0]


def test_a_manifest_reads_back_with_its_images_and_the_split_is_stable(tmp_path: Path) -> None:
    import cv2

    image = np.full((1024, 1024), 40, np.uint8)
    cv2.imwrite(str(tmp_path / "loop-a.png"), image)
    line = {
        "source-ref": "s3://bucket/images/loop-a.png",
        "lesion-detection": {"annotations": [{"class_id": 0, "left": 100, "top": 200, "width": 30, "height": 40}]},
        "lesion-detection-metadata": {"type": "groundtruth/object-detection", "job-name": "a2i/loop-a"},
    }
    (tmp_path / "output.manifest").write_text(json.dumps(line) + "\n")
    (case,) = read_manifest(tmp_path / "output.manifest")
    assert case.name == "loop-a" and case.boxes.tolist() == [[100.0, 200.0, 130.0, 240.0]]
    names = [f"loop-{i}" for i in range(400)]
    held = {n for n in names if is_heldout(n, 0.3)}
    assert 0.22 < len(held) / len(names) < 0.38
    assert held == {n for n in names if is_heldout(n, 0.3)}  # the same cases every time


def test_the_detector_weights_come_back_from_its_onnx_exactly() -> None:
    from training import phantoms
    from training.detector_checkpoint import detector_from_onnx, max_difference

    onnx = PROJECT_ROOT / "triton_models" / "detector" / "1" / "model.onnx"
    images = np.stack(
        [
            phantoms.model_space(phantoms.generate(np.random.default_rng([11, i]), lesion_probability=1.0))["image"]
            for i in range(2)
        ]
    )
    assert max_difference(detector_from_onnx(onnx), onnx, images) < 1e-4
