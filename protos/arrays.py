"""The one array codec of the wire: ``{"dtype", "shape", "data": base64 of little-endian bytes}``.

Every array that crosses a process boundary travels in this form. Decoding validates everything a
receiver relies on (dtype known, shape within limits, data length equal to the shape's byte count,
strict base64, finite floats), so code behind an ``Array`` field never sees a malformed array.
"""

from __future__ import annotations

import binascii
import math
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

DType = Literal["float32", "float16", "float64", "int32", "int64", "uint16"]

# numpy type strings, explicitly little-endian so big-endian hosts encode the same bytes.
_NUMPY_DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int32": "<i4",
    "int64": "<i8",
    "uint16": "<u2",  # token ids of vocabularies up to 65,536 (half of int32 on the wire)
}
_FLOAT_DTYPES = frozenset({"float32", "float16", "float64"})

MAX_NDIM = 4
# Hard ceiling of one decoded array. Services apply smaller body-size limits in front of this.
MAX_ARRAY_BYTES = 512 * 2**20


class ArrayError(ValueError):
    """An array payload that does not decode to what its header promises."""


class Array(BaseModel):
    """A typed n-dimensional array on the wire.

    Construct from numpy with :meth:`from_numpy`; read with :meth:`numpy` (decoded once, at
    validation time, and returned read-only).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    dtype: DType
    shape: list[int] = Field(max_length=MAX_NDIM)
    data: str

    _array: np.ndarray | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _decode(self) -> Array:
        self._array = decode_array(self.dtype, self.shape, self.data)
        return self

    @property
    def nbytes(self) -> int:
        return int(self.numpy().nbytes)

    def numpy(self) -> np.ndarray:
        """The decoded array (read-only view; copy before writing)."""
        if self._array is None:  # pragma: no cover - the validator always sets it
            self._array = decode_array(self.dtype, self.shape, self.data)
        return self._array

    @classmethod
    def from_numpy(cls, array: Any, dtype: DType | None = None) -> Array:
        """Encode ``array`` (anything ``np.asarray`` accepts) as ``dtype`` (default: its own)."""
        a = np.asarray(array)
        name = dtype or _dtype_name(a.dtype)
        target = np.dtype(_NUMPY_DTYPES[name])
        a = np.ascontiguousarray(a, dtype=target)
        if name in _FLOAT_DTYPES and not np.isfinite(a).all():
            raise ArrayError("array contains NaN or Inf values")
        if a.nbytes > MAX_ARRAY_BYTES:
            raise ArrayError(f"array of {a.nbytes} bytes exceeds the {MAX_ARRAY_BYTES}-byte limit")
        encoded = binascii.b2a_base64(a.tobytes(), newline=False).decode("ascii")
        # model_construct skips re-decoding what we just encoded; the array is already valid.
        out = cls.model_construct(dtype=name, shape=[int(s) for s in a.shape], data=encoded)
        view = a.view()
        view.flags.writeable = False
        out._array = view
        return out


def _dtype_name(dt: np.dtype) -> DType:
    for name, code in _NUMPY_DTYPES.items():
        if np.dtype(code).kind == dt.kind and np.dtype(code).itemsize == dt.itemsize:
            return name  # type: ignore[return-value]
    raise ArrayError(f"dtype {dt} is not one of {sorted(_NUMPY_DTYPES)}")


def decode_array(dtype: str, shape: list[int], data: str) -> np.ndarray:
    """Validate and decode one array payload; raise :class:`ArrayError` saying what is wrong."""
    if dtype not in _NUMPY_DTYPES:
        raise ArrayError(f"unknown dtype {dtype!r}; expected one of {sorted(_NUMPY_DTYPES)}")
    if len(shape) > MAX_NDIM:
        raise ArrayError(f"shape {shape} has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
    if any(s < 0 for s in shape):
        raise ArrayError(f"shape {shape} has a negative dimension")
    np_dtype = np.dtype(_NUMPY_DTYPES[dtype])
    count = math.prod(shape)
    nbytes = count * np_dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise ArrayError(f"shape {shape} of {dtype} is {nbytes} bytes; the limit is {MAX_ARRAY_BYTES}")
    # Check the encoded length before decoding so an oversized payload costs nothing.
    expected_chars = 4 * math.ceil(nbytes / 3)
    if len(data) != expected_chars:
        raise ArrayError(
            f"shape {shape} of {dtype} needs {nbytes} bytes ({expected_chars} base64 characters); "
            f"data has {len(data)} characters"
        )
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise ArrayError(f"data is not valid base64: {exc}") from None
    if len(raw) != nbytes:
        raise ArrayError(f"data decodes to {len(raw)} bytes; shape {shape} of {dtype} needs {nbytes}")
    array = np.frombuffer(raw, dtype=np_dtype).reshape(shape)
    if dtype in _FLOAT_DTYPES and not np.isfinite(array).all():
        raise ArrayError("array contains NaN or Inf values")
    return array
