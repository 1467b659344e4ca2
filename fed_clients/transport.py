"""HTTP to either service with bounded retries, and byte counting from the real bodies.

Connection errors, timeouts, 408, 429 and every 5xx are retried with exponential backoff and full
jitter (a ``Retry-After`` header is honoured as the lower bound of the wait) until the policy's
total time is spent: long enough by default to ride out a service restart. A 409 raises
:class:`Conflict` (the caller decides: a late update is logged and the loop goes on). Every other
4xx raises :class:`FatalServiceError` with the service's ``detail``: retrying cannot fix a wrong
token, a wrong run or a malformed request.

A service may have replicas (``alternates``: more base URLs serving the same model, e.g. one engine
per GPU): a failed attempt moves to the next URL at once, and only after every URL has failed since
the last wait does the backoff apply. The URL that answered stays current, so a site keeps talking
to one replica (whose input cache holds its registered inputs) until that replica fails.
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
    # Replicas of the same service, tried in order after ``base_url`` (module docstring).
    alternates: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self._urls = [self.base_url, *(u.rstrip("/") for u in self.alternates)]
        self._current = 0
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
        return self.parse(self.request("GET", path, params=params, timeout_s=timeout_s), model)

    def post(self, path: str, body: BaseModel, model: type[M], timeout_s: float | None = None) -> M:
        return self.parse(self.post_raw(path, body, timeout_s=timeout_s), model)

    def post_raw(
        self, path: str, body: BaseModel, timeout_s: float | None = None, accept: str | None = None
    ) -> httpx.Response:
        """POST ``body`` as JSON; ``accept``: the media types asked for (default: the server's)."""
        content = body.model_dump_json(exclude_none=True).encode()
        return self.request("POST", path, content=content, timeout_s=timeout_s, accept=accept)

    def parse(self, response: httpx.Response, model: type[M]) -> M:
        """The JSON body of ``response`` as ``model``; FatalServiceError where it is not one."""
        try:
            return model.model_validate_json(response.content)
        except ValidationError as exc:
            raise FatalServiceError(
                self.name,
                f"{response.request.method} {response.request.url.path} answered a body that is not "
                f"a valid {model.__name__}: {exc.errors(include_url=False, include_input=False)}",
                response.status_code,
            ) from None

    @property
    def current_url(self) -> str:
        """The base URL requests go to now (the last replica that answered, or the first)."""
        return self._urls[self._current]

    # ----- the one place that talks HTTP -----
    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        accept: str | None = None,
    ) -> httpx.Response:
        """Send until a 2xx (returned), a 4xx (raised) or the retry budget is spent (raised)."""
        kwargs: dict[str, Any] = {"content": content, "params": params}
        headers = {"Content-Type": "application/json"} if content is not None else {}
        if accept is not None:
            headers["Accept"] = accept
        kwargs["headers"] = headers or None
        if timeout_s is not None:
            kwargs["timeout"] = httpx.Timeout(timeout_s, connect=self.connect_timeout_s)
        started = time.monotonic()
        attempt = hops = 0
        while True:
            attempt += 1
            outcome = self._send(method, path, len(content or b""), kwargs)
            if isinstance(outcome, httpx.Response):
                return outcome
            problem, wait_hint = outcome
            if hops < len(self._urls) - 1:  # a replica not tried since the last wait: go there now
                hops += 1
                self._next_replica(problem)
                continue
            hops = 0
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
            if len(self._urls) > 1:
                self._next_replica(problem)

    def _next_replica(self, problem: str) -> None:
        before = self.current_url
        self._current = (self._current + 1) % len(self._urls)
        log.warning("%s: %s failed (%s); trying %s", self.name, before, problem, self.current_url)

    def _send(
        self, method: str, path: str, size: int, kwargs: dict[str, Any]
    ) -> httpx.Response | tuple[str, float | None]:
        """One attempt at the current URL: the response (< 400), or (the problem, a Retry-After
        hint) when it may be retried; raises what retrying cannot fix."""
        self.traffic.bytes_sent += size  # on a transport error the body may or may not have left
        try:
            response = self._client.request(method, f"{self.current_url}{path}", **kwargs)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            return (f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__), None
        self.traffic.calls += 1
        self.traffic.bytes_received += len(response.content)
        status = response.status_code
        if status < 400:
            return response
        if status == 409:
            raise Conflict(self.name, f"{method} {path}: 409 {_detail(response)}", 409, _detail(response))
        if status < 500 and status not in RETRY_STATUSES:
            raise FatalServiceError(
                self.name,
                f"{method} {path} was refused with HTTP {status}: {_detail(response)}",
                status,
                _detail(response),
            )
        return f"HTTP {status}: {_detail(response)}", _retry_after(response)
