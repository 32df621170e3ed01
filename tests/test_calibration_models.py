"""The shipped calibration in the real tritonserver and the real gateway: model.py applies calibration.json, the
lesion prompt's score tells a good mask from a bad one (a score is the probability that the mask is right), the
segmentation-review flow no longer takes every lesion prompt, and ``medgate review simulate`` prints its two
numbers on a small folder."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from clients import cli
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.security.identity import Role
from tests.conftest import Clients
from tests.fixtures import phantom, png_bytes
from training.calibration import MODELS_DIR, dice, serving_calibration
from training.phantom_folder import write_folder
from training.phantoms import model_space

# Phantoms of tests/fixtures.phantom (lesion_probability 1.0) whose lesion mask the text segmenter gets right, and
# one whose 140-pixel nodule it segments badly (Dice 0.45, found by running the model over seeds 13..43).
GOOD_LESION_SEEDS = (5, 6, 7, 8)
BAD_LESION_SEED = 28
NORMAL_SEED = 31
FLOW = "segmentation-review"
PROMPTS = ("left lung", "right lung", "heart", "lesion")


@pytest.fixture(scope="module")
def client(triton_url: str) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(triton_url)


def _input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _raw(model: str, image: np.ndarray) -> list[np.ndarray]:
    """The committed graph's raw outputs for one uint8 model-space image (onnxruntime, no calibration)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(MODELS_DIR / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return list(session.run(None, {"image": image[None, None]}))


def _lesion(client: triton_grpc.InferenceServerClient, image: np.ndarray) -> tuple[np.ndarray, float]:
    prompts = np.array([[b"lesion"]], dtype=np.object_)
    result = client.infer(
        "segmenter_text", [_input("image", image[None], "UINT8"), _input("prompts", prompts, "BYTES")]
    )
    return result.as_numpy("masks")[0, 0], float(result.as_numpy("scores")[0, 0])


def test_classifier_serves_the_shipped_temperature(client: triton_grpc.InferenceServerClient) -> None:
    cal = serving_calibration().Calibration.load(str(MODELS_DIR / "classifier" / "1"))
    image = model_space(phantom(5, lesion_probability=1.0))["image"]
    (raw,) = _raw("classifier", image)
    served = client.infer("classifier", [_input("image", image[None], "UINT8")]).as_numpy("probabilities")[0]
    expected = cal("lesion_probability", raw[:, 1])[0]
    assert served[1] == pytest.approx(expected, abs=1e-5) and served[0] == pytest.approx(1 - expected, abs=1e-5)
    assert (served[1] >= 0.5) == (raw[0, 1] >= 0.5)  # the decision is the graph's


def test_lesion_score_follows_the_mask_quality(client: triton_grpc.InferenceServerClient) -> None:
    """Raw, every lesion mask scored ~0.545 whatever its quality; served, a right mask scores high and a false one
    low, each exactly the shipped score head applied to the graph's statistics."""
    cal = serving_calibration()
    head = cal.Calibration.load(str(MODELS_DIR / "segmenter_text" / "1"))
    good = []
    for seed in GOOD_LESION_SEEDS:
        sample = model_space(phantom(seed, lesion_probability=1.0))
        mask, score = _lesion(client, sample["image"])
        assert dice(mask, sample["lesion"]) >= 0.5
        _, scores4, areas4, peaks4 = _raw("segmenter_text", sample["image"])
        raw, area, peak = scores4[:, 3], areas4[:, 3], peaks4[:, 3]
        assert 0.5 < raw[0] < 0.57  # the capped lesion channel
        assert score == pytest.approx(head("lesion", raw, cal.mask_features(raw, area, peak))[0], abs=1e-5)
        good.append(score)
    sample = model_space(phantom(BAD_LESION_SEED, lesion_probability=1.0))
    mask, bad = _lesion(client, sample["image"])
    assert mask.any() and dice(mask, sample["lesion"]) < 0.5
    assert min(good) >= 0.9 and bad < min(good) - 0.05
    # An image without a lesion, an empty mask and a low peak: a right answer, scored high (a missed nodule lifts
    # the peak and lowers the score; one that leaves no trace at all cannot be told from a clean chest).
    normal = model_space(phantom(NORMAL_SEED, lesion_probability=0.0))
    mask, empty_score = _lesion(client, normal["image"])
    peak = _raw("segmenter_text", normal["image"])[3][:, 3]
    zero = np.zeros(1, np.float32)
    assert not mask.any() and peak[0] < 0.05
    assert empty_score == pytest.approx(head("lesion", zero, cal.mask_features(zero, zero, peak))[0], abs=1e-5)
    assert empty_score >= 0.95


async def test_segmentation_review_no_longer_takes_every_lesion_prompt(stub: pb_grpc.InferenceStub) -> None:
    routed = []
    for seed in GOOD_LESION_SEEDS:
        image = png_bytes(phantom(seed, lesion_probability=1.0).image)
        answer = await stub.Segment(pb.SegmentRequest(image=pb.ImageInput(data=image), prompts=" & ".join(PROMPTS)))
        lesion = next(p for p in answer.prompts if p.prompt == "lesion")
        assert lesion.area_pixels > 0
        routed.append(any(r.flow_definition == FLOW for r in answer.review))
    assert not all(routed), "every lesion image still goes to review"


async def test_review_simulate_prints_both_numbers(
    gateway: GatewayServer, clients: Clients, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = write_folder(tmp_path / "phantoms", 4)
    assert len(json.loads(labels.read_text())["images"]) == 4
    argv = [
        "review",
        *clients.flags(Role.INFERENCE),
        "simulate",
        "--flow",
        FLOW,
        "--threshold",
        "1.0",  # every score is under 1.0: all sent, every wrong answer caught
        "--gateway",
        f"127.0.0.1:{gateway.port}",
        "--labels",
        str(labels),
        str(tmp_path / "phantoms"),
    ]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "sent to review: 4/4 = 1.000" in out
    assert "wrong answers caught:" in out and "unknown" not in out

    argv[argv.index("1.0")] = "0.0"  # nothing is under 0: none sent
    del argv[argv.index("--labels") : argv.index("--labels") + 2]
    assert await asyncio.to_thread(cli.main, argv) == 0
    out = capsys.readouterr().out
    assert "sent to review: 0/4 = 0.000" in out and "wrong answers caught: unknown (no --labels)" in out
