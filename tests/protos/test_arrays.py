"""The one array codec of the wire (``protos/arrays.py``): ``{"dtype", "shape", "data"}`` with
``data`` the base64 of the array's little-endian bytes, whatever the sender's or the receiver's byte
order. The expected bytes here are written out by hand from IEEE 754, not from the codec."""

from __future__ import annotations

import base64
import json

import numpy as np

from protos import Array

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
