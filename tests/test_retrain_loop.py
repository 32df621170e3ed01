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
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.gateway.versions import read_versions
from services.review.server import ReviewServer
from services.settings import ENV_PREFIX, PROJECT_ROOT, load_settings
from services.triton.embedded import EmbeddedTriton
from tests.conftest import free_port
from tests.fixtures import png_bytes
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

FLOW = """
[[flows]]
name = "lesion-detection"
task_type = "detection"
categories = ["lesion"]
task_count = 1
task_availability_lifetime_s = 3600
task_time_limit_s = 600
output_dir = "output"
activation_conditions = '''
{"ConditionType": "ConfidenceLessThan", "ConditionParameters": {"Score": "max_box", "ConfidenceLessThan": 0.5}}
'''
"""


def _faint(seed: int, count: int) -> list[dict[str, Any]]:
    return [
        phantoms.model_space(
            phantoms.generate(np.random.default_rng([seed, i]), lesion_probability=1.0, lesion_kind="faint")
        )
        for i in range(count)
    ]


def _env(**settings: Any) -> dict[str, str]:
    """The environment of a `medgate` subprocess: these settings (section_field=value) on top of ours."""
    env = dict(os.environ)
    for name, value in settings.items():
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


async def _medgate(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; awaited, so the servers on this test's event loop keep serving it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return subprocess.CompletedProcess(args, process.returncode or 0, out.decode(), err.decode())


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


def _metric(port: int, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def _until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def _degraded_version(repository: Path, serving: str, reviewed_heldout: Path, report_of: dict[str, Any]) -> str:
    """A deliberately worse detector landed as the next version: the serving weights with noise, evaluated for real."""
    import torch

    from training.detector_checkpoint import load_detector
    from training.train_detector import Serving
    from training.train_from_review import _phantom_set, is_heldout, read_manifest

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
    standard = _phantom_set("heldout", PHANTOM_HELDOUT, full=True)
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
    repository = tmp_path / "models"
    model_repository.init_repository(repository, PROJECT_ROOT / "triton_models", ["detector"])
    versions_file, shadow_report = tmp_path / "versions.json", tmp_path / "shadow.jsonl"
    flows = tmp_path / "flows.toml"
    flows.write_text(FLOW)
    versions = {
        "file": versions_file,
        "reload_interval_s": 0.2,
        "shadow_fraction": 1.0,
        "shadow_report_file": shadow_report,
        "shadow_max_in_flight": 4,
    }
    sections: dict[str, dict[str, Any]] = dict(
        triton={
            "url": "",
            "model_repository": repository,
            "repository_poll_s": 1.0,
            "http_port": free_port(),
            "grpc_port": free_port(),
            "metrics_port": free_port(),
        },
        models={"classifier": "", "segmenter_text": "", "segmenter_box": ""},
        report={"enabled": False},
        review={
            "store_path": tmp_path / "review.sqlite3",
            "flows_file": flows,
            "port": 0,
            "housekeeping_interval_s": 0.2,
            "outbox_dir": tmp_path / "outbox",
        },
        gateway={"port": 0, "metrics_port": 0},
        versions=versions,
    )
    settings = load_settings(None, **sections)
    env = _env(
        triton_model_repository=repository,
        triton_grpc_port=settings.triton.grpc_port,
        review_store_path=settings.review.store_path,
        review_flows_file=flows,
        versions_file=versions_file,
        versions_shadow_report_file=shadow_report,
    )
    reviewed, fresh = _faint(7001, REVIEWED), _faint(7002, FRESH)
    truth_file = tmp_path / "truth.jsonl"
    truth_file.write_text(
        "".join(
            json.dumps({"image_sha256": hashlib.sha256(s["image"].tobytes()).hexdigest(), "boxes": s["boxes"].tolist()})
            + "\n"
            for s in reviewed
        )
    )

    with EmbeddedTriton(settings.triton) as triton:
        review = ReviewServer(settings.review, settings.security)
        await review.start(port=0)
        sections["review"]["url"] = f"127.0.0.1:{review.port}"
        gateway_settings = load_settings(None, **sections)
        gateway = GatewayServer(gateway_settings, triton.settings.grpc_url)
        await gateway.start(port=0)
        try:
            import grpc

            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = pb_grpc.InferenceStub(channel)
                # 1. Before: version 1 misses most faint lesions; each is routed to review.
                answers = await _detect_all(stub, [s["image"] for s in reviewed])
                names = {a.review[0].human_loop_name for a in answers if a.review}
                assert len(names) >= 0.9 * REVIEWED, f"only {len(names)} of {REVIEWED} faint cases were routed"
                await _until(
                    lambda: len(review.store.list(flow="lesion-detection", status="InProgress")[0]) >= len(names),
                    60,
                    "the routed cases in the review store",
                )

                # 2. The scripted reviewer answers each case with its true boxes; the cases are exported.
                done = await _medgate(
                    "reviewer",
                    "--reviewer-id",
                    "scripted",
                    "--flow",
                    "lesion-detection",
                    "--auto",
                    f"truth:{truth_file}",
                    "--limit",
                    str(len(names)),
                    "--target",
                    f"127.0.0.1:{review.port}",
                    env=env,
                    timeout=120,
                )
                assert done.returncode == 0, done.stderr
                assert done.stdout.count("submitted: loop COMPLETED") == len(names), done.stdout[-3000:]
                # Faint lesions never reviewed (they are routed too, and stay InProgress: never exported).
                fresh_before = await _detect_all(stub, [s["image"] for s in fresh])
                assert {a.model.version for a in fresh_before} == {"1"}
                before = _gateway_ap50(fresh_before, fresh)
                exported = tmp_path / "export"
                done = await _medgate(
                    "review",
                    "export-manifest",
                    "--flow",
                    "lesion-detection",
                    "--out",
                    str(exported),
                    env=env,
                    timeout=60,
                )
                assert done.returncode == 0, done.stderr
                manifest = exported / "output.manifest"
                assert len(manifest.read_text().splitlines()) == len(names), done.stderr[-3000:]

                # 3. Retrain: version 2 lands as the candidate; version 1 still serves.
                done = await _medgate(
                    "train",
                    "--role",
                    "detector",
                    "--manifest",
                    str(manifest),
                    "--steps",
                    str(STEPS),
                    "--replay",
                    str(REPLAY),
                    "--phantom-heldout",
                    str(PHANTOM_HELDOUT),
                    env=env,
                    timeout=400,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                print(done.stdout)
                report = json.loads((repository / "detector" / "2" / "evaluation.json").read_text())
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

                # 4. Triton loads version 2 beside 1 (poll); the gateway shadows it and still answers with 1.
                client = triton_grpc.InferenceServerClient(triton.settings.grpc_url)
                await _until(
                    lambda: client.is_model_ready("detector", "2") and client.is_model_ready("detector", "1"),
                    60,
                    "version 2 loaded",
                )
                client.close()
                shadowed = await _detect_all(stub, [s["image"] for s in fresh[:6]])
                assert {a.model.version for a in shadowed} == {"1"}
                for a, b in zip(shadowed, fresh_before[:6], strict=True):  # the caller's answer is unchanged
                    assert [(d.score, d.model_box.x0) for d in a.detections] == [
                        (d.score, d.model_box.x0) for d in b.detections
                    ]
                await _until(
                    lambda: shadow_report.exists() and len(shadow_report.read_text().splitlines()) >= 6, 60, "shadow"
                )
                lines = [json.loads(x) for x in shadow_report.read_text().splitlines()]
                assert len(lines) >= 6 and {(x["serving"], x["candidate"]) for x in lines} == {("1", "2")}
                assert {x["outcome"] for x in lines} <= {"agree", "disagree"}
                assert _metric(gateway.metrics_port, 'medgate_shadow_comparisons_total{candidate="2"') >= 6
                shown = await _medgate("models", "shadow-report", "detector", env=env, timeout=60)
                assert json.loads(shown.stdout)["1->2"]["compared"] == len(lines)

                # 5. A deliberately degraded candidate is refused, with the reason; version 2 is accepted.
                promoted = await _medgate("models", "promote", "detector", "2", env=env, timeout=60)
                assert promoted.returncode == 0, promoted.stderr
                await asyncio.sleep(3 * versions["reload_interval_s"])  # type: ignore[operator]
                after_answers = await _detect_all(stub, [s["image"] for s in fresh])
                assert {a.model.version for a in after_answers} == {"2"}  # no restart
                after = _gateway_ap50(after_answers, fresh)
                print(f"faint AP50 through the gateway: version 1 {before:.3f} -> version 2 {after:.3f}")
                assert after >= before + FAINT_GAIN

                degraded = _degraded_version(repository, "2", manifest, report)
                client = triton_grpc.InferenceServerClient(triton.settings.grpc_url)
                await _until(lambda: client.is_model_ready("detector", degraded), 60, "the degraded version loaded")
                client.close()
                refused = await _medgate("models", "promote", "detector", degraded, env=env, timeout=60)
                assert refused.returncode == 1
                assert "worse than the serving version" in refused.stderr, refused.stderr
                assert read_versions(versions_file)["detector"].serving == "2"
        finally:
            await gateway.stop()
            await review.stop()
    print(f"the whole loop took {time.monotonic() - started:.0f} s")
