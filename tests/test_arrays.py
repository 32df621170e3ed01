"""Arrays on the wire: raw and bit-packed round trips, and clear refusals of malformed arrays."""

from __future__ import annotations

import numpy as np
import pytest

from services.imaging.arrays import decode_array, encode_array


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int16", "float32"])
def test_raw_round_trip(dtype: str) -> None:
    array = (np.arange(24).reshape(2, 3, 4) * 3).astype(dtype)
    wire = encode_array(array)
    assert wire.shape == (2, 3, 4) and wire.dtype == dtype and not wire.packbits
    assert np.array_equal(decode_array(wire.data, wire.shape, wire.dtype), array)


def test_packbits_is_eight_times_smaller_and_exact() -> None:
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 1024, 1024)) > 0.7).astype(np.uint8)
    wire = encode_array(masks, packbits=True)
    assert len(wire.data) == masks.size // 8
    assert np.array_equal(decode_array(wire.data, wire.shape, wire.dtype, packbits=True), masks)


def test_big_endian_input_goes_out_little_endian() -> None:
    array = np.array([1, 256], dtype=">u2")
    wire = encode_array(array)
    assert wire.data == np.array([1, 256], "<u2").tobytes()


@pytest.mark.parametrize(
    ("data", "shape", "dtype", "message"),
    [
        (b"\x00" * 10, (4, 4), "uint8", "needs 16 bytes"),
        (b"\x00" * 4, (2, 2), "object", "dtype"),
        (b"", (-1, 2), "uint8", "negative"),
    ],
)
def test_malformed_arrays_are_named(data: bytes, shape: tuple[int, ...], dtype: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decode_array(data, shape, dtype)
