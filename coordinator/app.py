"""The FastAPI app of the coordinator: ``create_app(settings)``.

``uvicorn --factory coordinator.app:app_from_env`` builds one from ``FEDBPT_*``. The SQLite file is
opened when the app is created; at startup the app settles open rounds (a crash may have left one
complete or past its deadline) and then checks deadlines every ``deadline_check_interval_s``.

Auth (docs/coordinator.md): admin routes need ``FEDBPT_ADMIN_TOKEN``; task, update, eval and whoami
need a client token of that run; read routes (runs, rounds, prompt) take either, a client seeing
only its own run. /healthz, /metrics and / are open. The routes are in coordinator/routes.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from coordinator.engine import Engine
from coordinator.errors import ApiError
from coordinator.es_state import check_pycma
from coordinator.metrics import CoordinatorMetrics
from coordinator.middleware import GuardMiddleware
from coordinator.routes import DASHBOARD, RunSignals, call, client_routes, open_routes, run_routes
from coordinator.settings import CoordinatorSettings
from coordinator.store import Store

log = logging.getLogger(__name__)


def _validation_detail(errors: Any) -> list[dict[str, Any]]:
    """pydantic's errors without ``input`` (which may echo whole arrays) or ``ctx`` objects."""
    return [
        {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type", "")}
        for e in errors
    ]


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=headers)


async def _invalid(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": _validation_detail(exc.errors())}, status_code=422)


def _lifespan(engine: Engine, signals: RunSignals, interval: float) -> Any:
    async def deadline_loop() -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                for run_id in await call(engine.check_rounds):
                    signals.notify(run_id)
            except Exception:  # keep checking; the next pass retries
                log.exception("deadline check failed")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for run_id in await call(engine.resume):
            signals.notify(run_id)
        checker = asyncio.get_running_loop().create_task(deadline_loop())
        try:
            yield
        finally:
            checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checker
            signals.notify_all()
            await call(engine.close)

    return lifespan


def create_app(settings: CoordinatorSettings | None = None) -> FastAPI:
    settings = settings or CoordinatorSettings()
    check_pycma()
    metrics = CoordinatorMetrics()
    engine = Engine(Store(settings.db), settings, hooks=metrics)
    signals = RunSignals()
    app = FastAPIOffline(  # /docs loads Swagger UI from the package: no CDN, air-gapped sites too
        title="fedbpt coordinator",
        description="Runs, rounds and server-level CMA-ES aggregation of federated black-box prompt tuning.",
        version="0.1.0",
        lifespan=_lifespan(engine, signals, settings.deadline_check_interval_s),
    )
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.signals = signals
    app.state.settings = settings
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.mount("/dashboard/static", StaticFiles(directory=DASHBOARD / "static"), name="dashboard")
    for router in (open_routes, run_routes, client_routes):
        app.include_router(router)
    return app


def app_from_env() -> FastAPI:
    """``uvicorn --factory coordinator.app:app_from_env``: settings from the environment only."""
    return create_app(CoordinatorSettings())
