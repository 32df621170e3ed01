"""Fairness and cost (issue 15 item 3): a request's cost is estimated before any model runs and refused over the
budget; nearby small boxes share one LiteMedSAM encoder pass; heavy box calls queue behind light ones.

The pure parts run without a server; the rest against the real embedded Triton and a real gateway.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton_grpc

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.cost import (
    BoxWindows,
    CostPrices,
    CostTooHigh,
    box_encoder_passes,
    box_groups,
    check_budget,
    estimate,
)
from services.gateway.server import GatewayServer
from services.rpc.status import status_for
from services.settings import PROJECT_ROOT, load_settings
from tests import fake_triton_python_backend_utils as fake_pb
from tests.fixtures import png_bytes
from training.phantoms import generate, model_space

REPOSITORY = PROJECT_ROOT / "triton_models"
PRICES = CostPrices(encoder_pass_ms=600.0, image_pass_ms=20.0, megapixel_ms=3.0, max_request_cost_ms=2000.0)


def _config_parameters() -> dict[str, str]:
    """The box model's parameters as its config.pbtxt ships them (the gateway reads the same from Triton)."""
    text = (REPOSITORY / "segmenter_box" / "config.pbtxt").read_text()
    parameters: dict[str, str] = {}
    for block in text.split("parameters:")[1:]:
        key = block.split('key: "', 1)[1].split('"', 1)[0]
        value = block.split('string_value: "', 1)[1].split('"', 1)[0]
        parameters[key] = value
    return parameters


