"""Errors the coordinator raises for requests it refuses; the app turns them into HTTP answers with
a human-readable ``detail``."""

from __future__ import annotations


class ApiError(Exception):
    status: int = 400

    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        if status is not None:
            self.status = status


class BadRequest(ApiError):
    """Well-formed but impossible for this run (wrong dimension, wrong number of sigmas, ...)."""

    status = 400


class Unauthorized(ApiError):
    """No bearer token, or one the coordinator does not know."""

    status = 401


class Forbidden(ApiError):
    """A known token acting outside its run or role."""

    status = 403


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    """The request conflicts with the run's state (closed round, not sampled, started twice)."""

    status = 409
