"""Settings of the coordinator (pydantic-settings): environment variables ``FEDBPT_COORDINATOR_*``
and the flags of ``fedbpt serve-coordinator``; the admin token is exactly ``FEDBPT_ADMIN_TOKEN``.
Light import: pydantic only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MIB = 2**20


class CoordinatorSettings(BaseSettings):
    """Every knob of one coordinator. Env: ``FEDBPT_COORDINATOR_<NAME>`` (e.g.
    ``FEDBPT_COORDINATOR_DB``); the admin bearer token is ``FEDBPT_ADMIN_TOKEN`` (unset: admin
    calls are refused)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDBPT_COORDINATOR_", extra="ignore", validate_default=True, populate_by_name=True
    )

    admin_token: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("FEDBPT_ADMIN_TOKEN", "admin_token"),
        description="bearer token of the admin routes (unset: admin routes answer 403)",
    )
    db: Path = Field(default=Path("coordinator.db"), description="SQLite file (created when missing)")
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    deadline_check_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="how often round deadlines are checked"
    )
    max_body_bytes: int = Field(default=16 * MIB, ge=1024, description="larger request bodies get 413")
    max_task_wait_s: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="longest long-poll of GET task (the wait parameter is cut to it)",
    )
    retry_after_s: float = Field(default=1.0, gt=0, description="suggested pause a wait task carries")
    max_intrinsic_dim: int = Field(
        default=4096,
        ge=1,
        description="largest d a run may ask for: the server keeps a d x d covariance (and its "
        "eigendecomposition, O(d^3)) per run; larger runs are refused with 400",
    )
    tls_certfile: Path | None = Field(
        default=None, description="serve HTTPS with this PEM certificate (chain)"
    )
    tls_keyfile: Path | None = Field(default=None, description="the certificate's PEM private key")
    log_level: str = "info"
    crash_point: Literal["none", "after_update_commit"] = Field(
        default="none",
        description="fault injection for crash tests: SIGKILL the process right after committing the "
        "update that completes a round, before the round is closed and the update acknowledged",
    )

    @field_validator("admin_token")
    @classmethod
    def _empty_token_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # FEDBPT_ADMIN_TOKEN="" means "no admin", not "the empty token".
        if v is not None and not v.get_secret_value():
            return None
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("give both tls_certfile and tls_keyfile (or neither)")
        return self
