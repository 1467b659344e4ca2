"""Compact answers of the inference service, asked for with ``Accept`` (the JSON forms stay default).

**Token ids.** ``POST /v1/tokenize`` answers ``TokenizeResponse`` (JSON lists of ints) unless the
request's ``Accept`` names :data:`PACKED_IDS`; then it answers ``PackedIds`` (protos/inputs.py): one
flat id array in the smallest dtype that holds the vocabulary, and the lengths, as
``application/vnd.fedbpt.packed-ids+json`` (still JSON).

**Score frames**, for the link that carries the most numbers back.

``POST /v1/score`` and ``POST /v1/score/handle`` answer JSON (``ScoreResponse``, its logits in
base64) unless the request's ``Accept`` header names :data:`SCORE_FRAME`; then the body is one
frame::

    4 bytes    N, a little-endian uint32: the header's length
    N bytes    the header: the ScoreResponse as JSON, its logits without ``data``
    the rest   the logits' bytes: little-endian, C order, the header's dtype and shape

The numbers are the JSON form's, bit for bit (the same bytes, without base64's third more), and the
decoded response is validated exactly as a JSON one (size, shape, finite values). Either side may be
older: a service that does not know the type answers JSON, and a client reads the answer by its
``Content-Type``, so a client that asks for frames still accepts JSON.
"""

from __future__ import annotations

import binascii
import json
import struct

from pydantic import ValidationError

from protos.arrays import ArrayError
from protos.scoring import ScoreResponse

SCORE_FRAME = "application/vnd.fedbpt.score-frame"
PACKED_IDS = "application/vnd.fedbpt.packed-ids+json"
_LENGTH = struct.Struct("<I")


def accepts(accept: str | None, media_type: str) -> bool:
    """Whether an ``Accept`` header value lists ``media_type`` (parameters such as q ignored)."""
    if not accept:
        return False
    return any(part.split(";", 1)[0].strip().lower() == media_type for part in accept.split(","))


def answered_as(content_type: str | None) -> str:
    """The media type of a ``Content-Type`` header value, without its parameters."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def encode_score_frame(response: ScoreResponse) -> bytes:
    """The frame of ``response`` (its logits' bytes as the JSON form would carry them in base64)."""
    header = response.model_dump(mode="json", exclude={"logits": {"data"}})
    raw = binascii.a2b_base64(response.logits.data, strict_mode=True)
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LENGTH.pack(len(head)) + head + raw


def decode_score_frame(body: bytes) -> ScoreResponse:
    """The ScoreResponse in ``body``; :class:`ArrayError` saying what is wrong with a bad frame."""
    if len(body) < _LENGTH.size:
        raise ArrayError(f"a score frame starts with a 4-byte header length; got {len(body)} bytes")
    (n,) = _LENGTH.unpack_from(body)
    if _LENGTH.size + n > len(body):
        raise ArrayError(
            f"the score frame's header is {n} bytes; the body has {len(body) - _LENGTH.size} after it"
        )
    try:
        header = json.loads(body[_LENGTH.size : _LENGTH.size + n])
        header["logits"]["data"] = binascii.b2a_base64(body[_LENGTH.size + n :], newline=False).decode(
            "ascii"
        )
        return ScoreResponse.model_validate_json(json.dumps(header))
    except ValidationError as exc:  # before ValueError, its base class
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ArrayError(f"the score frame's response is invalid: {reasons}") from None
    except (ValueError, TypeError, KeyError) as exc:  # not JSON, or a header without logits
        raise ArrayError(f"not a valid score frame: {type(exc).__name__}: {exc}") from None
