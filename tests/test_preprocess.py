"""Letterbox: aspect kept, black padding, and an inverse that puts boxes and masks back where they were."""

from __future__ import annotations

import numpy as np
import pytest

from services.imaging.preprocess import Letterbox, letterbox, window_to_uint8


@pytest.mark.parametrize("shape", [(1841, 1955), (512, 512), (300, 1200), (2500, 700), (64, 48)])
def test_letterbox_keeps_aspect_and_pads_black(shape: tuple[int, int]) -> None:
    image = np.full(shape, 200, np.uint8)
    square, transform = letterbox(image)
    assert square.shape == (1024, 1024) and square.dtype == np.uint8
    assert max(transform.resized_height, transform.resized_width) == 1024
    assert abs(transform.resized_width / transform.resized_height - shape[1] / shape[0]) < 0.02 * (shape[1] / shape[0])
    inside = square[
        transform.pad_top : transform.pad_top + transform.resized_height,
        transform.pad_left : transform.pad_left + transform.resized_width,
    ]
    assert (inside == 200).all()
    assert int(square.sum()) == 200 * inside.size  # everything outside the image is black


@pytest.mark.parametrize("shape", [(1841, 1955), (300, 1200), (2500, 700), (64, 48)])
def test_boxes_round_trip_within_one_pixel(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    transform = Letterbox.for_shape(*shape)
    h, w = shape
    x0 = rng.uniform(0, w * 0.8, 50)
    y0 = rng.uniform(0, h * 0.8, 50)
    boxes = np.stack([x0, y0, np.minimum(x0 + rng.uniform(1, w * 0.2, 50), w), np.minimum(y0 + 5, h)], axis=1)
    back = transform.boxes_to_original(transform.boxes_to_model(boxes))
    assert np.abs(back - boxes).max() < 1.0


def test_mask_goes_back_onto_the_original_grid() -> None:
    h, w = 1841, 1955
    transform = Letterbox.for_shape(h, w)
    original = np.zeros((h, w), np.uint8)
    original[400:900, 300:1000] = 1
    model_mask = transform.mask_to_model(original)
    assert model_mask.shape == (1024, 1024)
    back = transform.mask_to_original(model_mask[None])[0]
    assert back.shape == (h, w)
    dice = 2 * np.logical_and(back, original).sum() / (back.sum() + original.sum())
    assert dice > 0.99


def test_window_maps_range_and_inverts_monochrome1() -> None:
    pixels = np.array([[0, 500, 1000, 2000]], np.uint16)
    assert window_to_uint8(pixels, 0, 1000).tolist() == [[0, 127, 255, 255]]
    assert window_to_uint8(pixels, 0, 1000, invert=True).tolist() == [[255, 128, 0, 0]]


def test_empty_image_is_refused() -> None:
    with pytest.raises(ValueError, match="no pixels"):
        Letterbox.for_shape(0, 10)
