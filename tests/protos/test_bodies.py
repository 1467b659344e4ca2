"""protos.bodies: the body half of both services' guards, driven over the ASGI protocol itself
(``receive`` hands out the messages a server would, ``send`` keeps what the guard answers).

Break seen to fail: without the streaming check (``size > max_bytes``) the chunked body is read
whole; without the 400 for a non-numeric Content-Length nothing is answered at all.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from protos.bodies import Message, answer, read_body, replaying


class _Wire:
    """One request's ASGI channel: the body messages to hand out, the answer sent back."""

    def __init__(self, chunks: list[bytes], *, disconnect: bool = False) -> None:
        self.messages: list[Message] = [
            {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
            for i, c in enumerate(chunks)
        ]
        if disconnect:
            self.messages = [*self.messages[:-1], {"type": "http.disconnect"}]
        self.read = 0
        self.sent: list[Message] = []

    async def receive(self) -> Message:
        self.read += 1
        return self.messages.pop(0) if self.messages else {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    def status(self) -> int | None:
        return next((int(m["status"]) for m in self.sent if m["type"] == "http.response.start"), None)

    def detail(self) -> Any:
        return json.loads(
            b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        )


def _read(wire: _Wire, headers: list[tuple[bytes, bytes]], limit: int = 10) -> bytes | None:
    return asyncio.run(read_body({"headers": headers}, wire.receive, wire.send, max_bytes=limit))


def test_a_body_within_the_limit_is_read_whole_from_its_chunks() -> None:
    wire = _Wire([b"abc", b"def", b"ghij"])
    assert _read(wire, [(b"content-length", b"10")]) == b"abcdefghij"
    assert wire.sent == []


def test_a_declared_length_over_the_limit_is_413_before_a_byte_is_read() -> None:
    wire = _Wire([b"x" * 11])
    assert _read(wire, [(b"content-length", b"11")]) is None
    assert wire.status() == 413 and wire.read == 0
    assert wire.detail() == {"detail": "request body of 11 bytes exceeds the limit of 10 bytes"}


def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit() -> None:
    wire = _Wire([b"x" * 6, b"x" * 6, b"x" * 6])  # chunked: no Content-Length
    assert _read(wire, []) is None
    assert wire.status() == 413 and wire.read == 2  # the third chunk is never asked for
    assert "exceeds the limit of 10 bytes" in wire.detail()["detail"]


@pytest.mark.parametrize("value", [b"ten", b"", b"1e3"])
def test_a_content_length_that_is_not_a_number_is_400(value: bytes) -> None:
    wire = _Wire([b"{}"])
    assert _read(wire, [(b"content-length", value)]) is None
    assert wire.status() == 400 and wire.detail() == {"detail": "Content-Length is not a number"}


def test_a_client_that_goes_away_gets_no_answer() -> None:
    wire = _Wire([b"abc", b"def"], disconnect=True)
    assert _read(wire, []) is None
    assert wire.sent == []


def test_the_app_gets_the_body_once_then_the_clients_next_message() -> None:
    wire = _Wire([])
    wire.messages = [{"type": "http.disconnect"}]
    receive = replaying(b'{"a": 1}', wire.receive)

    async def two() -> list[Message]:
        return [await receive(), await receive()]

    first, second = asyncio.run(two())
    assert first == {"type": "http.request", "body": b'{"a": 1}', "more_body": False}
    assert second == {"type": "http.disconnect"}


def test_answer_is_json_with_its_length_and_extra_headers() -> None:
    wire = _Wire([])
    asyncio.run(answer(wire.send, 401, "no key", [(b"www-authenticate", b"Bearer")]))
    start = wire.sent[0]
    assert start["status"] == 401
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"application/json" and headers[b"www-authenticate"] == b"Bearer"
    assert int(headers[b"content-length"]) == len(wire.sent[1]["body"])
    assert wire.detail() == {"detail": "no key"}
