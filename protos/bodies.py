"""A request body read under a size limit (pure ASGI): the half of both services' guards that is
the same. The refusals are part of the wire contract:

- a declared ``Content-Length`` that is not a number: 400;
- a declared length over the limit: 413 before a byte is read;
- a body that grows past the limit as it streams in (chunked uploads declare none): 413 as soon as
  it does, so an oversized body is never buffered whole.

Every refusal is a JSON ``{"detail": ...}`` answer. Imports nothing of ours.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A JSON ``{"detail": detail}`` answer with ``status`` (and any extra ``headers``)."""
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def declared_length(scope: Scope) -> int | None:
    """The request's Content-Length (None when it declares none, -1 when it is not a number)."""
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def read_body(scope: Scope, receive: Receive, send: Send, *, max_bytes: int) -> bytes | None:
    """The whole body, or None when it was refused (the answer is sent) or the client went away."""
    declared = declared_length(scope)
    if declared is not None and declared < 0:
        await answer(send, 400, "Content-Length is not a number")
        return None
    if declared is not None and declared > max_bytes:
        await answer(send, 413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            await answer(send, 413, f"request body exceeds the limit of {max_bytes} bytes")
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replaying(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then whatever the client sends next
    (its disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
