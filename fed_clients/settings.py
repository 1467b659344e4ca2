"""Settings of a site client (pydantic-settings): environment variables ``FEDBPT_*`` and the
flags of ``fedbpt client`` / ``fedbpt evaluate`` (flags win). Light import: pydantic only."""

from __future__ import annotations

import hashlib

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class ClientSettings(BaseSettings):
    """Every knob of one site. Env: ``FEDBPT_<NAME>``, e.g. ``FEDBPT_COORDINATOR``,
    ``FEDBPT_TOKEN`` (the client's coordinator token), ``FEDBPT_MODEL_ENDPOINT`` and
    ``FEDBPT_API_KEY`` (the inference service's key, as the service itself reads it)."""

    model_config = SettingsConfigDict(env_prefix="FEDBPT_", extra="ignore", protected_namespaces=())

    coordinator: str | None = Field(default=None, description="coordinator base URL")
    token: SecretStr | None = Field(default=None, description="this client's coordinator bearer token")
    run_id: str | None = Field(default=None, description="run to join (default: asked via GET /v1/whoami)")
    model_endpoint: str | None = Field(
        default=None,
        description="inference service base URL, or several replicas' URLs separated by commas",
    )
    api_key: SecretStr | None = Field(default=None, description="inference service bearer key")

    data: str | None = Field(
        default=None, description="training data: .jsonl/.csv/.tsv or hf:NAME[/CONFIG][:SPLIT]"
    )
    test_data: str | None = Field(default=None, description="held-out data for evaluation")
    text_column: str = "text"
    label_column: str = "label"
    label_names: list[str] | None = Field(
        default=None, description="order of string labels (default: the preset's class names, else sorted)"
    )

    poll_wait_s: float = Field(default=30.0, ge=0, le=600, description="long-poll wait of GET task")
    retry_total_s: float = Field(default=600.0, gt=0, description="how long one request is retried")
    retry_initial_s: float = Field(default=0.5, gt=0)
    retry_max_s: float = Field(default=30.0, gt=0)
    request_timeout_s: float = Field(default=900.0, gt=0, description="read timeout of one call (score)")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    max_ids_per_call: int = Field(default=1_000_000, ge=1, description="token ids one score body may carry")
    input_handles: bool = Field(
        default=True,
        description="register inputs once and score against their handle where the service offers it "
        "(false: every score call carries its ids)",
    )
    compact_answers: bool = Field(
        default=True,
        description="ask the service for compact answers where it offers them (protos/frames.py): token ids "
        "packed in the smallest integer dtype, logits as a binary frame (the same numbers without base64); "
        "false: the JSON forms",
    )
    ca_file: str | None = Field(
        default=None,
        description="PEM bundle to verify the services' TLS certificates (default: the system's)",
    )
    log_level: str = "info"

    def model_endpoints(self) -> list[str]:
        """The replicas of ``model_endpoint`` in the order this site tries them: rotated by a hash
        of the site's token, so that the sites of a federation spread over the replicas and each
        keeps the same first choice from one round to the next (no token: the order given)."""
        urls = [u.strip() for u in (self.model_endpoint or "").split(",") if u.strip()]
        if len(urls) < 2 or self.token is None:
            return urls
        start = int(hashlib.sha256(self.token.get_secret_value().encode()).hexdigest(), 16) % len(urls)
        return urls[start:] + urls[:start]
