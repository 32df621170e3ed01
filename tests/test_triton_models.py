"""The model repository in the real tritonserver: contracts, batches, held-out accuracy, and bad requests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.triton.client import CONTRACTS, check_contract
from tests.fixtures import phantom
from training.evaluate import evaluate
from training.phantoms import model_space

MODELS = ["classifier", "detector", "segmenter_text", "segmenter_box"]


@pytest.fixture(scope="module")
def client(triton_url: str) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(triton_url)


def _input(name: str, array: np.ndarray, datatype: str) -> triton_grpc.InferInput:
    tensor = triton_grpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _images(count: int) -> np.ndarray:
    return np.stack([model_space(phantom(200 + i))["image"] for i in range(count)])


def _prompts(rows: int, *prompts: str) -> np.ndarray:
    return np.array([[p.encode() for p in prompts]] * rows, dtype=np.object_)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_is_ready_and_fits_its_contract(client: triton_grpc.InferenceServerClient, name: str) -> None:
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name, as_json=True)
    config = client.get_model_config(name, as_json=True)["config"]
    check_contract(CONTRACTS[name], metadata, config)
    assert int(config["max_batch_size"]) >= 4


def test_batch_of_four_through_every_model(client: triton_grpc.InferenceServerClient) -> None:
    images = _images(4)
    image = _input("image", images, "UINT8")
    probabilities = client.infer("classifier", [image]).as_numpy("probabilities")
    assert probabilities.shape[0] == 4 and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)

    result = client.infer("detector", [image])
    assert result.as_numpy("boxes").shape == (4, 32, 4)
    assert result.as_numpy("scores").shape == (4, 32) and result.as_numpy("labels").dtype == np.int32
    assert result.as_numpy("count").shape == (4, 1)
    scores = result.as_numpy("scores")
    assert all(np.all(np.diff(row[: n[0]]) <= 0) for row, n in zip(scores, result.as_numpy("count"), strict=True))

    result = client.infer("segmenter_text", [image, _input("prompts", _prompts(4, "left lung", "heart"), "BYTES")])
    assert result.as_numpy("masks").shape == (4, 2, 1024, 1024) and result.as_numpy("masks").dtype == np.uint8
    assert result.as_numpy("scores").shape == (4, 2)
    assert [c.decode() for c in result.as_numpy("categories")[0]] == ["lung", "heart anatomies"]

    boxes = np.tile(np.array([[[300, 300, 700, 800]]], np.float32), (4, 1, 1))
    result = client.infer("segmenter_box", [image, _input("boxes", boxes, "FP32")])
    assert result.as_numpy("masks").shape == (4, 1, 1024, 1024)
    assert result.as_numpy("scores").shape == (4, 1)


def test_concurrent_requests_are_answered_each_with_its_own_result(client: triton_grpc.InferenceServerClient) -> None:
    images = _images(4)

    def classify(index: int) -> np.ndarray:
        return np.asarray(
            client.infer("classifier", [_input("image", images[index : index + 1], "UINT8")]).as_numpy("probabilities")
        )[0]

    together = client.infer("classifier", [_input("image", images, "UINT8")]).as_numpy("probabilities")
    with ThreadPoolExecutor(4) as pool:
        separately = list(pool.map(classify, range(4)))
    assert np.allclose(np.stack(separately), together, atol=1e-4)


def test_held_out_accuracy(triton_url: str) -> None:
    """A small fixed held-out set (the full one is `make eval-models`); thresholds a little under the targets."""
    metrics = evaluate(triton_url, count=24, box_count=4)
    assert metrics["classifier.accuracy"] >= 0.95
    assert metrics["detector.ap50"] >= 0.85
    for prompt in ("left lung", "right lung", "lungs", "heart"):
        assert metrics[f"segmenter_text.dice.{prompt}"] >= 0.93, prompt
    assert metrics["segmenter_text.dice.lesion"] >= 0.75
    assert metrics["segmenter_box.dice.anatomy"] >= 0.85
    assert metrics["segmenter_box.dice.lesion"] >= 0.8


def _assert_refused(
    client: triton_grpc.InferenceServerClient, model: str, inputs: list[triton_grpc.InferInput], fragment: str
) -> None:
    with pytest.raises(InferenceServerException) as failure:
        client.infer(model, inputs)
    assert fragment.lower() in failure.value.message().lower()


@pytest.mark.parametrize("model", MODELS)
def test_wrong_dtype_and_shape_are_refused_and_the_model_keeps_serving(
    client: triton_grpc.InferenceServerClient, model: str
) -> None:
    extra = {
        "segmenter_text": [_input("prompts", _prompts(1, "heart"), "BYTES")],
        "segmenter_box": [_input("boxes", np.array([[[100, 100, 400, 400]]], np.float32), "FP32")],
    }.get(model, [])
    _assert_refused(
        client, model, [_input("image", np.zeros((1, 1024, 1024), np.float32), "FP32"), *extra], "data-type"
    )
    _assert_refused(client, model, [_input("image", np.zeros((1, 512, 512), np.uint8), "UINT8"), *extra], "shape")
    result = client.infer(model, [_input("image", _images(1), "UINT8"), *extra])
    assert result.get_response() is not None


@pytest.mark.parametrize(
    ("prompts", "fragment"),
    [(("",), "empty"), (("  ",), "empty"), (("heart", "spleen"), "unknown prompt at prompts[0][1]")],
)
def test_text_segmenter_refuses_bad_prompts(
    client: triton_grpc.InferenceServerClient, prompts: tuple[str, ...], fragment: str
) -> None:
    image = _input("image", _images(1), "UINT8")
    _assert_refused(client, "segmenter_text", [image, _input("prompts", _prompts(1, *prompts), "BYTES")], fragment)
    ok = client.infer("segmenter_text", [image, _input("prompts", _prompts(1, "nodule"), "BYTES")])
    assert ok.as_numpy("masks").shape == (1, 1, 1024, 1024)


@pytest.mark.parametrize(
    ("box", "fragment"),
    [
        ([900, 900, 1100, 1000], "outside"),
        ([-5, 10, 100, 100], "outside"),
        ([100, 100, 100, 300], "area"),
        ([300, 300, 200, 400], "area"),
        ([np.nan, 0, 10, 10], "finite"),
    ],
)
def test_box_segmenter_refuses_bad_boxes(
    client: triton_grpc.InferenceServerClient, box: list[float], fragment: str
) -> None:
    image = _input("image", _images(1), "UINT8")
    _assert_refused(client, "segmenter_box", [image, _input("boxes", np.array([[box]], np.float32), "FP32")], fragment)
    ok = client.infer("segmenter_box", [image, _input("boxes", np.array([[[100, 100, 400, 400]]], np.float32), "FP32")])
    assert ok.as_numpy("masks").shape == (1, 1, 1024, 1024)
