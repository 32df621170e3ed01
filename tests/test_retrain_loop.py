"""Seed 003's loop, closed, against the real servers: review -> export -> retrain -> version 2 in shadow -> promote.

Faint lesions (``training.phantoms`` lesion kind ``faint``: low contrast, 28-70 px), which the reference
detector mostly misses, go through the gateway (Detect, PNG of the 1024 model square), are routed to review
(seed 003's rule: top score under 0.5), are answered by ``medgate reviewer --auto truth:FILE`` with the true
boxes, exported with ``medgate review export-manifest``, and retrained on by ``medgate train`` (few steps, small
replay: CI-sized). Triton (poll mode, an overlay repository outside the checkout) loads version 2 beside
version 1; the gateway keeps answering with version 1 while it shadows version 2 on every request; ``medgate
models promote`` refuses a deliberately degraded version and accepts version 2, after which the gateway answers
with it without a restart. Stated margins: AP50 on faint lesions never reviewed (through the gateway, before
and after) rises by at least FAINT_GAIN; AP50 on the standard phantom held-out set (train's evaluation
report, ONNX Runtime with model.py's post-processing) stays within STANDARD_TOLERANCE.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.versions import read_versions
from tests.fixtures import png_bytes
from tests.retrain_fixtures import RELOAD_INTERVAL_S, flow_toml, loop_servers, metric, until, write_truths
from training import common, model_repository, phantoms
from training.train_from_review import ap50

pytestmark = pytest.mark.triton

REVIEWED = 48  # faint phantoms through review (about 70% trained on, 30% held out by name hash)
FRESH = 24  # faint phantoms never reviewed, for the before/after AP50 through the gateway
STEPS = 100
REPLAY = 50
PHANTOM_HELDOUT = 100
FAINT_GAIN = 0.10  # AP50 on faint lesions rises at least this much (measured beforehand: 0.19)
STANDARD_TOLERANCE = 0.02  # and falls at most this much on the standard held-out set (versions.promote_tolerance)
CALIBRATION = 100  # calibration-split phantoms the new version's calibration.json is refitted on

# Seed 003's rule (config/flows.toml): a human loop when the top detection score is under 0.5.
FLOW = flow_toml(
    "lesion-detection",
    "detection",
    ["lesion"],
    {"ConditionType": "ConfidenceLessThan", "ConditionParameters": {"Score": "max_box", "ConfidenceLessThan": 0.5}},
)


def _faint(seed: int, count: int) -> list[dict[str, Any]]:
    return [
        phantoms.model_space(
            phantoms.generate(np.random.default_rng([seed, i]), lesion_probability=1.0, lesion_kind="faint")
        )
        for i in range(count)
    ]


async def _detect_all(stub: pb_grpc.InferenceStub, images: list[np.ndarray]) -> list[pb.DetectResponse]:
    return [
        await stub.Detect(pb.DetectRequest(image=pb.ImageInput(data=png_bytes(image))), timeout=60) for image in images
    ]


def _gateway_ap50(answers: list[pb.DetectResponse], samples: list[dict[str, Any]]) -> float:
    detections = [
        (
            np.array([[d.model_box.x0, d.model_box.y0, d.model_box.x1, d.model_box.y1] for d in a.detections]).reshape(
                -1, 4
            ),
            np.array([d.score for d in a.detections]),
        )
        for a in answers
    ]
    return common.average_precision(detections, [s["boxes"] for s in samples], 0.5)[0]


def _degraded_version(repository: Path, serving: str, reviewed_heldout: Path, report_of: dict[str, Any]) -> str:
    """A deliberately worse detector landed as the next version: the serving weights with noise, evaluated for real."""
    import torch

    from training.detector_checkpoint import load_detector
    from training.train_detector import Serving
    from training.train_from_review import is_heldout, phantom_set, read_manifest

    model, _ = load_detector(repository / "detector" / serving)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(
                torch.randn(parameter.shape, generator=generator) * parameter.abs().mean().clamp_min(1e-3) * 0.5
            )
    work = common.REPO / ".cache" / "test-retrain-loop"
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"degraded-{os.getpid()}.onnx"
    common.export_onnx(Serving(model), onnx_path, ["boxes", "scores"])
    heldout = [
        c for c in read_manifest(reviewed_heldout) if is_heldout(c.name, report_of["training"]["heldout_fraction"])
    ]
    images, truths = np.stack([c.image for c in heldout]), [c.boxes for c in heldout]
    standard = phantom_set("heldout", PHANTOM_HELDOUT, full=True)
    standard_truths = [
        standard["boxes"][i, : standard["count"][i]].astype(np.float64) for i in range(len(standard["count"]))
    ]
    parent_onnx = repository / "detector" / serving / "model.onnx"
    report = {
        "role": "detector",
        "parent_version": serving,
        "training": {"note": "deliberately degraded by the test: weights plus noise"},
        "evaluation": {
            "parent": {
                "reviewed_heldout_ap50": ap50(parent_onnx, images, truths),
                "phantom_heldout_ap50": ap50(parent_onnx, standard["img1024"], standard_truths),
            },
            "candidate": {
                "reviewed_heldout_ap50": ap50(onnx_path, images, truths),
                "phantom_heldout_ap50": ap50(onnx_path, standard["img1024"], standard_truths),
            },
        },
    }
    try:
        return model_repository.land_version(repository, "detector", serving, {"model.onnx": onnx_path}, report)
    finally:
        onnx_path.unlink(missing_ok=True)


async def test_reviewed_faint_lesions_retrain_shadow_and_promote(tmp_path: Path) -> None:
    started = time.monotonic()
    reviewed, fresh = _faint(7001, REVIEWED), _faint(7002, FRESH)
    truth_file = write_truths(
        tmp_path / "truth.jsonl", ((s["image"], {"boxes": s["boxes"].tolist()}) for s in reviewed)
    )

    async with loop_servers(tmp_path, "detector", FLOW) as servers:
        stub, review, repository = servers.stub, servers.review, servers.repository
        versions_file, shadow_report = servers.versions_file, servers.shadow_report
        # 1. Before: version 1 misses most faint lesions; each is routed to review.
        answers = await _detect_all(stub, [s["image"] for s in reviewed])
        names = {a.review[0].human_loop_name for a in answers if a.review}
        assert len(names) >= 0.9 * REVIEWED, f"only {len(names)} of {REVIEWED} faint cases were routed"
        await until(
            lambda: len(review.store.list(flow="lesion-detection", status="InProgress")[0]) >= len(names),
            60,
            "the routed cases in the review store",
        )

        # 2. The scripted reviewer answers each case with its true boxes; the cases are exported.
        await servers.answer_all("lesion-detection", truth_file, len(names))
        # Faint lesions never reviewed (they are routed too, and stay InProgress: never exported).
        fresh_before = await _detect_all(stub, [s["image"] for s in fresh])
        assert {a.model.version for a in fresh_before} == {"1"}
        before = _gateway_ap50(fresh_before, fresh)
        manifest = await servers.export("lesion-detection", tmp_path / "export")
        assert len(manifest.read_text().splitlines()) == len(names)

        # 3. Retrain: version 2 lands as the candidate; version 1 still serves.
        report = await servers.train(
            "detector",
            manifest,
            steps=STEPS,
            replay=REPLAY,
            phantom_heldout=PHANTOM_HELDOUT,
            calibration_phantoms=CALIBRATION,
        )
        state = read_versions(versions_file)["detector"]
        assert (state.serving, state.candidate) == ("1", "2")
        evaluation = report["evaluation"]
        assert (
            evaluation["candidate"]["reviewed_heldout_ap50"]
            >= evaluation["parent"]["reviewed_heldout_ap50"] + FAINT_GAIN
        )
        assert (
            evaluation["candidate"]["phantom_heldout_ap50"]
            >= evaluation["parent"]["phantom_heldout_ap50"] - STANDARD_TOLERANCE
        )
        assert report["calibration"]["refitted"] and (repository / "detector" / "2" / "calibration.json").is_file()

        # 4. Triton loads version 2 beside 1 (poll); the gateway shadows it and still answers with 1.
        await servers.loaded("detector", "1", "2")
        shadowed = await _detect_all(stub, [s["image"] for s in fresh[:6]])
        assert {a.model.version for a in shadowed} == {"1"}
        for a, b in zip(shadowed, fresh_before[:6], strict=True):  # the caller's answer is unchanged
            assert [(d.score, d.model_box.x0) for d in a.detections] == [
                (d.score, d.model_box.x0) for d in b.detections
            ]
        await until(lambda: shadow_report.exists() and len(shadow_report.read_text().splitlines()) >= 6, 60, "shadow")
        lines = [json.loads(x) for x in shadow_report.read_text().splitlines()]
        assert len(lines) >= 6 and {(x["serving"], x["candidate"]) for x in lines} == {("1", "2")}
        assert {x["outcome"] for x in lines} <= {"agree", "disagree"}
        assert metric(servers.gateway.metrics_port, 'medgate_shadow_comparisons_total{candidate="2"') >= 6
        shown = await servers.medgate("models", "shadow-report", "detector", timeout=60)
        assert json.loads(shown.stdout)["1->2"]["compared"] == len(lines)

        # 5. A deliberately degraded candidate is refused, with the reason; version 2 is accepted.
        promoted = await servers.medgate("models", "promote", "detector", "2", timeout=60)
        assert promoted.returncode == 0, promoted.stderr
        await asyncio.sleep(3 * RELOAD_INTERVAL_S)
        after_answers = await _detect_all(stub, [s["image"] for s in fresh])
        assert {a.model.version for a in after_answers} == {"2"}  # no restart
        after = _gateway_ap50(after_answers, fresh)
        print(f"faint AP50 through the gateway: version 1 {before:.3f} -> version 2 {after:.3f}")
        assert after >= before + FAINT_GAIN

        degraded = _degraded_version(repository, "2", manifest, report)
        await servers.loaded("detector", degraded)
        refused = await servers.medgate("models", "promote", "detector", degraded, timeout=60)
        assert refused.returncode == 1
        assert "worse than the serving version" in refused.stderr, refused.stderr
        assert read_versions(versions_file)["detector"].serving == "2"
    print(f"the whole loop took {time.monotonic() - started:.0f} s")
