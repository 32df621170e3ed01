"""The text segmenter's loop against the real servers: review -> export -> retrain -> version 2 -> promote.

Faint lesions (``training.phantoms`` lesion kind ``faint``: low contrast, 28-70 px) are the segmenter's weak kind:
version 1 finds next to none of them (lesion Dice about 0.07 on faint phantoms, 0.90 on standard ones). Faint
phantoms go through the gateway (Segment, prompt "lesion", PNG of the 1024 model square), land in the segmentation
flow's review (the shipped rule, min prompt score under 0.9, or an audit sample of every case here), are answered
by ``medgate reviewer --auto truth:FILE`` with their true lesion masks (a scripted reviewer; the service records
each answer as A2I's labeledImage PNG), are exported with ``medgate review export-manifest`` (Ground Truth's
semantic-segmentation lines, the label PNG beside each image) and retrained on by ``medgate train --role
segmenter_text`` (few steps, small replay: CI-sized). Triton (poll mode, an overlay repository outside the
checkout) loads version 2 beside version 1; the gateway keeps answering with version 1 until ``medgate models
promote segmenter_text 2`` accepts it, then answers with version 2 without a restart. Stated margins: lesion Dice
on faint phantoms never reviewed (through the gateway, before and after) rises by at least FAINT_GAIN; mean Dice
on the standard phantom held-out set (train's evaluation report, ONNX Runtime) falls at most STANDARD_TOLERANCE
(``versions.promote_tolerance``: promote checks it too). A second test, without servers: promote refuses a worse
segmenter (evaluated for real) and says why, and accepts one that is not worse.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clients.infer import array_of
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.versions import RoleVersions, read_versions, write_versions
from services.settings import PROJECT_ROOT
from tests.fixtures import png_bytes
from tests.retrain_fixtures import (
    RELOAD_INTERVAL_S,
    flow_toml,
    loop_servers,
    mask_png,
    medgate,
    medgate_env,
    until,
    write_truths,
)
from training import common, model_repository, phantoms

REVIEWED = 40  # faint phantoms through review (about 70% trained on, 30% held out by name hash)
FRESH = 16  # faint phantoms never reviewed, for the before/after lesion Dice through the gateway
STEPS = 60
REPLAY = 50
PHANTOM_HELDOUT = 60
CALIBRATION = 60
FAINT_GAIN = 0.05  # lesion Dice on fresh faint phantoms rises at least this much (measured here: 0.055 -> 0.140)
STANDARD_TOLERANCE = 0.02  # mean Dice on the standard held-out set falls at most this much (promote_tolerance)
FLOW_NAME = "segmentation-review"
PROMPT = "lesion"

# The shipped rule (config/flows.toml) with an audit sample of every case, so the test does not depend on how
# many faint lesions the calibrated score happens to catch.
FLOW = flow_toml(
    FLOW_NAME,
    "segmentation",
    ["left lung", "right lung", "heart", "lesion"],
    {
        "Or": [
            {
                "ConditionType": "ConfidenceLessThan",
                "ConditionParameters": {"Score": "min_prompt", "ConfidenceLessThan": 0.9},
            },
            {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}},
        ]
    },
)


def _faint(key: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    seed, index = key
    rng = np.random.default_rng([seed, index])
    sample = phantoms.model_space(phantoms.generate(rng, lesion_probability=1.0, lesion_kind="faint"))
    return sample["image"], sample["lesion"]


def _phantoms(seed: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    with ProcessPoolExecutor(max_workers=common.THREADS) as pool:
        return list(pool.map(_faint, [(seed, i) for i in range(count)]))


async def _segment_all(stub: pb_grpc.InferenceStub, images: list[np.ndarray]) -> list[pb.SegmentResponse]:
    return [
        await stub.Segment(pb.SegmentRequest(image=pb.ImageInput(data=png_bytes(image)), prompts=PROMPT), timeout=60)
        for image in images
    ]


def _lesion_dice(answers: list[pb.SegmentResponse], cases: list[tuple[np.ndarray, np.ndarray]]) -> float:
    pairs = zip(answers, cases, strict=True)
    return float(np.mean([common.dice(array_of(a.image_features)[0], truth) for a, (_, truth) in pairs]))


@pytest.mark.triton
async def test_reviewed_faint_lesion_masks_retrain_the_segmenter_and_promote(tmp_path: Path) -> None:
    started = time.monotonic()
    reviewed, fresh = _phantoms(8101, REVIEWED), _phantoms(8102, FRESH)
    truth_file = write_truths(
        tmp_path / "truth.jsonl", [(image, {"masks": {PROMPT: mask_png(lesion)}}) for image, lesion in reviewed]
    )
    print(f"phantoms made in {time.monotonic() - started:.0f} s")

    async with loop_servers(tmp_path, "segmenter_text", FLOW) as servers:
        stub, review, repository = servers.stub, servers.review, servers.repository
        # 1. Before: version 1 misses faint lesions; every case is routed to the segmentation flow.
        answers = await _segment_all(stub, [image for image, _ in reviewed])
        names = {a.review[0].human_loop_name for a in answers if a.review}
        assert len(names) == REVIEWED
        await until(
            lambda: len(review.store.list(flow=FLOW_NAME, status="InProgress")[0]) >= REVIEWED,
            60,
            "the routed cases in the review store",
        )

        # 2. The scripted reviewer draws each true lesion mask; the cases are exported.
        await servers.answer_all(FLOW_NAME, truth_file, REVIEWED)
        fresh_before = await _segment_all(stub, [image for image, _ in fresh])  # routed, never answered
        assert {m.version for a in fresh_before for m in a.models} == {"1"}
        before = _lesion_dice(fresh_before, fresh)
        manifest = await servers.export(FLOW_NAME, tmp_path / "export")
        lines = [json.loads(line) for line in manifest.read_text().splitlines()]
        assert len(lines) == REVIEWED
        metadata = lines[0][f"{FLOW_NAME}-ref-metadata"]
        assert metadata["type"] == "groundtruth/semantic-segmentation"
        assert [c["class-name"] for c in metadata["internal-color-map"].values()] == ["BACKGROUND", PROMPT]
        assert all((manifest.parent / line[f"{FLOW_NAME}-ref"]).is_file() for line in lines)

        # 3. Retrain: version 2 lands as the candidate with its own calibration; version 1 still serves.
        report = await servers.train(
            "segmenter_text",
            manifest,
            steps=STEPS,
            replay=REPLAY,
            phantom_heldout=PHANTOM_HELDOUT,
            calibration_phantoms=CALIBRATION,
        )
        state = read_versions(servers.versions_file)["segmenter_text"]
        assert (state.serving, state.candidate) == ("1", "2")
        parent, candidate = report["evaluation"]["parent"], report["evaluation"]["candidate"]
        assert candidate["phantom_heldout_dice"] >= parent["phantom_heldout_dice"] - STANDARD_TOLERANCE
        assert candidate["reviewed_heldout_dice_lesion"] > parent["reviewed_heldout_dice_lesion"] + FAINT_GAIN
        assert report["calibration"]["refitted"]
        assert (repository / "segmenter_text" / "2" / "calibration.json").is_file()

        # 4. Triton loads version 2 beside 1 (poll); the gateway still answers with 1.
        await servers.loaded("segmenter_text", "1", "2")
        still = await _segment_all(stub, [image for image, _ in fresh[:2]])
        assert {m.version for a in still for m in a.models} == {"1"}

        # 5. Promotion is accepted; the gateway answers with version 2 without a restart.
        promoted = await servers.medgate("models", "promote", "segmenter_text", "2", timeout=60)
        assert promoted.returncode == 0, promoted.stderr
        await asyncio.sleep(3 * RELOAD_INTERVAL_S)
        fresh_after = await _segment_all(stub, [image for image, _ in fresh])
        assert {m.version for a in fresh_after for m in a.models} == {"2"}
        after = _lesion_dice(fresh_after, fresh)
        print(
            f"faint lesion Dice through the gateway: version 1 {before:.3f} -> version 2 {after:.3f};"
            f" standard held-out mean Dice {parent['phantom_heldout_dice']} -> {candidate['phantom_heldout_dice']}"
            f" (lesion {parent['phantom_heldout_dice_lesion']} -> {candidate['phantom_heldout_dice_lesion']})"
        )
        assert after >= before + FAINT_GAIN
    print(f"the whole loop took {time.monotonic() - started:.0f} s")


def test_promote_refuses_a_worse_segmenter_and_accepts_one_not_worse(tmp_path: Path) -> None:
    import torch

    from training import retrain_segmenter as seg
    from training.retrain_shared import phantom_set

    repository = tmp_path / "models"
    model_repository.init_repository(repository, PROJECT_ROOT / "triton_models", ["segmenter_text"])
    versions_file = tmp_path / "versions.json"
    write_versions(versions_file, {"segmenter_text": RoleVersions(serving="1")})
    env = medgate_env(
        triton_model_repository=repository, versions_file=versions_file, security_audit_dir=tmp_path / "audit"
    )
    serving_onnx = repository / "segmenter_text" / "1" / "model.onnx"

    # A worse candidate, evaluated for real: version 1's weights with the lesion channel's logits lowered.
    model, _ = seg.load(repository / "segmenter_text" / "1")
    with torch.no_grad():
        assert model.head.bias is not None
        model.head.bias[4 * seg.LESION : 4 * seg.LESION + 4] -= 8.0  # pixel-shuffled: 4 outputs per channel
    work = common.REPO / ".cache" / "test-retrain-segmenter"
    work.mkdir(parents=True, exist_ok=True)
    worse_onnx = work / f"worse-{os.getpid()}.onnx"
    common.export_onnx(seg.serving(model), worse_onnx, ["masks", "scores", "areas"])
    seg.finish_export(worse_onnx)
    standard = phantom_set("heldout", 24, full=True)
    heldout = [
        seg.SegmentedCase(
            f"case-{i}",
            image,
            np.packbits(np.stack([np.zeros_like(lesion)] * seg.LESION + [lesion]).reshape(4, -1), axis=-1),
            np.packbits(np.ones((4, 1024 * 1024), bool), axis=-1),
            [seg.LESION],
        )
        for i, (image, lesion) in enumerate(_phantoms(8111, 4))
    ]
    serving = seg.measure(serving_onnx, heldout, standard)

    def land(onnx: Path, evaluation: dict[str, Any]) -> str:
        report = {"role": "segmenter_text", "parent_version": "1", "evaluation": evaluation}
        return model_repository.land_version(repository, "segmenter_text", "1", {"model.onnx": onnx}, report)

    try:
        worse = land(worse_onnx, {"parent": serving, "candidate": seg.measure(worse_onnx, heldout, standard)})
    finally:
        worse_onnx.unlink(missing_ok=True)

    async def cli(*args: str) -> Any:
        return await medgate(*args, env=env, timeout=120)

    refused = asyncio.run(cli("models", "promote", "segmenter_text", worse, "--no-triton-check"))
    assert refused.returncode == 1
    assert refused.stderr.startswith("refused: ") and "phantom_heldout_dice" in refused.stderr, refused.stderr
    assert read_versions(versions_file)["segmenter_text"].serving == "1"

    same = land(serving_onnx, {"parent": serving, "candidate": serving})
    accepted = asyncio.run(cli("models", "promote", "segmenter_text", same, "--no-triton-check"))
    assert accepted.returncode == 0, accepted.stderr
    assert read_versions(versions_file)["segmenter_text"].serving == same
