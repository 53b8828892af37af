"""Tensor encode/decode: every wire dtype round-trips bit-exactly; malformed messages are refused."""
from __future__ import annotations

import numpy as np
import pytest

from protos import teacher_pb2
from protos.tensor_codec import DTYPES, TensorCodecError, decode, encode

pytestmark = pytest.mark.unit


def _sample(dtype: str) -> np.ndarray:
    rng = np.random.default_rng(0)
    if dtype == "bool":
        return rng.random((3, 4)) > 0.5
    dt = np.dtype(dtype)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, size=(3, 4), dtype=dt, endpoint=True)
        a[0, 0], a[0, 1] = info.min, info.max
        return a
    a = rng.standard_normal((3, 4)).astype(dt)
    a[0, 0], a[0, 1], a[0, 2] = np.inf, -0.0, np.finfo(dt).max
    return a


@pytest.mark.parametrize("dtype", DTYPES)
def test_roundtrip_every_dtype(dtype):
    a = _sample(dtype)
    msg = encode(a)
    assert msg.dtype == dtype and list(msg.shape) == [3, 4]
    assert len(msg.data) == a.size * a.dtype.itemsize
    # Through the protobuf wire format, not just the Python object.
    back = decode(teacher_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == a.dtype and back.shape == a.shape
    assert back.tobytes() == a.tobytes()


def test_bytes_are_little_endian_row_major():
    a = np.array([[1, 2], [3, 256]], dtype=np.int32)
    assert encode(a).data == bytes([1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 1, 0, 0])
    # A big-endian or non-contiguous input is normalised, not sent as-is.
    big = a.astype(">i4")
    assert encode(big).data == encode(a).data
    assert decode(encode(a.T)).tolist() == [[1, 3], [2, 256]]


def test_nan_float32_bits_survive():
    a = np.array([np.nan, 1.5, -2.25], dtype=np.float32)
    assert decode(encode(a)).tobytes() == a.tobytes()


def test_scalar_and_empty_shapes():
    assert decode(encode(np.array(7, dtype=np.int64))).item() == 7
    e = decode(encode(np.zeros((0, 5), dtype=np.float32)))
    assert e.shape == (0, 5)


@pytest.mark.parametrize("msg,needle", [
    (teacher_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8), "unknown tensor dtype"),
    (teacher_pb2.Tensor(dtype="object", shape=[1], data=b"\0" * 8), "unknown tensor dtype"),
    (teacher_pb2.Tensor(dtype="int64", shape=[2], data=b"\0" * 8), "needs 16 bytes, got 8"),
    (teacher_pb2.Tensor(dtype="float32", shape=[-1, 2], data=b""), "negative dimension"),
    (teacher_pb2.Tensor(dtype="int8", shape=[1] * 9, data=b"\0"), "at most 8"),
    # Empty data with a dimension numpy cannot allocate: a named error, not numpy's ValueError.
    (teacher_pb2.Tensor(dtype="int64", shape=[2**63 - 1, 0], data=b""), "cannot be built"),
])
def test_malformed_tensors_refused(msg, needle):
    with pytest.raises(TensorCodecError, match=needle):
        decode(msg)


def test_unsupported_dtype_refused_on_encode():
    with pytest.raises(TensorCodecError, match="cannot be sent"):
        encode(np.array([1 + 2j]))


def test_decoded_is_read_only_unless_asked():
    a = decode(encode(np.arange(3)))
    assert not a.flags.writeable
    b = decode(encode(np.arange(3)), writable=True)
    b[0] = 5
    assert b.tolist() == [5, 1, 2]
