"""The one array codec of the wire (``protos/arrays.py``): ``{"dtype", "shape", "data"}`` with
``data`` the base64 of the array's little-endian bytes, whatever the sender's or the receiver's byte
order. The expected bytes here are written out by hand from IEEE 754, not from the codec."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from protos import Array, ArrayError, arrays, decode_array

# 1.0, -2.0, 0.5, 65504 (the largest float16) in IEEE half precision: 0x3C00, 0xC000, 0x3800,
# 0x7BFF, each written low byte first.
HALF_VALUES = [1.0, -2.0, 0.5, 65504.0]
HALF_WIRE = bytes.fromhex("003c 00c0 0038 ff7b")


def test_float16_is_sent_as_little_endian_bytes() -> None:
    """Catches a float16 codec in big-endian (or the host's native) order: the bytes on the wire
    are the low byte of each half first, from a little- or a big-endian array in memory alike, and
    prompt_embeds sent as float16 by one machine read the same on any other."""
    little = np.array(HALF_VALUES, dtype="<f2")
    sent = Array.from_numpy(little, "float16")
    assert (sent.dtype, sent.shape) == ("float16", [4])
    assert base64.b64decode(sent.data) == HALF_WIRE
    assert Array.from_numpy(little.astype(">f2"), "float16").data == sent.data
    # From float32 (what the clients hold) the conversion happens before the bytes are laid out.
    assert Array.from_numpy(np.array(HALF_VALUES, np.float32), "float16").data == sent.data


def test_float16_wire_bytes_decode_to_their_values() -> None:
    """Catches a receiver that reads float16 in big-endian (or native) order: the hand-written
    little-endian bytes, as a JSON body carries them, decode to the values they encode."""
    body = json.dumps({"dtype": "float16", "shape": [2, 2], "data": base64.b64encode(HALF_WIRE).decode()})
    received = Array.model_validate_json(body).numpy()
    assert received.shape == (2, 2)
    np.testing.assert_array_equal(received.astype(np.float64).ravel(), HALF_VALUES)
    # A round trip through JSON keeps every bit.
    again = Array.model_validate_json(Array.from_numpy(received, "float16").model_dump_json()).numpy()
    np.testing.assert_array_equal(again, received)


def test_float32_is_sent_as_little_endian_bytes() -> None:
    """The same order for float32 (z, logits): 1.0f is 0x3F800000, -2.0f 0xC0000000."""
    sent = Array.from_numpy(np.array([1.0, -2.0], dtype=">f4"))
    assert sent.dtype == "float32"
    assert base64.b64decode(sent.data) == bytes.fromhex("0000803f 000000c0")


# What a receiver relies on (the module's promise: dtype known, shape within limits, data length equal
# to the shape's byte count, strict base64, finite floats), each refused with a reason that says so.


def _payload(dtype: str, shape: list[int], data: str) -> str:
    return json.dumps({"dtype": dtype, "shape": shape, "data": data})


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_floats_are_refused_on_both_sides(dtype: str, bad: float) -> None:
    """Neither side lets NaN or Inf through: the sender refuses to encode it and a receiver refuses
    the bytes another encoder produced, with the same reason."""
    values = np.array([1.0, bad], dtype=np.dtype(dtype).newbyteorder("<"))
    with pytest.raises(ArrayError) as sent:
        Array.from_numpy(values)
    raw = base64.b64encode(values.tobytes()).decode()
    with pytest.raises(ValidationError) as received:
        Array.model_validate_json(_payload(dtype, [2], raw))
    with pytest.raises(ArrayError) as decoded:
        decode_array(dtype, [2], raw)
    assert str(sent.value) == str(decoded.value) == "array contains NaN or Inf values"
    assert "array contains NaN or Inf values" in str(received.value)


@pytest.mark.parametrize(
    ("values", "name"),
    [
        (np.array([1, -2], dtype=np.int32), "int32"),
        (np.array([1, -2], dtype=np.int64), "int64"),
        (np.array([0.5, -2.0], dtype=np.float64), "float64"),
        (np.array([0.5, -2.0], dtype=np.float32), "float32"),
        (np.array([0.5, -2.0], dtype=np.float16), "float16"),
    ],
)
def test_an_array_is_sent_as_its_own_dtype(values: np.ndarray, name: str) -> None:
    """Without a dtype, an array goes as the wire type of the same kind and width (an int32 is not
    sent as the float32 of the same width), and reads back equal."""
    sent = Array.from_numpy(values)
    assert sent.dtype == name
    received = Array.model_validate_json(sent.model_dump_json()).numpy()
    assert received.dtype == np.dtype(name)
    np.testing.assert_array_equal(received, values)


@pytest.mark.parametrize(
    "values", [np.array([True, False]), np.array([1, 2], dtype=np.uint8), np.array([1j])]
)
def test_a_dtype_the_wire_does_not_carry_is_refused_by_name(values: np.ndarray) -> None:
    with pytest.raises(ArrayError, match=rf"dtype {values.dtype} is not one of \['float16', 'float32'"):
        Array.from_numpy(values)


def test_decode_refuses_an_unknown_dtype_by_name() -> None:
    with pytest.raises(ArrayError, match=r"unknown dtype 'uint8'; expected one of \['float16', 'float32'"):
        decode_array("uint8", [1], "AA==")


def test_four_dimensions_are_the_most_allowed() -> None:
    four = np.arange(16, dtype=np.float32).reshape(2, 2, 2, 2)
    received = Array.model_validate_json(Array.from_numpy(four).model_dump_json()).numpy()
    np.testing.assert_array_equal(received, four)
    with pytest.raises(ArrayError, match=r"shape \[1, 1, 1, 1, 1\] has 5 dimensions; at most 4 allowed"):
        decode_array("float32", [1, 1, 1, 1, 1], "AAAAAA==")


@pytest.mark.parametrize("shape", [[0], [3, 0], [0, 5]])
def test_empty_dimensions_are_valid(shape: list[int]) -> None:
    """A zero-length dimension (no examples, no candidates) is an array, not an error."""
    received = Array.model_validate_json(_payload("float32", shape, "")).numpy()
    assert received.shape == tuple(shape)
    assert Array.from_numpy(np.zeros(shape, np.float32)).data == ""


def test_a_negative_dimension_is_refused() -> None:
    with pytest.raises(ArrayError, match=r"shape \[2, -1\] has a negative dimension"):
        decode_array("float32", [2, -1], "")


def test_the_size_limit_is_inclusive_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """An array of exactly the limit passes; one element more is refused before any decoding. The
    limit is lowered here (512 MiB arrays have no place in a unit test); both sides read it per call."""
    monkeypatch.setattr(arrays, "MAX_ARRAY_BYTES", 32)
    at_limit = np.arange(8, dtype=np.float32)
    sent = Array.from_numpy(at_limit)
    np.testing.assert_array_equal(decode_array("float32", [8], sent.data), at_limit)
    with pytest.raises(ArrayError, match="array of 36 bytes exceeds the 32-byte limit"):
        Array.from_numpy(np.arange(9, dtype=np.float32))
    with pytest.raises(ArrayError, match=r"shape \[9\] of float32 is 36 bytes; the limit is 32"):
        decode_array("float32", [9], "A" * 48)


def test_data_of_the_wrong_length_is_refused_before_decoding() -> None:
    with pytest.raises(
        ArrayError, match=r"shape \[2\] of float32 needs 8 bytes \(12 base64 characters\); data has 8"
    ):
        decode_array("float32", [2], "AAAAAAAA")


def test_base64_is_strict() -> None:
    """Two padded blocks glued together (what encoding element by element gives) have the right
    length but are not one base64 string: refused as such, not read as their first block."""
    with pytest.raises(ArrayError, match="data is not valid base64: Excess data after padding"):
        decode_array("float16", [2], "AAA=AAA=")
    with pytest.raises(ArrayError, match="data is not valid base64"):
        decode_array("float16", [2], "AAAA AAA")


def test_data_that_decodes_short_is_refused() -> None:
    """Padding inside the expected length: right character count, one byte instead of two."""
    with pytest.raises(ArrayError, match=r"data decodes to 1 bytes; shape \[1\] of float16 needs 2"):
        decode_array("float16", [1], "AA==")


def test_an_array_built_without_validation_decodes_when_read() -> None:
    """``model_construct`` (pydantic's unvalidated constructor) leaves the decoded cache empty:
    reading it decodes then, with the same checks."""
    sent = Array.from_numpy(np.array([1.5, -2.0], dtype=np.float32))
    built = Array.model_construct(dtype=sent.dtype, shape=sent.shape, data=sent.data)
    np.testing.assert_array_equal(built.numpy(), [1.5, -2.0])
    assert built.nbytes == 8
    assert not built.numpy().flags.writeable
