"""The guard in front of every route (pure ASGI): request-body size limit, JSON bodies only (415
otherwise, saying what to send), and request metrics.

The declared Content-Length is checked first, then the body as it streams in (chunked uploads
declare none), so an oversized body is refused with 413 before it is buffered. Every answer,
refusals included, is counted by route template and status.
"""

from __future__ import annotations

import time

from coordinator.metrics import CoordinatorMetrics
from protos.bodies import BODY_METHODS, ASGIApp, Message, Receive, Scope, Send, answer, read_body, replaying
from protos.media import NOT_JSON, declares_json


class GuardMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: CoordinatorMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]  # what an exception escaping the app turns into

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "other"
            self.metrics.requests.labels(label, str(status[0])).inc()
            self.metrics.latency.labels(label).observe(time.perf_counter() - start)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        body = await read_body(scope, receive, send, max_bytes=self.max_body_bytes)
        if body is None:
            return
        if body and not declares_json(scope.get("headers", [])):
            await answer(send, 415, NOT_JSON)
            return
        await self.app(scope, replaying(body, receive), send)
