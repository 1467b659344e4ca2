"""HTTP to either service with bounded retries, and byte counting from the real bodies.

Connection errors, timeouts, 408, 429 and every 5xx are retried with exponential backoff and full
jitter (a ``Retry-After`` header is honoured as the lower bound of the wait) until the policy's
total time is spent: long enough by default to ride out a service restart. A 409 raises
:class:`Conflict` (the caller decides: a late update is logged and the loop goes on). Every other
4xx raises :class:`FatalServiceError` with the service's ``detail``: retrying cannot fix a wrong
token, a wrong run or a malformed request.
"""

from __future__ import annotations

import logging
import random
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

RETRY_STATUSES = frozenset({408, 425, 429})


class ServiceError(Exception):
    """A call to a service that did not succeed; ``message`` says which service, what and why."""

    def __init__(self, service: str, message: str, status: int | None = None, detail: Any = None) -> None:
        super().__init__(f"{service}: {message}")
        self.service = service
        self.status = status
        self.detail = detail


class FatalServiceError(ServiceError):
    """A 4xx that retrying cannot fix (401, 403, 404, 422, ...), or an answer we cannot read."""


class Conflict(ServiceError):
    """409: the request conflicts with the service's state (e.g. an update for a closed round)."""


class ServiceUnavailable(ServiceError):
    """The service kept failing (network, timeouts, 5xx) for the whole retry budget."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by ``total_s`` per request."""

    total_s: float = 600.0
    initial_s: float = 0.5
    max_backoff_s: float = 30.0
    multiplier: float = 2.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The wait before retry ``attempt`` (1-based): uniform in [cap/2, cap], cap growing
        exponentially. Half-jitter keeps clients that failed together from retrying together
        while still guaranteeing progress of the backoff."""
        cap = min(self.max_backoff_s, self.initial_s * self.multiplier ** (attempt - 1))
        return cap * (0.5 + 0.5 * rng.random())


@dataclass
class Traffic:
    """What went over the wire to one service: calls (every HTTP answer), score rows, body bytes
    each way, and how many of the calls registered inputs (``POST /v1/inputs``)."""

    calls: int = 0
    rows: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    registrations: int = 0

    def copy(self) -> Traffic:
        return Traffic(self.calls, self.rows, self.bytes_sent, self.bytes_received, self.registrations)

    def since(self, before: Traffic) -> Traffic:
        return Traffic(
            self.calls - before.calls,
            self.rows - before.rows,
            self.bytes_sent - before.bytes_sent,
            self.bytes_received - before.bytes_received,
            self.registrations - before.registrations,
        )


def _detail(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict) and "detail" in body:
        return body["detail"]
    return body


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare enough to fall back to our own backoff


@dataclass
class JsonService:
    """One service's base URL, bearer token and retry policy; JSON bodies in and out.

    ``sleep`` is injectable only so that a caller can stop waiting (e.g. a signal); tests use the
    real one with short backoffs.
    """

    name: str
    base_url: str
    token: str | None = None
    timeout_s: float = 900.0
    connect_timeout_s: float = 10.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    traffic: Traffic = field(default_factory=Traffic)
    seed: int | None = None
    # TLS: True (the system's CAs), a PEM bundle path (a private CA or a self-signed certificate).
    verify: bool | str = True

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "fedbpt-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            verify=ssl.create_default_context(cafile=self.verify)
            if isinstance(self.verify, str)
            else self.verify,
        )
        self._rng = random.Random(self.seed)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> JsonService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- typed helpers -----
    def get(
        self,
        path: str,
        model: type[M],
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> M:
        return self._parse(self.request("GET", path, params=params, timeout_s=timeout_s), model)

    def post(self, path: str, body: BaseModel, model: type[M], timeout_s: float | None = None) -> M:
        return self._parse(self.post_raw(path, body, timeout_s=timeout_s), model)

    def post_raw(self, path: str, body: BaseModel, timeout_s: float | None = None) -> httpx.Response:
        content = body.model_dump_json(exclude_none=True).encode()
        return self.request("POST", path, content=content, timeout_s=timeout_s)

    def _parse(self, response: httpx.Response, model: type[M]) -> M:
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise FatalServiceError(
                self.name,
                f"{response.request.method} {response.request.url.path} answered a body that is not "
                f"a valid {model.__name__}: {exc.errors(include_url=False, include_input=False)}",
                response.status_code,
            ) from None

    # ----- the one place that talks HTTP -----
    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
    ) -> httpx.Response:
        """Send until a 2xx (returned), a 4xx (raised) or the retry budget is spent (raised)."""
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"} if content is not None else None
        timeout = httpx.Timeout(timeout_s, connect=self.connect_timeout_s) if timeout_s is not None else None
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            problem: str
            wait_hint: float | None = None
            try:
                kwargs: dict[str, Any] = {"content": content, "params": params, "headers": headers}
                if timeout is not None:
                    kwargs["timeout"] = timeout
                response = self._client.request(method, url, **kwargs)
            except (httpx.TransportError, httpx.TimeoutException) as exc:
                # The body may or may not have left; count what we tried to send.
                self.traffic.bytes_sent += len(content or b"")
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                self.traffic.calls += 1
                self.traffic.bytes_sent += len(content or b"")
                self.traffic.bytes_received += len(response.content)
                status = response.status_code
                if status < 400:
                    return response
                if status == 409:
                    raise Conflict(
                        self.name, f"{method} {path}: 409 {_detail(response)}", 409, _detail(response)
                    )
                if status < 500 and status not in RETRY_STATUSES:
                    raise FatalServiceError(
                        self.name,
                        f"{method} {path} was refused with HTTP {status}: {_detail(response)}",
                        status,
                        _detail(response),
                    )
                problem = f"HTTP {status}: {_detail(response)}"
                wait_hint = _retry_after(response)

            elapsed = time.monotonic() - started
            delay = self.retry.backoff(attempt, self._rng)
            if wait_hint is not None:
                delay = max(delay, min(wait_hint, self.retry.max_backoff_s))
            if elapsed + delay > self.retry.total_s:
                raise ServiceUnavailable(
                    self.name,
                    f"{method} {path} failed {attempt} time(s) over {elapsed:.1f}s "
                    f"(retry budget {self.retry.total_s:g}s); last error: {problem}",
                )
            log.warning(
                "%s: %s %s failed (%s); retry %d in %.1fs", self.name, method, path, problem, attempt, delay
            )
            self.sleep(delay)
