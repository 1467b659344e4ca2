"""Errors the scoring code raises for requests that cannot be served; the app turns them into HTTP
answers with a ``detail`` that says what was wrong."""

from __future__ import annotations


class ServiceError(Exception):
    """A request this service refuses; ``status`` is the HTTP code, ``detail`` the message."""

    status: int = 400

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(ServiceError):
    """Well-formed, but impossible for this model (wrong hidden size, unknown token id, too long)."""

    status = 400


class Unavailable(ServiceError):
    """The service cannot take the request now (model loading, queue full)."""

    status = 503
