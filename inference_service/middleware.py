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
import time

from inference_service.metrics import ServiceMetrics
from protos.bodies import BODY_METHODS, ASGIApp, Message, Receive, Scope, Send, answer, read_body, replaying
from protos.media import NOT_JSON, declares_json

TENANT_KEY = "fedbpt.tenant"


def tenant_of(key: bytes) -> str:
    """A caller's tenant: a digest of its key (the key itself is never kept beside the data)."""
    return hashlib.sha256(b"fedbpt.tenant\x00" + key).hexdigest()[:32]


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
            await answer(
                send,
                401,
                "missing or wrong bearer token (Authorization: Bearer <FEDBPT_API_KEY>)",
                [(b"www-authenticate", b"Bearer")],
            )
            return
        scope[TENANT_KEY] = tenant
        if scope.get("method") not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        body = await read_body(scope, receive, send, max_bytes=self.max_body_bytes)
        if body is None:
            return
        self.metrics.request_bytes.labels(self.metrics.route(path)).inc(len(body))
        if body and not declares_json(scope.get("headers", [])):
            await answer(send, 415, NOT_JSON)
            return
        await self.app(scope, replaying(body, receive), send)
