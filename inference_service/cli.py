"""``fedbpt serve-model``. Imports only light things at import time (the CLI imports this module on
every install, also where torch and FastAPI are absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def serve_model(
    model: str | None = typer.Option(
        None, help="Hugging Face id or local path (default: the embedded MiniLM)"
    ),
    head: str | None = typer.Option(None, help="mlm | causal | embedding (default: inferred from the model)"),
    backend: str | None = typer.Option(None, help="transformers | vllm (default: transformers)"),
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default 8000)"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N"),
    dtype: str | None = typer.Option(None, help="auto | float32 | bfloat16 | float16"),
    max_batch_tokens: int | None = typer.Option(None, help="padded tokens per forward pass"),
    max_rows: int | None = typer.Option(None, help="largest P*B of one /v1/score call"),
    max_length: int | None = typer.Option(
        None, help="longest sequence (default: the model's; vLLM: max_model_len)"
    ),
    gpu_memory_utilization: float | None = typer.Option(None, help="vLLM: share of GPU memory (default 0.9)"),
    tensor_parallel_size: int | None = typer.Option(
        None, help="vLLM: GPUs to split the model over (default 1)"
    ),
    threads: int | None = typer.Option(None, help="torch CPU threads"),
    allow_download: bool = typer.Option(
        False, "--allow-download", help="let a Hugging Face id download from the hub (default: offline)"
    ),
    input_cache_bytes: int | None = typer.Option(
        None, help="bytes of registered inputs kept for /v1/score/handle (0: the lean link off)"
    ),
    input_ttl_s: float | None = typer.Option(None, help="seconds an unused registered input set is kept"),
    log_level: str | None = typer.Option(None, help="uvicorn log level"),
    tls_cert: Path | None = typer.Option(None, help="serve HTTPS: PEM certificate (with --tls-key)"),
    tls_key: Path | None = typer.Option(None, help="serve HTTPS: PEM private key"),
) -> None:
    """Serve a model's soft-prompt scoring over HTTP (the API key comes from FEDBPT_API_KEY)."""
    from pydantic import ValidationError

    from inference_service.settings import ServiceSettings

    given: dict[str, Any] = {
        "model": model,
        "head": head,
        "backend": backend,
        "host": host,
        "port": port,
        "device": device,
        "dtype": dtype,
        "max_batch_tokens": max_batch_tokens,
        "max_rows": max_rows,
        "max_length": max_length,
        "gpu_memory_utilization": gpu_memory_utilization,
        "tensor_parallel_size": tensor_parallel_size,
        "threads": threads,
        "allow_download": allow_download or None,
        "input_cache_bytes": input_cache_bytes,
        "input_ttl_s": input_ttl_s,
        "log_level": log_level,
        "tls_certfile": tls_cert,
        "tls_keyfile": tls_key,
    }
    try:
        settings = ServiceSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc

    import logging

    import uvicorn

    from inference_service.app import create_app
    from inference_service.backends import load_backend

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Load before binding the port: a wrong model fails the command at once, with its reason.
    try:
        loaded = load_backend(settings)
    except (ValueError, OSError) as exc:
        typer.echo(f"fedbpt serve-model: cannot load {settings.model!r}: {exc}", err=True)
        raise typer.Exit(2) from exc
    app = create_app(settings, backend=loaded)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
