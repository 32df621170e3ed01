"""Tensors through shared memory with the real co-located Triton: same answers as over the wire, no leaks."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.settings import load_settings
from services.triton.client import TritonModels
from services.triton.embedded import SHM_PREFIX, admin_headers, remove_stale_server_regions
from services.triton.shm import PREFIX, remove_stale_regions
from training.phantoms import generate, model_space


def _regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(f"{PREFIX}_{os.getpid()}_")}


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    return np.asarray(model_space(generate(np.random.default_rng(77)))["image"])


async def _connected(triton_url: str, mode: str) -> TritonModels:
    models = TritonModels(triton_url, load_settings().models.as_dict(), shared_memory=mode)
    await models.connect()
    return models


@pytest.mark.asyncio(loop_scope="session")
async def test_shared_memory_gives_the_same_answers_as_the_wire(triton_url: str, phantom: np.ndarray) -> None:
    others = _regions()  # the session gateway's pool lives in this process too
    wire = await _connected(triton_url, "off")
    shared = await _connected(triton_url, "auto")  # loopback: auto turns it on
    try:
        assert shared.uses_shared_memory and not wire.uses_shared_memory
        deadline = time.monotonic() + 60
        np.testing.assert_allclose(
            await shared.classify(phantom, deadline=deadline), await wire.classify(phantom, deadline=deadline)
        )
        prompts = ["left lung", "heart", "lesion"]
        masks_s, scores_s, cats_s = await shared.segment_text(phantom, prompts, deadline=deadline)
        masks_w, scores_w, cats_w = await wire.segment_text(phantom, prompts, deadline=deadline)
        assert masks_s.shape == (3, 1024, 1024) and masks_s.dtype == np.uint8
        assert np.array_equal(masks_s, masks_w) and cats_s == cats_w
        np.testing.assert_allclose(scores_s, scores_w)
        assert masks_s[0].sum() > 10_000  # a real lung, not an empty region read back
        boxes = np.array([[300, 300, 500, 600], [520, 400, 760, 700]], np.float32)
        box_s, iou_s = await shared.segment_boxes(phantom, boxes, deadline=deadline)
        box_w, iou_w = await wire.segment_boxes(phantom, boxes, deadline=deadline)
        assert box_s.shape == (2, 1024, 1024) and np.array_equal(box_s, box_w)
        np.testing.assert_allclose(iou_s, iou_w, rtol=1e-5)
        assert _regions() - others, "the pool should hold its regions for reuse between calls"
    finally:
        await shared.close()
        await wire.close()
    assert not _regions() - others, "close() must unlink every region"


@pytest.mark.asyncio(loop_scope="session")
async def test_lost_registrations_fall_back_to_the_wire(triton_url: str, phantom: np.ndarray) -> None:
    """Triton restarted (its registrations gone): the call still answers, and shm is turned off."""
    others = _regions()
    models = await _connected(triton_url, "on")
    try:
        deadline = time.monotonic() + 60
        expected = await models.classify(phantom, deadline=deadline)
        assert models.uses_shared_memory
        admin = triton_grpc.InferenceServerClient(triton_url)
        for name in models.shared_memory_regions:  # as a Triton restart would (other pools' stay)
            for attempt in range(40):  # Triton lets go of a region a moment after the answer
                try:
                    admin.unregister_system_shared_memory(name, headers=admin_headers())
                    break
                except InferenceServerException:
                    if attempt == 39:
                        raise
                    time.sleep(0.05)
        again = await models.classify(phantom, deadline=deadline)
        np.testing.assert_allclose(again, expected)
        assert not models.uses_shared_memory
    finally:
        await models.close()
    assert not _regions() - others


def test_stale_regions_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345  # above pid_max on Linux by default
    (tmp_path / f"{PREFIX}_{dead_pid}_1").write_bytes(b"x")
    (tmp_path / f"{PREFIX}_{os.getpid()}_1").write_bytes(b"x")
    (tmp_path / "someone_else").write_bytes(b"x")
    assert remove_stale_regions(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{PREFIX}_{os.getpid()}_1", "someone_else"])


def test_stale_python_backend_regions_of_dead_servers_are_removed(tmp_path: Path) -> None:
    dead_pid = 2**22 + 12345
    (tmp_path / f"{SHM_PREFIX}_{dead_pid}_1_classifier").write_bytes(b"x")
    (tmp_path / f"{SHM_PREFIX}_{os.getpid()}_1_classifier").write_bytes(b"x")
    (tmp_path / f"{PREFIX}_{dead_pid}_1").write_bytes(b"x")  # the client's, not the server's: not this sweep's
    assert remove_stale_server_regions(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{SHM_PREFIX}_{os.getpid()}_1_classifier", f"{PREFIX}_{dead_pid}_1"]
    )
