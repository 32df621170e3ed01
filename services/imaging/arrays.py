"""NumPy arrays on the wire as {data, shape, dtype}: raw bytes or bit-packed 0/1 masks."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ALLOWED_DTYPES = frozenset({"uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64", "bool"})


@dataclass(frozen=True)
class WireArray:
    """An array ready for the wire; ``packbits`` says that ``data`` is ``np.packbits`` of a 0/1 array."""

    data: bytes
    shape: tuple[int, ...]
    dtype: str
    packbits: bool = False


def encode_array(array: np.ndarray, *, packbits: bool = False) -> WireArray:
    """Little-endian C-order bytes; with ``packbits`` a 0/1 array is sent 8x smaller."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if packbits:
        if array.dtype.kind not in "biu":
            raise ValueError(f"packbits needs an integer 0/1 array, got {array.dtype.name}")
        data = np.packbits(array.astype(bool, copy=False).ravel()).tobytes()
    else:
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return WireArray(data=data, shape=tuple(int(n) for n in array.shape), dtype=dtype.name, packbits=packbits)


def decode_array(data: bytes, shape: tuple[int, ...] | list[int], dtype: str, *, packbits: bool = False) -> np.ndarray:
    """The inverse of :func:`encode_array`; raises ValueError naming what does not fit."""
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape):
        raise ValueError(f"array shape {list(shape)} has a negative dimension")
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype!r} is not one of {sorted(ALLOWED_DTYPES)}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if packbits:
        expected = (count + 7) // 8
        if len(data) != expected:
            raise ValueError(f"packed array of shape {list(shape)} needs {expected} bytes, got {len(data)}")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
        return bits.astype(np.dtype(dtype), copy=False).reshape(shape)
    item = np.dtype(dtype).newbyteorder("<")
    expected = count * item.itemsize
    if len(data) != expected:
        raise ValueError(f"array of shape {list(shape)} and dtype {dtype} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype=item).reshape(shape)
