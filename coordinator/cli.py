"""``fedbpt serve-coordinator``. Imports only light things at import time (the CLI imports this
module on every install, also where FastAPI and pycma are absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def serve_coordinator(
    db: Path | None = typer.Option(
        None, "--db", help="SQLite file (default coordinator.db; created when missing)"
    ),
    host: str | None = typer.Option(None, help="bind address (default 127.0.0.1)"),
    port: int | None = typer.Option(None, help="port (default 8080)"),
    deadline_check_interval: float | None = typer.Option(
        None, "--deadline-check-interval", help="seconds between round-deadline checks (default 1)"
    ),
    max_body_bytes: int | None = typer.Option(None, help="largest request body (default 16 MiB)"),
    log_level: str | None = typer.Option(None, help="log level (default info)"),
    tls_cert: Path | None = typer.Option(None, help="serve HTTPS: PEM certificate (with --tls-key)"),
    tls_key: Path | None = typer.Option(None, help="serve HTTPS: PEM private key"),
) -> None:
    """Coordinate federated runs over HTTP (the admin token comes from FEDBPT_ADMIN_TOKEN)."""
    from pydantic import ValidationError

    from coordinator.settings import CoordinatorSettings

    given: dict[str, Any] = {
        "db": db,
        "host": host,
        "port": port,
        "deadline_check_interval_s": deadline_check_interval,
        "max_body_bytes": max_body_bytes,
        "log_level": log_level,
        "tls_certfile": tls_cert,
        "tls_keyfile": tls_key,
    }
    try:
        settings = CoordinatorSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        raise typer.BadParameter(str(exc)) from exc

    import logging

    import uvicorn

    from coordinator.app import create_app

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.admin_token is None:
        logging.getLogger("coordinator").warning(
            "FEDBPT_ADMIN_TOKEN is not set: admin calls (create runs, enrol, start) will be refused"
        )
    app = create_app(settings)
    # Long-polls end within a few seconds of a shutdown signal instead of holding it up.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=3,
        ssl_certfile=settings.tls_certfile,
        ssl_keyfile=settings.tls_keyfile,
    )
