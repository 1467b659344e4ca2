"""The guard in front of every route (pure ASGI): bearer key on /v1/*, body-size limit, metrics.

Order matters: the key is checked before a byte of the body is read (an unauthenticated client
cannot make the service buffer 64 MiB), then the declared Content-Length, then the body as it
streams in (chunked uploads declare none). Every answer, refusals included, is counted.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from inference_service.metrics import ServiceMetrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


async def _answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
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


class GuardMiddleware:
    def __init__(
        self, app: ASGIApp, *, api_key: str | None, max_body_bytes: int, metrics: ServiceMetrics
    ) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _authorized(self, scope: Scope) -> bool:
        assert self.api_key is not None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    # Constant-time: the comparison does not leak how much of the key matched.
                    return hmac.compare_digest(token.strip(), self.api_key)
        return False

    def _declared_length(self, scope: Scope) -> int | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return -1
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        start = time.perf_counter()
        status = [500]  # what an exception escaping the app turns into

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            route = self.metrics.route(path)
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if self.api_key is not None and path.startswith("/v1/") and not self._authorized(scope):
            await _answer(
                send,
                401,
                "missing or wrong bearer token (Authorization: Bearer <FEDBPT_API_KEY>)",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared = self._declared_length(scope)
        if declared is not None and declared < 0:
            await _answer(send, 400, "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_body_bytes:
            await _answer(
                send,
                413,
                f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes",
            )
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _answer(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