def _cluster(count: int = 16, *, origin: tuple[int, int] = (430, 430), pitch: int = 40, radius: int = 9):
    """A phantom with ``count`` small round nodules in a square cluster; their tight boxes and masks."""
    sample = model_space(generate(np.random.default_rng(7), lesion_probability=0.0))
    image = sample["image"].copy()
    yy, xx = np.mgrid[0:1024, 0:1024]
    side = int(np.ceil(np.sqrt(count)))
    boxes, truths = [], []
    for i in range(count):
        cy, cx = origin[1] + (i // side) * pitch, origin[0] + (i % side) * pitch
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        image[disc] = np.clip(image[disc].astype(np.int32) + 90, 0, 255).astype(np.uint8)
        boxes.append([cx - radius - 2, cy - radius - 2, cx + radius + 3, cy + radius + 3])
        truths.append(disc)
    return image, np.array(boxes, np.float32), truths


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = float(a.sum() + b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


# --- pure: the estimate and the budget -----------------------------------------------------------------------------


def test_the_cost_counts_what_the_models_do() -> None:
    windows = BoxWindows.from_parameters(_config_parameters())
    _, cluster, _ = _cluster()
    scattered = np.array([[100 + 200 * (i % 4), 100 + 200 * (i // 4), 130 + 200 * (i % 4), 130 + 200 * (i // 4)]
                          for i in range(16)], np.float32)  # fmt: skip
    assert box_encoder_passes(cluster, windows) < 16
    assert box_encoder_passes(scattered, windows) == 16  # 200 px apart: no two share a 256 window
    lung = np.array([[100, 100, 600, 900]], np.float32)  # too large to zoom: the one whole-image pass
    assert box_encoder_passes(np.concatenate([lung, scattered]), windows) == 17
    assert box_encoder_passes(scattered, BoxWindows(group_max_side=0)) == 16
    assert box_encoder_passes(cluster, BoxWindows(group_max_side=0)) == 16
    assert box_encoder_passes(cluster[:1], BoxWindows(flip=True)) == 2

    cost = estimate(PRICES, pixels=2_000_000, image_passes=1, prompts=2, boxes=scattered, windows=windows)
    assert (cost.encoder_passes, cost.image_passes, cost.prompts, cost.pixels) == (16, 1, 18, 2_000_000)
    assert cost.ms == pytest.approx(16 * 600 + 20 + 2 * 3)


def test_over_budget_is_resource_exhausted_naming_the_cost_and_the_limit() -> None:
    windows = BoxWindows()
    scattered = np.array([[100 + 250 * i, 100, 140 + 250 * i, 140] for i in range(4)], np.float32)
    cost = estimate(PRICES, pixels=1024 * 1024, boxes=scattered, windows=windows)
    with pytest.raises(CostTooHigh) as refused:
        check_budget(cost, PRICES)
    code, message = status_for(refused.value)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request cost 2403 ms (4 encoder passes" in message and "limit of 2000 ms" in message, message
    check_budget(estimate(PRICES, pixels=1024 * 1024, boxes=scattered[:3], windows=windows), PRICES)  # 1803 ms
    check_budget(cost, CostPrices(600.0, 20.0, 3.0, max_request_cost_ms=0.0))  # 0: no limit


@pytest.fixture
def box_model_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """segmenter_box's model.py imported beside a fake pb_utils (its pure helpers only; nothing is loaded)."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb)
    monkeypatch.setattr(sys, "path", [str(REPOSITORY), *sys.path])
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    spec = importlib.util.spec_from_file_location("medgate_cost_box_model", REPOSITORY / "segmenter_box/1/model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("medgate_model_base", None)


def test_the_gateway_groups_boxes_as_the_model_does(box_model_module: ModuleType) -> None:
    """cost.box_groups is written twice (the model cannot import the services): the same groups, box for box."""
    windows = BoxWindows.from_parameters(_config_parameters())
    rng = np.random.default_rng(15)
    for trial in range(300):
        n = int(rng.integers(1, 17))
        centre = rng.uniform(0, 1024, size=(n, 2)) if trial % 2 else rng.uniform(380, 640, size=(n, 2))
        half = rng.uniform(3, 90, size=(n, 2))
        boxes = np.clip(np.concatenate([centre - half, centre + half], axis=1), 0, 1024).astype(np.float32)
        small = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) <= windows.roi_max_side
        ours = box_groups(boxes, windows)
        index = np.nonzero(small)[0]
        theirs = box_model_module._box_groups(
            boxes[small],
            windows.roi_factor,
            windows.roi_min_side,
            windows.group_max_side,
            windows.group_margin_min,
            windows.group_margin_frac,
        )
        assert ours == [[int(index[j]) for j in group] for group in theirs], trial
        for group in theirs:  # every member sits inside its shared window
            x, y, side = box_model_module._group_window(
                boxes[small][group],
                windows.roi_factor,
                windows.roi_min_side,
                windows.group_margin_min,
                windows.group_margin_frac,
            )
            member = boxes[small][group]
            assert (member[:, :2] >= [x, y]).all() and (member[:, 2:] <= [x + side, y + side]).all(), trial


# --- the real Triton ----------------------------------------------------------------------------------------------


def _ask(client: triton_grpc.InferenceServerClient, image: np.ndarray, boxes: np.ndarray, *, grouped: bool):
    inputs = [
        triton_grpc.InferInput("image", [1, 1024, 1024], "UINT8"),
        triton_grpc.InferInput("boxes", [1, len(boxes), 4], "FP32"),
    ]
    inputs[0].set_data_from_numpy(image[None])
    inputs[1].set_data_from_numpy(boxes[None])
    outputs = [triton_grpc.InferRequestedOutput(n) for n in ("masks", "scores", "encoder_passes")]
    started = time.perf_counter()
    result = client.infer(
        "segmenter_box", inputs, outputs=outputs, parameters=None if grouped else {"roi_group": "false"}
    )
    took = time.perf_counter() - started
    return result.as_numpy("masks")[0], int(result.as_numpy("encoder_passes").reshape(-1)[0]), took


def test_sixteen_nearby_boxes_share_encoder_passes(triton_url: str) -> None:
    """16 nodule boxes in a 160-pixel cluster: fewer than 16 encoder passes (as the gateway estimates), faster
    side by side than one window per box, and each mask as the box alone gives it."""
    image, boxes, truths = _cluster()
    client = triton_grpc.InferenceServerClient(triton_url)
    try:
        _ask(client, image, boxes[:1], grouped=True)  # warm-up
        grouped, passes, grouped_s = _ask(client, image, boxes, grouped=True)
        alone, alone_passes, alone_s = _ask(client, image, boxes, grouped=False)
    finally:
        client.close()
    expected = box_encoder_passes(boxes, BoxWindows.from_parameters(_config_parameters()))
    agreement = [_dice(g, a) for g, a in zip(grouped, alone, strict=True)]
    truth_grouped = [_dice(g, t) for g, t in zip(grouped, truths, strict=True)]
    truth_alone = [_dice(a, t) for a, t in zip(alone, truths, strict=True)]
    print(
        f"16 nearby boxes: {passes} encoder passes in {grouped_s:.2f} s grouped, {alone_passes} in {alone_s:.2f} s "
        f"one window each; grouped vs alone Dice mean {np.mean(agreement):.3f} min {min(agreement):.3f}; vs truth "
        f"{np.mean(truth_grouped):.3f} grouped, {np.mean(truth_alone):.3f} alone"
    )
    assert alone_passes == 16
    assert passes == expected and passes <= 4, (passes, expected)
    assert grouped_s < 0.6 * alone_s, (grouped_s, alone_s)
    assert np.mean(agreement) >= 0.9 and min(agreement) >= 0.75, agreement
    assert np.mean(truth_grouped) >= np.mean(truth_alone) - 0.03, (truth_grouped, truth_alone)


def test_a_light_box_call_goes_before_queued_heavy_ones(triton_url: str) -> None:
    """Priority levels: while one heavy call (level 2) runs, a second heavy one and then a light one (level 1) queue;
    the light one is answered first, not batched behind the heavy one."""
    image, _, _ = _cluster(1)
    scattered = np.array([[100 + 250 * i, 600, 140 + 250 * i, 640] for i in range(4)], np.float32)  # 4 passes
    light = np.array([[400, 400, 430, 430]], np.float32)
    done: dict[str, float] = {}
    errors: list[Exception] = []
    client = triton_grpc.InferenceServerClient(triton_url)

    def send(name: str, boxes: np.ndarray, priority: int) -> None:
        inputs = [
            triton_grpc.InferInput("image", [1, 1024, 1024], "UINT8"),
            triton_grpc.InferInput("boxes", [1, len(boxes), 4], "FP32"),
        ]
        inputs[0].set_data_from_numpy(image[None])
        inputs[1].set_data_from_numpy(boxes[None])

        def finished(result: Any, error: Exception | None) -> None:
            if error is not None:
                errors.append(error)
            done[name] = time.perf_counter()

        client.async_infer("segmenter_box", inputs, finished, priority=priority, client_timeout=600)

    try:
        _ask(client, image, light, grouped=True)  # warm-up
        send("heavy_running", scattered, 2)
        time.sleep(0.5)  # it is in the model now
        send("heavy_queued", scattered, 2)
        time.sleep(0.05)
        send("light", light, 1)
        deadline = time.monotonic() + 600
        while len(done) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.close()
    assert not errors, errors
    order = sorted(done, key=done.__getitem__)
    print(f"answered in order {order}; light {done['heavy_queued'] - done['light']:.2f} s before the queued heavy")
    assert order == ["heavy_running", "light", "heavy_queued"], order


# --- the gateway --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def budget_stub(triton_url: str) -> AsyncIterator[pb_grpc.InferenceStub]:
    """A gateway whose budget is 2 s of model time (4 encoder passes at 600 ms do not fit)."""
    settings = load_settings(
        gateway={"port": 0, "metrics_port": -1, "http_enabled": False, "max_request_cost_ms": 2000.0},
        review={"enabled": False},
    )
    server = GatewayServer(settings, triton_url)
    await server.start(port=0)
    try:
        options = [("grpc.max_receive_message_length", 64 << 20)]  # four 1024x1024 masks are 4 MiB
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
            yield pb_grpc.InferenceStub(channel)
    finally:
        await server.stop()


async def test_an_over_budget_segment_is_refused_before_the_model(budget_stub: pb_grpc.InferenceStub) -> None:
    image = pb.ImageInput(data=png_bytes(_cluster(1)[0]))
    scattered = [pb.Box(x0=100 + 250 * i, y0=100, x1=140 + 250 * i, y1=140) for i in range(4)]
    started = time.perf_counter()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await budget_stub.Segment(pb.SegmentRequest(image=image, boxes=scattered), timeout=60)
    took = time.perf_counter() - started
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details() or ""
    assert "request cost 2403 ms (4 encoder passes, 0 image passes, 4 prompts, 1.0 megapixels)" in message, message
    assert "exceeds the limit of 2000 ms per request (gateway.max_request_cost_ms)" in message, message
    assert took < 1.0, took  # refused before any encoder pass (each takes ~0.5-2 s here)

    # Four boxes side by side fit: one shared window.
    near = [pb.Box(x0=400 + 40 * i, y0=400, x1=420 + 40 * i, y1=420) for i in range(4)]
    answer = await budget_stub.Segment(pb.SegmentRequest(image=image, boxes=near), timeout=120)
    assert len(answer.prompts) == 4


def test_a_box_model_that_does_not_say_it_groups_is_priced_one_pass_per_box() -> None:
    _, cluster, _ = _cluster()
    assert box_encoder_passes(cluster, BoxWindows.from_parameters({})) == 16
    assert box_encoder_passes(cluster, BoxWindows.from_parameters({"roi_group_max_side": "256"})) < 16
