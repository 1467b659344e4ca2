"""The guard in front of every route (pure ASGI): bearer key on /v1/*, body-size limit, JSON bodies
only (415 otherwise, saying what to send), metrics.

Several keys may be configured; each is one tenant. The guard puts the caller's tenant (a digest of
its key, "" when the service is open) into ``scope["fedbpt.tenant"]``: what the input cache is
keyed by. Body bytes are counted each way per route (``fedbpt_request_bytes``,
``fedbpt_response_bytes``).

Order matters: the key is checked before a byte of the body is read (an unauthenticated client
cannot make the service buffer 64 MiB), then the declared Content-Length, then the body as it
streams in (chunked uploads declare none). Every answer, refusals included, is counted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from inference_service.metrics import ServiceMetrics
from protos.media import NOT_JSON, declares_json

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


TENANT_KEY = "fedbpt.tenant"


def tenant_of(key: bytes) -> str:
    """A caller's tenant: a digest of its key (the key itself is never kept beside the data)."""
    return hashlib.sha256(b"fedbpt.tenant\x00" + key).hexdigest()[:32]


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
        self,
        app: ASGIApp,
        *,
        api_key: str | None = None,
        api_keys: list[str] | None = None,
        max_body_bytes: int,
        metrics: ServiceMetrics,
    ) -> None:
        self.app = app
        keys = [*([api_key] if api_key else []), *(k for k in api_keys or [] if k)]
        self.keys = [(k.encode(), tenant_of(k.encode())) for k in dict.fromkeys(keys)]
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    def _tenant(self, scope: Scope) -> str | None:
        """The caller's tenant, or None when its bearer key is missing or wrong."""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    token = token.strip()
                    found = None
                    # Constant-time per key, and every key compared: the time says neither how
                    # much of a key matched nor which key did.
                    for key, tenant in self.keys:
                        if hmac.compare_digest(token, key):
                            found = tenant
                    return found
        return None

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

        route = self.metrics.route(path)

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            elif message["type"] == "http.response.body":
                self.metrics.response_bytes.labels(route).inc(len(message.get("body", b"")))
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        tenant = self._tenant(scope) if self.keys and path.startswith("/v1/") else ""
        if tenant is None:
            await _answer(
                send,
                401,
                "missing or wrong bearer token (Authorization: Bearer <FEDBPT_API_KEY>)",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        scope[TENANT_KEY] = tenant
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
        self.metrics.request_bytes.labels(self.metrics.route(path)).inc(len(body))
        if body and not declares_json(scope.get("headers", [])):
            await _answer(send, 415, NOT_JSON)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
