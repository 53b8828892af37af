"""numpy arrays <-> ``ckd.teacher.v1.Tensor`` ({dtype, shape, raw little-endian row-major bytes}).

Decoding validates everything a peer controls (dtype name, shape, byte count) and raises
``TensorCodecError`` naming the problem, so a server can answer INVALID_ARGUMENT instead of crashing.
"""
from __future__ import annotations

import numpy as np

from protos import teacher_pb2

# The dtypes allowed on the wire; names are numpy's. (bfloat16 has no numpy dtype: send float32.)
DTYPES: tuple[str, ...] = ("bool", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                           "uint64", "float16", "float32", "float64")
MAX_DIMS = 8


class TensorCodecError(ValueError):
    """A Tensor message cannot be decoded (unknown dtype, bad shape, wrong byte count)."""


def encode(array: np.ndarray) -> teacher_pb2.Tensor:
    """Encode an ndarray (any of DTYPES) as a Tensor message."""
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in DTYPES:
        raise TensorCodecError(f"dtype {name} cannot be sent; allowed: {', '.join(DTYPES)}")
    if arr.ndim > MAX_DIMS:
        raise TensorCodecError(f"tensor has {arr.ndim} dims; at most {MAX_DIMS} are allowed")
    little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return teacher_pb2.Tensor(dtype=name, shape=list(arr.shape), data=little.tobytes())


def decode(msg: teacher_pb2.Tensor, *, writable: bool = False) -> np.ndarray:
    """Decode a Tensor message; the result is in native byte order (read-only unless writable)."""
    if msg.dtype not in DTYPES:
        raise TensorCodecError(f"unknown tensor dtype {msg.dtype!r}; allowed: {', '.join(DTYPES)}")
    shape = tuple(int(s) for s in msg.shape)
    if len(shape) > MAX_DIMS:
        raise TensorCodecError(f"tensor has {len(shape)} dims; at most {MAX_DIMS} are allowed")
    if any(s < 0 for s in shape):
        raise TensorCodecError(f"tensor shape {list(shape)} has a negative dimension")
    wire = np.dtype(msg.dtype).newbyteorder("<")
    count = 1
    for s in shape:
        count *= s
    expected = count * wire.itemsize
    data = msg.data  # read once: each read of a bytes field copies it out of the message
    if len(data) != expected:
        raise TensorCodecError(f"tensor of dtype {msg.dtype} and shape {list(shape)} needs {expected} "
                               f"bytes, got {len(data)}")
    try:  # e.g. an empty tensor declaring a dimension numpy cannot allocate, [2**63-1, 0]
        arr = np.frombuffer(data, dtype=wire).reshape(shape)
    except ValueError as exc:
        raise TensorCodecError(f"tensor shape {list(shape)} cannot be built: {exc}") from None
    native = arr.dtype.newbyteorder("=")
    if arr.dtype != native:  # only on big-endian hosts
        arr = arr.astype(native)
    return arr.copy() if writable else arr
