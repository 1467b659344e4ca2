"""The wire's one body format: every request body is JSON, declared as such.

Both services refuse a body whose ``Content-Type`` is not JSON (``application/json`` or a
``+json`` type) with 415 and :data:`NOT_JSON` as the detail, before any validation: ``curl -d``
sends a form type, and the schema's 422 would not say what is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable

NOT_JSON = (
    "send the body as JSON with Content-Type: application/json "
    "(curl: --json '<body>', or -H 'Content-Type: application/json' -d '<body>')"
)


def declares_json(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """Whether ASGI ``headers`` declare a JSON body (application/json or a +json type)."""
    for name, value in headers:
        if name == b"content-type":
            media = value.split(b";", 1)[0].strip().lower()
            return media == b"application/json" or media.endswith(b"+json")
    return False
