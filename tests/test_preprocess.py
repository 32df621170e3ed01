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


def _sizes(seed: int, count: int, low: int, high: int) -> list[tuple[int, int]]:
    """Random (height, width) pairs, odd and even, both orientations, plus fixed edge cases."""
    rng = np.random.default_rng(seed)
    return [(int(h), int(w)) for h, w in rng.integers(low, high + 1, (count, 2))]


# Upscaled (long side <= 1024): every size class that broke with corner sampling, plus edges.
UPSCALED = [*_sizes(1, 150, 1, 1024), (1, 1), (1, 1024), (1024, 1), (7, 1000), (1000, 7), (513, 1023), (1024, 1024)]
DOWNSCALED = [*_sizes(2, 60, 1025, 4000), (1025, 1025), (7, 5000), (5000, 7), (2048, 1), (3001, 2999)]


def _random_rectangle(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    y0 = int(rng.integers(0, h))
    x0 = int(rng.integers(0, w))
    return y0, int(rng.integers(y0 + 1, h + 1)), x0, int(rng.integers(x0 + 1, w + 1))


def test_rectangles_come_back_exactly_from_model_space_when_upscaled() -> None:
    """Original -> model -> original is the identity for images up to 1024 px, for any rectangle.

    OpenCV's INTER_NEAREST (pixel corners) moved an edge by one pixel on 306 of these 314 draws.
    """
    rng = np.random.default_rng(3)
    for h, w in UPSCALED:
        transform = Letterbox.for_shape(h, w)
        for _ in range(2):
            y0, y1, x0, x1 = _random_rectangle(rng, h, w)
            original = np.zeros((h, w), np.uint8)
            original[y0:y1, x0:x1] = 1
            model = transform.mask_to_model(original)
            assert model[: transform.pad_top].sum() == model[transform.pad_top + transform.resized_height :].sum() == 0
            back = transform.mask_to_original(model)
            assert np.array_equal(back, original), (h, w, (y0, y1, x0, x1))


def test_model_space_rectangles_come_back_exactly_when_downscaled() -> None:
    """Above 1024 px the model grid is the coarser one: model -> original -> model is the identity,
    and an original rectangle comes back with each edge within one model pixel (1/scale original pixels)."""
    rng = np.random.default_rng(4)
    for h, w in DOWNSCALED:
        transform = Letterbox.for_shape(h, w)
        y0, y1, x0, x1 = _random_rectangle(rng, transform.resized_height, transform.resized_width)
        model = np.zeros((1024, 1024), np.uint8)
        model[transform.pad_top + y0 : transform.pad_top + y1, transform.pad_left + x0 : transform.pad_left + x1] = 1
        original = transform.mask_to_original(model)
        assert original.shape == (h, w)
        assert np.array_equal(transform.mask_to_model(original), model), (h, w)
        # The rectangle on the original grid is the model rectangle's exact footprint.
        ys, xs = np.nonzero(original)
        left, top = transform.pad_left, transform.pad_top
        box = transform.boxes_to_original(np.array([[left + x0, top + y0, left + x1, top + y1]], np.float64))[0]
        assert np.abs([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] - box).max() <= 1.0
        # Drawn on the original instead: each edge moves by less than one model pixel.
        oy0, oy1, ox0, ox1 = _random_rectangle(rng, h, w)
        drawn = np.zeros((h, w), np.uint8)
        drawn[oy0:oy1, ox0:ox1] = 1
        back = transform.mask_to_original(transform.mask_to_model(drawn))
        ys, xs = np.nonzero(back)
        if xs.size:  # a rectangle thinner than a model pixel may fall between two centres
            tolerance = np.array([1 / transform.scale_x, 1 / transform.scale_y] * 2)
            edges = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) - [ox0, oy0, ox1, oy1]
            assert (np.abs(edges) < tolerance + 1e-9).all(), (h, w, edges)


def test_mask_planes_keep_their_leading_axes() -> None:
    transform = Letterbox.for_shape(300, 500)
    masks = np.zeros((2, 3, 1024, 1024), np.uint8)
    assert transform.mask_to_original(masks).shape == (2, 3, 300, 500)
    assert transform.mask_to_model(np.zeros((4, 300, 500), bool)).shape == (4, 1024, 1024)
    with pytest.raises(ValueError, match="does not match"):
        transform.mask_to_model(np.zeros((500, 300), np.uint8))


@pytest.mark.parametrize(("h", "w"), [(7, 5000), (5000, 7), (1, 3000), (3, 1025), (1025, 3), (2, 2049)])
def test_extreme_aspect_ratios_describe_the_resize_that_happened(h: int, w: int) -> None:
    """A 5000x7 image is resized to 1024x1: the short side's factor is 1/7, not 1024/5000.

    The nominal scale put the resized strip's edge 2 px short of the original's on the way back.
    """
    transform = Letterbox.for_shape(h, w)
    assert transform.scale == 1024 / max(h, w)
    assert transform.scale_x == transform.resized_width / w and transform.scale_y == transform.resized_height / h
    resized = np.array(
        [
            [
                transform.pad_left,
                transform.pad_top,
                transform.pad_left + transform.resized_width,
                transform.pad_top + transform.resized_height,
            ]
        ],
        np.float64,
    )
    assert np.array_equal(transform.boxes_to_original(resized), [[0, 0, w, h]])
    assert np.array_equal(transform.boxes_to_model(np.array([[0, 0, w, h]], np.float64)), resized)
    full = transform.mask_to_model(np.ones((h, w), np.uint8))
    assert int(full.sum()) == transform.resized_width * transform.resized_height
    assert transform.mask_to_original(full).all()
    square = transform.apply(np.full((h, w), 255, np.uint8))
    assert np.array_equal(square > 0, full > 0)  # the pixels the image was resized into, no more, no fewer


@pytest.mark.parametrize("shape", UPSCALED[::10] + DOWNSCALED[::10])
def test_boxes_round_trip_exactly_on_every_axis(shape: tuple[int, int]) -> None:
    h, w = shape
    transform = Letterbox.for_shape(h, w)
    boxes = np.array([[0, 0, w, h], [w / 3, h / 5, w / 2, h / 2]], np.float64)
    assert np.allclose(transform.boxes_to_original(transform.boxes_to_model(boxes)), boxes, rtol=0, atol=1e-9)


def test_window_maps_range_and_inverts_monochrome1() -> None:
    pixels = np.array([[0, 500, 1000, 2000]], np.uint16)
    assert window_to_uint8(pixels, 0, 1000).tolist() == [[0, 127, 255, 255]]
    assert window_to_uint8(pixels, 0, 1000, invert=True).tolist() == [[255, 128, 0, 0]]


def test_empty_image_is_refused() -> None:
    with pytest.raises(ValueError, match="no pixels"):
        Letterbox.for_shape(0, 10)
