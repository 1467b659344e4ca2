"""Bearer tokens: the admin token (from the environment) and per-client tokens (random, stored
only as SHA-256 digests). Comparisons are constant-time."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal

from coordinator.errors import Forbidden, Unauthorized

TOKEN_PREFIX = "fbc_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(8)}"


@dataclass(frozen=True)
class Principal:
    """Who is calling: the admin, or one client of one run."""

    kind: Literal["admin", "client"]
    client_id: str | None = None
    run_id: str | None = None
    name: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.kind == "admin"


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header (401 without one)."""
    if not authorization:
        raise Unauthorized("missing bearer token (Authorization: Bearer <token>)")
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    return token


def is_admin_token(token: str, admin_token: str | None) -> bool:
    if admin_token is None:
        return False
    # Digests of equal length: compare_digest then takes the same time whatever the input.
    return hmac.compare_digest(token_digest(token), token_digest(admin_token))


def require_admin(principal: Principal | None, admin_configured: bool) -> None:
    if not admin_configured:
        raise Forbidden("admin calls are disabled: the coordinator was started without FEDBPT_ADMIN_TOKEN")
    if principal is None:
        raise Unauthorized("missing or unknown bearer token")
    if not principal.is_admin:
        raise Forbidden("this route needs the admin token; a client token cannot call it")


def require_client(principal: Principal, run_id: str) -> Principal:
    if principal.is_admin:
        raise Forbidden("this route is for a run's clients; the admin token has no client identity")
    if principal.run_id != run_id:
        raise Forbidden("this client token belongs to another run")
    return principal


def require_reader(principal: Principal, run_id: str) -> None:
    """Read routes: the admin, or a client of this very run."""
    if not principal.is_admin and principal.run_id != run_id:
        raise Forbidden("this client token belongs to another run")
