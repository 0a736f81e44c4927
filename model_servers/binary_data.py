"""Tensors in the binary tensor data extension (Triton's `binary_data_size`).

Elements are little-endian in row-major order; BOOL is one byte per element; each BYTES
element is a 4-byte little-endian length followed by that many bytes.
"""

from __future__ import annotations

import math
import struct

import numpy as np

_LENGTH = struct.Struct("<I")


def tensor_from_bytes(raw: bytes, dtype: np.dtype, shape: list[int]) -> np.ndarray:
    """Decode `raw` as a tensor of `dtype` (object: BYTES) and `shape`; ValueError if malformed."""
    count = math.prod(shape)
    if dtype.kind == "O":
        return _bytes_elements(raw, count).reshape(shape)
    wire = dtype.newbyteorder("<")
    if len(raw) != count * wire.itemsize:
        raise ValueError(f"binary data has {len(raw)} bytes, needs {count * wire.itemsize}")
    array = np.frombuffer(raw, dtype=wire).reshape(shape)
    if dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
        raise ValueError("BOOL bytes must be 0 or 1")
    return array.astype(dtype, copy=False)


def _bytes_elements(raw: bytes, count: int) -> np.ndarray:
    out = np.empty(count, dtype=object)
    offset = 0
    for i in range(count):
        if offset + 4 > len(raw):
            raise ValueError(f"binary BYTES data ends after {i} elements")
        (size,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise ValueError(f"binary BYTES element {i} is truncated")
        out[i] = raw[offset : offset + size]
        offset += size
    if offset != len(raw):
        raise ValueError(f"{len(raw) - offset} bytes after the last element")
    return out


def tensor_to_bytes(array: np.ndarray) -> bytes:
    """Encode an array in the extension's binary layout (object arrays as BYTES)."""
    if array.dtype.kind not in "OSU":
        return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
    parts = []
    for value in array.reshape(-1).tolist():
        data = value if isinstance(value, bytes) else str(value).encode()
        parts += [_LENGTH.pack(len(data)), data]
    return b"".join(parts)
