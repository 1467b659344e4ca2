"""protos.media: which Content-Type values declare a JSON body."""

from __future__ import annotations

import pytest

from protos.media import declares_json


@pytest.mark.parametrize(
    ("value", "json"),
    [
        (b"application/json", True),
        (b"Application/JSON; charset=utf-8", True),
        (b"application/merge-patch+json", True),
        (b"application/x-www-form-urlencoded", False),  # what curl -d sends
        (b"text/plain", False),
        (b"application/jsonx", False),
    ],
)
def test_declares_json(value: bytes, json: bool) -> None:
    assert declares_json([(b"accept", b"*/*"), (b"content-type", value)]) is json


def test_no_content_type_is_not_json() -> None:
    assert declares_json([(b"content-length", b"2")]) is False
