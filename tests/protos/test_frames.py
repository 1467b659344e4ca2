"""The binary score frame (protos/frames.py): the JSON form's numbers bit for bit, every bad frame
refused with a reason, the Accept header read as HTTP lists it.

Seen to fail on: ``encode_score_frame`` writing the logits big-endian (``>f4``: the bit tests);
dropping the header-length check in ``decode_score_frame`` (the truncated header then fails as
JSON, not with its length); ``accepts`` matching a substring of the whole header instead of
each listed type."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protos import Array, ArrayError, ScoreResponse, ScoreStats
from protos.frames import SCORE_FRAME, accepts, decode_score_frame, encode_score_frame


def _response(logits: np.ndarray, stats: bool = True) -> ScoreResponse:
    return ScoreResponse(
        logits=Array.from_numpy(logits),
        rows=int(np.prod(logits.shape[:2])),
        stats=ScoreStats(forward_passes=2, real_tokens=100, padded_tokens=120, seconds=0.25)
        if stats
        else None,
    )


def test_a_frame_carries_the_json_forms_numbers_bit_for_bit_in_fewer_bytes() -> None:
    tiny = np.finfo(np.float32).tiny
    special = np.array([0.0, -0.0, tiny / 2, -tiny, np.finfo(np.float32).max, 1 / 3], dtype=np.float32)
    logits = np.random.default_rng(0).normal(size=(5, 24, 4)).astype(np.float32)
    logits.flat[: special.size] = special
    for stats in (True, False):
        response = _response(logits, stats)
        frame = encode_score_frame(response)
        back = decode_score_frame(frame)
        assert back.logits.numpy().tobytes() == logits.tobytes()  # -0.0 and subnormals included
        assert back.model_dump_json() == response.model_dump_json()
        assert len(frame) < 0.8 * len(response.model_dump_json())


def test_the_layout_is_the_documented_one() -> None:
    logits = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    frame = encode_score_frame(_response(logits, stats=False))
    (n,) = struct.unpack("<I", frame[:4])
    assert frame[4 : 4 + n].startswith(b"{")
    assert frame[4 + n :] == logits.astype("<f4").tobytes()


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: b"", "4-byte header length"),
        (lambda f: f[:6], "the body has 2 after it"),
        (lambda f: f[:-4], "logits: .*needs 48 bytes"),  # one float short: Array's length check
        (lambda f: f + b"\0\0\0\0", "needs 48 bytes"),
        (lambda f: struct.pack("<I", 2) + b"{}", "KeyError"),
        (lambda f: f[:4] + f[4:].replace(b'"float32"', b'"float99"', 1), "invalid"),
        (lambda f: f[:-4] + struct.pack("<f", np.nan), "NaN or Inf"),
    ],
)
def test_a_bad_frame_is_refused_with_its_reason(mangle, reason) -> None:  # type: ignore[no-untyped-def]
    frame = encode_score_frame(_response(np.ones((2, 3, 2), dtype=np.float32)))
    with pytest.raises(ArrayError, match=reason):
        decode_score_frame(mangle(frame))


def test_accept_is_read_as_a_list_of_media_types() -> None:
    assert accepts(SCORE_FRAME, SCORE_FRAME)
    assert accepts(f"application/json;q=0.5, {SCORE_FRAME};q=1", SCORE_FRAME)
    assert accepts(SCORE_FRAME.upper(), SCORE_FRAME)
    assert not accepts(None, SCORE_FRAME)
    assert not accepts("", SCORE_FRAME)
    assert not accepts("*/*", SCORE_FRAME)
    assert not accepts(f"{SCORE_FRAME}-v2", SCORE_FRAME)
    assert not accepts(f"application/json; note={SCORE_FRAME}", SCORE_FRAME)
